"""Attention implementations the engine can select; the seam for quantized attention kernels.

An implementation takes q [B, H, T, D], k/v [B, Hkv, L, D] (GQA: H a multiple of Hkv) and an
optional boolean mask [B, 1, T, L] (None means causal over a fresh chunk), and returns [B, H, T, D].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Single-query attention as two small batched matmuls: at query length 1, SDPA's flash
    kernel costs ~4x more per call on CPU. GQA heads share their K/V without copying them. Runs
    in fp32 whatever the cache dtype: at these sizes the casts cost less than bf16 matmuls on the
    cache's strided slices (SmolLM2 int4 decode 10.8 -> 9.9 ms/token), and nothing rounds to bf16
    before the output."""
    b, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, h // hkv, d).float()
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * (d ** -0.5)  # [B, Hkv, G, L]
    if mask is not None:
        scores = scores.masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
    return torch.matmul(torch.softmax(scores, -1), v.float()).to(q.dtype).view(b, h, 1, d)


def inline_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """decode_attention as broadcast products and sums, for compiled graphs only (eager would
    materialise [B, Hkv, G, L, D] products). Inductor fuses it with the layer's other loops into one
    kernel that reads the bf16 cache once and keeps the scores in fp32, where the matmul form needs
    fp32 copies of K and V and library calls. SmolLM2-135M shapes, batch 1, the attention of 30
    layers alone in one graph: 0.23 against 0.53 ms at 64 keys, 1.5 against 2.7 ms at 1000. Same
    fp32 accumulation as decode_attention."""
    b, h, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, h // hkv, 1, d).float()
    scores = (qg * k.float().unsqueeze(2)).sum(-1) * (d ** -0.5)  # [B, Hkv, G, L]
    scores = scores.masked_fill(~mask.view(b, 1, 1, length), float("-inf"))
    p = torch.softmax(scores, -1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2).to(q.dtype).view(b, h, 1, d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if q.shape[2] == 1:
        return decode_attention(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


_IMPLS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}
# Modules that register more implementations when imported; loaded on first miss.
ATTENTION_MODULES = ("qserve.quant_methods.sage_attention",)


def register_attention(name: str, fn: AttentionFn) -> None:
    _IMPLS[name] = fn


def get_attention(name: str) -> AttentionFn:
    from qserve.errors import ConfigError

    if name not in _IMPLS:
        import importlib

        for mod in ATTENTION_MODULES:
            importlib.import_module(mod)
    if name not in _IMPLS:
        raise ConfigError(f"unknown attention implementation {name!r}; known: {sorted(_IMPLS)}")
    return _IMPLS[name]
