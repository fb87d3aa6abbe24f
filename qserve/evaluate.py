"""Perplexity of any checkpoint our loader serves, with a sliding window.

Windows of `context` tokens start every `stride` tokens; each token is scored once, by the
first window that sees it with at least one token before it (the Hugging Face recipe: with
stride < context every scored token also gets `context - stride` tokens of extra history).
The first token of the text, and with stride == context the first token of every window, is
never a target. Everything runs through our CausalLM, so every registered method is measured by
the same code that serves it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from qserve.calib import encode_texts
from qserve.config import load_config
from qserve.errors import ConfigError
from qserve.kvcache import Batch, KVCache
from qserve.model import CausalLM, load_model


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) over `tokens` scored tokens."""

    total: float = 0.0
    tokens: int = 0

    def add(self, other: "NLL") -> None:
        self.total += other.total
        self.tokens += other.tokens

    @property
    def mean(self) -> float:
        return self.total / max(self.tokens, 1)

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean)


def _cache(model: CausalLM, max_len: int) -> KVCache:
    c = model.cfg
    return KVCache(c.num_layers, 1, max_len, c.num_kv_heads, c.head_dim, model.dtype)


def window_nll(model: CausalLM, cache: KVCache, ids: torch.Tensor, first_target: int) -> NLL:
    """NLL of ids[first_target:] given everything before it in the window ids [T]."""
    batch = Batch.make([0], [0], ids.numel())
    logits = model(ids[None], batch, cache, all_logits=True)[0]
    targets = ids[first_target:]
    loss = F.cross_entropy(logits[first_target - 1:-1], targets, reduction="sum")
    return NLL(float(loss), targets.numel())


def sliding_nll(model: CausalLM, ids: torch.Tensor, context: int, stride: int) -> NLL:
    """NLL of a 1-D token stream scored with windows of `context` tokens every `stride` tokens."""
    n = ids.numel()
    if context < 2 or not 1 <= stride <= context:
        raise ConfigError(f"need context >= 2 and 1 <= stride <= context, got context {context}, stride {stride}")
    if n < 2:
        raise ConfigError("the evaluation text has fewer than 2 tokens")
    cache = _cache(model, min(context, n))
    out = NLL()
    begin, prev_end = 0, 0
    while True:
        end = min(begin + context, n)
        first = max(prev_end, begin + 1) - begin
        out.add(window_nll(model, cache, ids[begin:end], first))
        prev_end = end
        if end == n:
            return out
        begin += stride


def samples_nll(model: CausalLM, samples: torch.Tensor) -> NLL:
    """NLL of independent sequences [N, T], each scored from its second token."""
    cache = _cache(model, samples.shape[1])
    out = NLL()
    for row in samples:
        out.add(window_nll(model, cache, row, 1))
    return out


@dataclass
class EvalRow:
    model: str
    method: str
    bits: int | None
    group_size: int | None
    weight_bytes: int
    nll: NLL
    seconds: float

    def markdown(self) -> str:
        bits = "-" if self.bits is None else str(self.bits)
        gs = "-" if self.group_size is None else str(self.group_size)
        return (f"| {self.model} | {self.method} | {bits} | {gs} | {self.weight_bytes / 2**20:.1f} | "
                f"{self.nll.tokens} | {self.nll.perplexity:.3f} | {self.seconds:.0f} |")


MARKDOWN_HEADER = ("| model | method | bits | group | weight MiB | tokens scored | perplexity | seconds |\n"
                   "|---|---|---|---|---|---|---|---|")


def evaluate_dir(model_dir: Path, texts: list[str], context: int, stride: int, max_tokens: int | None,
                 dtype: torch.dtype, name: str | None = None) -> EvalRow:
    """Load one checkpoint, tokenize the texts with its tokenizer, and measure perplexity."""
    cfg = load_config(model_dir)
    ids = encode_texts(model_dir, texts)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype, min(context, ids.numel()))
    nll = sliding_nll(model, ids, context, stride)
    qc = cfg.quantization_config or {}
    return EvalRow(
        model=name or Path(model_dir).name, method=qc.get("quant_method", "fp"),
        bits=qc.get("bits"), group_size=qc.get("group_size"), weight_bytes=model.weight_bytes(),
        nll=nll, seconds=time.perf_counter() - t0,
    )
