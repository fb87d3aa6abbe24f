"""Token selection: greedy, or temperature / top-k / top-p sampling with a per-request seed."""

from __future__ import annotations

import torch

from qserve.engine_api import SamplingParams


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Pick the next token from one row of fp32 logits [V]."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, -1)
        keep = cum - sorted_p < params.top_p
        keep[..., 0] = True  # the most likely token always stays (top_p may underflow in fp32)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))
