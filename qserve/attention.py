"""Attention implementations the engine can select; the seam for quantized attention kernels.

An implementation takes q [B, H, T, D], k/v [B, Hkv, L, D] (GQA: H a multiple of Hkv) and an
optional boolean mask [B, 1, T, L] (None means causal over a fresh chunk), and returns [B, H, T, D].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


_IMPLS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}


def register_attention(name: str, fn: AttentionFn) -> None:
    _IMPLS[name] = fn


def get_attention(name: str) -> AttentionFn:
    from qserve.errors import ConfigError

    if name not in _IMPLS:
        raise ConfigError(f"unknown attention implementation {name!r}; known: {sorted(_IMPLS)}")
    return _IMPLS[name]
