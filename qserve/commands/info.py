"""`qserve info`: what a checkpoint is, what it weighs, and which method reads it."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint (architecture, quantization, sizes)")
    p.add_argument("model", help="checkpoint directory or cached hub id")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qserve.checkpoint import Checkpoint, resolve_model_dir
    from qserve.config import load_config
    from qserve.linear import get_quant_method

    model_dir = resolve_model_dir(args.model)
    cfg = load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    if cfg.quant_method:
        get_quant_method(cfg.quant_method)  # fails clearly for a method this build cannot serve
    info = {
        "path": str(model_dir),
        "architecture": cfg.architecture,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_heads} (kv {cfg.num_kv_heads})",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "quantization": cfg.quantization_config or "none",
        "tensors": len(ckpt.index),
        "file_bytes": ckpt.total_bytes(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:>24}: {v}")
    return 0
