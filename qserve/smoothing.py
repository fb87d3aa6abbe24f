"""Per-channel smoothing scales folded into a decoder layer: the part AWQ and SmoothQuant+ share.

A scale vector s on the input channels of the linears reading one activation x is free in exact
arithmetic: the consumer's weight columns are multiplied by s and the op producing x is divided
by s, so `W x = (W diag(s)) (diag(s)^-1 x)`. Four places in a Llama layer allow it:
- q/k/v after the input RMSNorm (the norm weight is divided),
- o_proj after v (v's output rows are divided; with grouped-query attention each kv head feeds
  several query heads, so o's input channels of the heads sharing a kv head share one scale),
- gate/up after the post-attention RMSNorm,
- down after up (up's rows are divided: silu(gate) * up is linear in up).
The methods differ only in how they choose s; see quant_methods/awq.py and smoothquant_plus.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qserve.model import DecoderLayer
from qserve.groupquant import num_groups


@dataclass(frozen=True)
class ScaleGroup:
    """One foldable place: `consumer` is the DecoderLayer attribute of the linear reading x."""

    consumer: str
    producer: tuple[torch.Tensor, ...]  # in-place views whose dim 0 runs over the free channels
    expand: torch.Tensor  # [consumer in_features] -> index of the free channel scaling it

    @property
    def num_free(self) -> int:
        return self.producer[0].shape[0]


def _rows(t: torch.Tensor | None, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    return () if t is None else (t.data[start:stop],)


def scale_groups(layer: DecoderLayer) -> list[ScaleGroup]:
    """The four foldable groups of `layer`, which must hold dense (fp) linears."""
    h, kvd, inter = layer.nh * layer.hd, layer.nkv * layer.hd, layer.inter
    qkv, gate_up = layer.qkv, layer.gate_up
    heads_per_kv = layer.nh // layer.nkv
    o_expand = ((torch.arange(layer.nh) // heads_per_kv)[:, None] * layer.hd + torch.arange(layer.hd)).reshape(-1)
    return [
        ScaleGroup("qkv", (layer.input_norm.weight.data,), torch.arange(qkv.in_features)),
        ScaleGroup("o_proj", _rows(qkv.weight, h + kvd, h + 2 * kvd) + _rows(qkv.bias, h + kvd, h + 2 * kvd), o_expand),
        ScaleGroup("gate_up", (layer.post_norm.weight.data,), torch.arange(gate_up.in_features)),
        ScaleGroup("down", _rows(gate_up.weight, inter, 2 * inter) + _rows(gate_up.bias, inter, 2 * inter),
                   torch.arange(inter)),
    ]


def reduce_tied(stat: torch.Tensor, group: ScaleGroup, how: str) -> torch.Tensor:
    """A per-consumer-channel statistic reduced ('mean' or 'amax') to the group's free channels."""
    out = torch.zeros(group.num_free, dtype=stat.dtype)
    return out.scatter_reduce(0, group.expand, stat, reduce=how, include_self=False)


def normalize(s: torch.Tensor) -> torch.Tensor:
    """Centre scales around 1 (geometric mean of the extremes); the fold is invariant to this."""
    return s / (s.max() * s.min()).sqrt()


def fold(layer: DecoderLayer, group: ScaleGroup, s_free: torch.Tensor) -> None:
    """Divide the producer by s and multiply the consumer's input columns by s, in place."""
    for t in group.producer:
        t.div_(s_free.view(-1, *([1] * (t.dim() - 1))).to(t.dtype))
    w = getattr(layer, group.consumer).weight.data
    w.mul_(s_free[group.expand].to(w.dtype))


def fake_quant(w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """The fp32 weight a checkpoint will hold after `quantize_weight` (asymmetric group-wise), bit
    for bit, computed without packing: searches call this hundreds of times per layer."""
    n, k = w.shape
    groups = num_groups(k, group_size)
    pad = groups * group_size - k
    wg = w.float()
    if pad:  # replicate the last column, as groupquant does, so padding never widens a range
        wg = torch.cat([wg, wg[:, -1:].expand(n, pad)], 1)
    wg = wg.view(n, groups, group_size)
    qmax = 2**bits - 1
    mn, mx = wg.amin(-1), wg.amax(-1)
    if clip is not None:
        mn, mx = mn * clip, mx * clip
    mn, mx = mn.clamp(max=0), mx.clamp(min=0)
    scale = ((mx - mn) / qmax).clamp(min=1e-10)
    zero = torch.round(-mn / scale).clamp(0, qmax).unsqueeze(-1)
    s16 = scale.to(torch.float16).float().unsqueeze(-1)  # the stored scale
    q = torch.round(wg / s16 + zero).clamp_(0, qmax)
    return q.sub_(zero).mul_(s16).view(n, -1)[:, :k]
