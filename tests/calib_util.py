"""Helpers for the calibrated-method tests (AWQ, SmoothQuant+, eval) on the tiny random model."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch

from qserve.kvcache import Batch, KVCache
from qserve.model import CausalLM


def write_text(path: Path, words: int = 4000, seed: int = 0) -> Path:
    """A deterministic English-ish text (the tiny tokenizer's own vocabulary, shuffled)."""
    from qserve.tiny import _TEXT

    vocab = _TEXT.split()
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(vocab) for _ in range(20)) for _ in range(words // 20)]
    path.write_text("\n".join(lines))
    return path


def calib_args(calib: Path, bits: int = 4, group_size: int = 32, samples: int = 8, seq_len: int = 64) -> argparse.Namespace:
    return argparse.Namespace(bits=bits, group_size=group_size, calib=str(calib), samples=samples,
                              seq_len=seq_len, seed=0)


def all_logits(model: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] of one sequence ids [T] as a fresh prefill."""
    c = model.cfg
    cache = KVCache(c.num_layers, 1, ids.numel(), c.num_kv_heads, c.head_dim, model.dtype)
    return model(ids[None], Batch.make([0], [0], ids.numel()), cache, all_logits=True)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
