"""AWQ: activation-aware weight quantization (Lin et al., 2023), W4A16 / W3A16 group-wise.

Offline, per decoder block (qserve.calib drives the blocks, qserve.smoothing folds the scales):
1. for each group of linears sharing an input (q/k/v, o, gate/up, down), grid-search alpha in
   {0, 0.05, ..., 0.95}: s = mean|x|^alpha (normalised), quantize W·diag(s), and keep the alpha
   whose group output Q(W·diag(s))·diag(s)^-1·x has the least MSE against W·x. alpha = 0 is
   plain RTN, so the search never does worse than RTN on the calibration data;
2. fold s into the previous op;
3. per output row and weight group, search a clipping ratio in {1, 0.95, ..., 0.5} of the
   group's range on the group's partial-output MSE (q/k rows are left unclipped, as in the
   authors' code: their error shows up through the attention scores, not the output MSE).
Output MSEs come from the inputs' second moment E[x xᵀ] over all calibration tokens (exact
for a linear's output MSE, and free per candidate). The next block is calibrated on the fp
outputs of this one. The result is stored in the shared W4A16 format and served by the same
weight-only linear as RTN.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qserve.calib import BlockStats, add_calib_args, calibrate_blocks, check_calib_bits, hf_tensors, prepare, unfuse_rows
from qserve.groupquant import num_groups
from qserve.linear import register_quant_method
from qserve.model import DecoderLayer
from qserve.offline import Quantizer, register_quantizer, write_quantized
from qserve.quant_methods.rtn import woq_config
from qserve.smoothing import ScaleGroup, fake_quant, fold, normalize, reduce_tied, scale_groups
from qserve.woq import WeightOnlyLinear, quantize_weight

ALPHAS = tuple(i / 20 for i in range(20))
CLIP_RATIOS = tuple(1 - i / 20 for i in range(11))


@register_quant_method("qserve-awq")
class AWQLinear(WeightOnlyLinear):
    """W4A16/W3A16 layer for AWQ checkpoints (the scales are already folded into the weights)."""


def output_mse(delta: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """Mean squared output error of a weight change delta [N, K] on inputs with E[x xᵀ] = moment."""
    return ((delta @ moment) * delta).sum(1).mean()


def search_scale(w: torch.Tensor, mean_abs: torch.Tensor, moment: torch.Tensor, group: ScaleGroup,
                 bits: int, group_size: int) -> tuple[float, torch.Tensor]:
    """Best alpha and its free-channel scales for one group (the first alpha wins ties)."""
    x_free = reduce_tied(mean_abs, group, "mean")
    best: tuple[float, float, torch.Tensor] | None = None
    for alpha in ALPHAS:
        s_free = normalize(x_free.pow(alpha).clamp(min=1e-4))
        s = s_free[group.expand]
        loss = float(output_mse(fake_quant(w * s, bits, group_size) / s - w, moment))
        if best is None or loss < best[0]:
            best = (loss, alpha, s_free)
    return best[1], best[2]


def search_clip(w: torch.Tensor, moment: torch.Tensor, bits: int, group_size: int,
                rows: slice = slice(None)) -> torch.Tensor:
    """Clip ratio [N, G] per row and weight group minimising that group's partial-output MSE.

    Rows outside `rows` keep ratio 1.
    """
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    m = F.pad(moment, (0, pad, 0, pad))
    blocks = torch.stack([m[i * group_size:(i + 1) * group_size, i * group_size:(i + 1) * group_size]
                          for i in range(g)])  # [G, gs, gs]
    sub = w[rows]
    best_err = torch.full((sub.shape[0], g), float("inf"))
    best = torch.ones(sub.shape[0], g)
    for r in CLIP_RATIOS:
        d = F.pad(fake_quant(sub, bits, group_size, r) - sub, (0, pad)).view(sub.shape[0], g, group_size)
        err = (torch.einsum("ngk,gkl->ngl", d, blocks) * d).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    clip = torch.ones(n, g)
    clip[rows] = best
    return clip


def awq_block(layer: DecoderLayer, stats: BlockStats, bits: int, group_size: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Scale search, fold and clip search for one block; returns alphas and clip ratios per linear."""
    groups = scale_groups(layer)
    chosen = {}
    for grp in groups:
        st = stats.inputs[grp.consumer]
        w = getattr(layer, grp.consumer).weight.data
        chosen[grp.consumer] = search_scale(w, st.mean_abs, st.second_moment, grp, bits, group_size)
    clips = {}
    for grp in groups:
        fold(layer, grp, chosen[grp.consumer][1])
    for grp in groups:
        s = chosen[grp.consumer][1][grp.expand]
        moment = stats.inputs[grp.consumer].second_moment / torch.outer(s, s)
        q_and_k = layer.split[0] + layer.split[1]
        rows = slice(q_and_k, None) if grp.consumer == "qkv" else slice(None)
        clips[grp.consumer] = search_clip(getattr(layer, grp.consumer).weight.data, moment, bits, group_size, rows)
    return {name: a for name, (a, _) in chosen.items()}, clips


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    bits, gs = args.bits, args.group_size
    check_calib_bits("awq", bits, gs)
    model, samples, info = prepare(src, args)
    alphas: list[dict[str, float]] = []
    clips: list[dict[str, torch.Tensor]] = []

    def on_block(layer: DecoderLayer, stats: BlockStats) -> None:
        a, c = awq_block(layer, stats, bits, gs)
        alphas.append(a)
        clips.append(c)

    calibrate_blocks(model, samples, on_block, gram=True, propagate="original", desc="awq")
    tensors = hf_tensors(model)
    for i, layer in enumerate(model.layers):
        for attr, clip in clips[i].items():
            for name, c in unfuse_rows(layer, attr, clip).items():
                p = f"model.layers.{i}.{name}."
                tensors |= {p + k: v for k, v in quantize_weight(tensors.pop(p + "weight"), bits, gs, c).items()}
    write_quantized(src, out, model.cfg, tensors, woq_config("qserve-awq", bits, gs, calibration=info))
    return {"bits": bits, "group_size": gs, **info, "alphas": alphas}


register_quantizer(Quantizer("awq", add_calib_args, run, "AWQ activation-aware int4/int3 (calibrated)"))
