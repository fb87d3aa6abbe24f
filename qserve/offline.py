"""Shared plumbing for the offline half of every method: which tensors are linear weights,
loading a checkpoint's tensors, writing a quantized checkpoint, and the quantizer registry that
`qserve quantize --method NAME` dispatches through."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qserve.checkpoint import Checkpoint, save_checkpoint
from qserve.config import ModelConfig, load_config
from qserve.errors import ConfigError

LINEAR_NAMES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


def linear_prefixes(cfg: ModelConfig) -> list[str]:
    """Prefixes (ending in '.') of every decoder linear, the ones methods quantize."""
    return [f"model.layers.{i}.{n}." for i in range(cfg.num_layers) for n in LINEAR_NAMES]


def load_fp_tensors(model_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = load_config(model_dir)
    if cfg.quantization_config:
        raise ConfigError(f"{model_dir} is already quantized ({cfg.quant_method}); start from an fp checkpoint")
    ckpt = Checkpoint(model_dir)
    return cfg, {n: ckpt.get(n) for n in ckpt.names()}


def write_quantized(
    src_dir: Path, out_dir: Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor],
    qcfg: dict[str, Any], dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Save a quantized checkpoint: float tensors in `dtype`, integer codes as they are."""
    out = {k: (v.to(dtype) if v.is_floating_point() and v.dtype not in (torch.float16,) else v)
           for k, v in tensors.items()}
    raw = dict(cfg.raw)
    raw["quantization_config"] = qcfg
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    save_checkpoint(Path(out_dir), out, raw, source_dir=src_dir)
    return Path(out_dir)


@dataclass(frozen=True)
class Quantizer:
    name: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Path, Path, argparse.Namespace], dict[str, Any]]
    help: str


_QUANTIZERS: dict[str, Quantizer] = {}


def register_quantizer(q: Quantizer) -> Quantizer:
    _QUANTIZERS[q.name] = q
    return q


def quantizers() -> dict[str, Quantizer]:
    from qserve.linear import _load_method_modules

    _load_method_modules()
    return dict(_QUANTIZERS)


def record_provenance(out_dir: Path, info: dict[str, Any]) -> None:
    """Keep what produced a checkpoint (method, options, timings) beside it."""
    path = Path(out_dir) / "qserve_quantize.json"
    path.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}, indent=2))
