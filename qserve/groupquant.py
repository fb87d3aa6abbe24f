"""Shared integer-quantization math: per-group asymmetric/symmetric quantization and nibble packing.

Layout conventions (also the on-disk format of every weight-only method):
- a weight is [out_features, in_features]; groups run along in_features, `group_size` wide; a
  ragged last group is allowed (e.g. 576 = 4*128 + 64).
- int4 codes are packed 8 per int32 along in_features: bits 4j..4j+3 of word i hold column 8i+j.
"""

from __future__ import annotations

import math

import torch


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size <= 0 else math.ceil(in_features / group_size)


def _pad_to_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    k = w.shape[-1]
    g = k if group_size <= 0 else group_size
    padded = num_groups(k, group_size) * g
    if padded != k:
        # replicate the last column so the padding never widens a group's range
        w = torch.cat([w, w[..., -1:].expand(*w.shape[:-1], padded - k)], dim=-1)
    return w.reshape(*w.shape[:-1], -1, g), k


def quantize_asym(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric quantization.

    Returns codes (uint8, [N, K] in 0..2^bits-1), scales (fp32, [N, G]), zero points (uint8, [N, G]).
    `clip` (scalar or [N, G]) shrinks each group's range, as AWQ's clipping search does.
    """
    wg, k = _pad_to_groups(w.float(), group_size)
    qmax = 2**bits - 1
    mn = wg.amin(-1)
    mx = wg.amax(-1)
    if clip is not None:
        mn = mn * clip
        mx = mx * clip
    mn = torch.minimum(mn, torch.zeros_like(mn))
    mx = torch.maximum(mx, torch.zeros_like(mx))
    scale = ((mx - mn) / qmax).clamp(min=1e-10)
    zero = torch.round(-mn / scale).clamp(0, qmax)
    q = torch.round(wg / scale[..., None] + zero[..., None]).clamp(0, qmax)
    q = q.reshape(*w.shape[:-1], -1)[..., :k]
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def dequantize_asym(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Inverse of quantize_asym, in fp32."""
    k = q.shape[-1]
    g = k if group_size <= 0 else group_size
    s = scale.float().repeat_interleave(g, dim=-1)[..., :k]
    z = zero.float().repeat_interleave(g, dim=-1)[..., :k]
    return (q.float() - z) * s


def quantize_sym(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric RTN: int8 codes in [-(2^(b-1)-1), 2^(b-1)-1] and fp32 scales [N, G]."""
    wg, k = _pad_to_groups(w.float(), group_size)
    qmax = 2 ** (bits - 1) - 1
    scale = (wg.abs().amax(-1) / qmax).clamp(min=1e-10)
    q = torch.round(wg / scale[..., None]).clamp(-qmax, qmax)
    return q.reshape(*w.shape[:-1], -1)[..., :k].to(torch.int8), scale


def dequantize_sym(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    k = q.shape[-1]
    g = k if group_size <= 0 else group_size
    return q.float() * scale.float().repeat_interleave(g, dim=-1)[..., :k]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> [N, ceil(K/8)] int32, 8 nibbles per word (little end first)."""
    n, k = q.shape
    pad = (-k) % 8
    q = torch.nn.functional.pad(q.to(torch.int32), (0, pad)).view(n, -1, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (q << shifts).sum(-1, dtype=torch.int64).to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.uint32).view(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_int4: [N, ceil(K/8)] int32 -> [N, K] uint8 codes."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = (packed.unsqueeze(-1) >> shifts) & 0xF
    return q.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)
