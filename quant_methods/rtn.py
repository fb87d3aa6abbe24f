"""RTN: round-to-nearest weight-only quantization (int4 per-group asymmetric, int8 per-channel).

The baseline every calibrated method must beat, and the first method through the seam. Its
runtime is the shared W4A16/W8A16 linear (qserve.woq).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from qserve.linear import register_quant_method
from qserve.offline import Quantizer, linear_prefixes, load_fp_tensors, register_quantizer, write_quantized
from qserve.woq import WeightOnlyLinear, check_woq_config, quantize_weight


@register_quant_method("qserve-rtn")
class RTNLinear(WeightOnlyLinear):
    """W4A16/W8A16 layer for RTN checkpoints."""


def woq_config(method: str, bits: int, group_size: int, **extra: Any) -> dict[str, Any]:
    return {"quant_method": method, "bits": bits, "group_size": group_size,
            "zero_point": bits != 8, "format": "qserve-woq-v1", **extra}


def quantize_linears(tensors: dict, prefixes: list[str], bits: int, group_size: int) -> None:
    """Replace each `<prefix>weight` in `tensors` with its stored quantized tensors, in place."""
    for p in prefixes:
        w = tensors.pop(p + "weight")
        tensors.update({p + k: v for k, v in quantize_weight(w, bits, group_size).items()})


def _add_args(p: argparse.ArgumentParser) -> None:
    pass


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    bits = args.bits
    gs = -1 if bits == 8 else args.group_size
    check_woq_config(bits, gs)
    cfg, tensors = load_fp_tensors(src)
    quantize_linears(tensors, linear_prefixes(cfg), bits, gs)
    write_quantized(src, out, cfg, tensors, woq_config("qserve-rtn", bits, gs))
    return {"bits": bits, "group_size": gs}


register_quantizer(Quantizer("rtn", _add_args, run, "round-to-nearest weight-only int4/int8"))
