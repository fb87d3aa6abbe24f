"""SmoothQuant+ (Pan et al., 2023): per-channel smoothing, then group-wise RTN weights (W4A16/W3A16).

Every foldable input (q/k/v, o, gate/up, down; see qserve.smoothing) gets
s_j = max|X_j|^a / max|W_j|^(1-a), with max|X_j| over all calibration tokens of the fp model and
max|W_j| over the consumer's column j. One `a` serves the whole model: each a in {0, 0.1, ..., 1}
is applied to every layer, the weights are fake-quantized to the stored grid, and the a whose
model has the least next-token loss on the first LOSS_SAMPLES calibration samples is kept. The
result is stored in the shared W4A16 format and served by the same weight-only linear as RTN.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qserve.calib import BlockStats, add_calib_args, calibrate_blocks, check_calib_bits, hf_tensors, prepare
from qserve.evaluate import samples_nll
from qserve.linear import register_quant_method
from qserve.model import CausalLM, DecoderLayer
from qserve.offline import Quantizer, linear_prefixes, register_quantizer, write_quantized
from qserve.quant_methods.rtn import quantize_linears, woq_config
from qserve.smoothing import ScaleGroup, fake_quant, fold, normalize, reduce_tied, scale_groups
from qserve.woq import WeightOnlyLinear

ALPHAS = tuple(i / 10 for i in range(11))
LOSS_SAMPLES = 8


@register_quant_method("qserve-smoothquant-plus")
class SmoothQuantPlusLinear(WeightOnlyLinear):
    """W4A16/W3A16 layer for SmoothQuant+ checkpoints (the smoothing is folded into the weights)."""


def smoothing_scales(group: ScaleGroup, x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^a / max|W|^(1-a) on the group's free channels."""
    x = reduce_tied(x_absmax, group, "amax").clamp(min=1e-5)
    wmax = reduce_tied(w.abs().amax(0), group, "amax").clamp(min=1e-5)
    return normalize(x.pow(alpha) / wmax.pow(1 - alpha))


def smooth_layer(layer: DecoderLayer, x_absmax: dict[str, torch.Tensor], alpha: float) -> None:
    """Compute every group's scales from the layer's current weights, then fold them all."""
    groups = scale_groups(layer)
    scales = [smoothing_scales(g, x_absmax[g.consumer], getattr(layer, g.consumer).weight.data, alpha)
              for g in groups]
    for g, s in zip(groups, scales):
        fold(layer, g, s)


def search_alpha(model: CausalLM, x_absmax: list[dict[str, torch.Tensor]], loss_ids: torch.Tensor,
                 bits: int, group_size: int) -> tuple[float, dict[str, float]]:
    """Model-wide alpha with the least calibration loss after smoothing and fake quantization.

    Leaves the model's weights as they were. Also reports the loss of plain RTN ("rtn").
    """
    original = [{k: v.clone() for k, v in layer.state_dict().items()} for layer in model.layers]

    def loss_with(alpha: float | None) -> float:
        for layer, state, stats in zip(model.layers, original, x_absmax):
            layer.load_state_dict(state)
            if alpha is not None:
                smooth_layer(layer, stats, alpha)
            for g in scale_groups(layer):
                lin = getattr(layer, g.consumer)
                lin.weight.data = fake_quant(lin.weight.data, bits, group_size)
        return samples_nll(model, loss_ids).mean

    losses = {}
    for a in tqdm([None, *ALPHAS], desc="smoothquant+ alpha search", unit="alpha", file=sys.stderr, dynamic_ncols=True):
        losses["rtn" if a is None else f"{a:.1f}"] = loss_with(a)
    for layer, state in zip(model.layers, original):
        layer.load_state_dict(state)
    best = min(ALPHAS, key=lambda a: losses[f"{a:.1f}"])
    return best, losses


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    bits, gs = args.bits, args.group_size
    check_calib_bits("smoothquant-plus", bits, gs)
    model, samples, info = prepare(src, args)
    x_absmax: list[dict[str, torch.Tensor]] = []

    def on_block(layer: DecoderLayer, stats: BlockStats) -> None:
        x_absmax.append({name: s.abs_max.clone() for name, s in stats.inputs.items()})

    calibrate_blocks(model, samples, on_block, desc="smoothquant+ stats")
    alpha, losses = search_alpha(model, x_absmax, samples[:LOSS_SAMPLES], bits, gs)
    for layer, stats in zip(model.layers, x_absmax):
        smooth_layer(layer, stats, alpha)
    tensors = hf_tensors(model)
    quantize_linears(tensors, linear_prefixes(model.cfg), bits, gs)
    qcfg = woq_config("qserve-smoothquant-plus", bits, gs, alpha=alpha, calibration=info)
    write_quantized(src, out, model.cfg, tensors, qcfg)
    return {"bits": bits, "group_size": gs, **info, "alpha": alpha, "calibration_loss": losses}


register_quantizer(Quantizer("smoothquant-plus", add_calib_args, run, "SmoothQuant+ smoothing + int4/int3 RTN (calibrated)"))
