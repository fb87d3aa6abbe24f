"""The embedded engine: exact greedy equality with transformers, continuous batching, sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_util import make_engine, needs_compiler, run_many, tokens
from qserve.engine_api import SamplingParams

PROMPTS = ["Hello, world. What is the capital", "The quick brown fox", "Numbers: 0 1 2 3",
           "qserve serves large language models within a memory budget. Quantization stores weights"]


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    gen = out[0, len(ids):].tolist()
    eos = hf.generation_config.eos_token_id
    return gen[:-1] if gen and gen[-1] == eos else gen  # qserve reports EOS as a finish, not a token


@pytest.mark.parametrize("compile_mode", ["off", pytest.param("on", marks=needs_compiler)])
@pytest.mark.parametrize("fixture", ["tiny_dir", "tiny_tied_dir"])
def test_greedy_equals_transformers(fixture: str, compile_mode: str, request: pytest.FixtureRequest) -> None:
    """Eager, and with the decode step compiled (qserve.compilation)."""
    model_dir = request.getfixturevalue(fixture)
    eng = make_engine(model_dir, dtype="float32", compile=compile_mode)
    try:
        assert eng.compile_status.startswith(compile_mode)
        tok = eng.tokenizer
        prompts = [tok(p)["input_ids"] for p in PROMPTS]
        got = run_many(eng, prompts, SamplingParams(max_tokens=24, temperature=0.0))
        for ids, evs in zip(prompts, got):
            ref = hf_greedy(model_dir, ids, 24)
            assert tokens(evs) == ref
            assert evs[-1].finish_reason == ("length" if len(ref) == 24 else "stop")
    finally:
        eng.shutdown()


@pytest.mark.parametrize("compile_mode", ["off", pytest.param("on", marks=needs_compiler)])
def test_concurrent_equals_alone_and_chunked_prefill(tiny_dir: Path, compile_mode: str) -> None:
    """8 concurrent requests (batched decode, chunked prefill) give each one's solo output; with
    the batched engine's decode compiled, against the eager solo engine."""
    solo = make_engine(tiny_dir, dtype="float32", max_num_seqs=1)
    batched = make_engine(tiny_dir, dtype="float32", max_num_seqs=8, prefill_chunk=5, compile=compile_mode)
    try:
        tok = solo.tokenizer
        prompts = [tok(PROMPTS[i % 4] + " x" * i)["input_ids"] for i in range(8)]
        params = SamplingParams(max_tokens=16 + 2 * 0, temperature=0.0, ignore_eos=True)
        alone = [tokens(run_many(solo, [p], params)[0]) for p in prompts]
        together = [tokens(evs) for evs in run_many(batched, prompts, params)]
        assert together == alone
        assert batched.stats()["running"] == 0
    finally:
        solo.shutdown()
        batched.shutdown()


def test_more_requests_than_slots_queue_fcfs(tiny_dir: Path) -> None:
    eng = make_engine(tiny_dir, dtype="float32", max_num_seqs=2)
    try:
        ids = eng.tokenizer("hello")["input_ids"]
        out = run_many(eng, [ids] * 6, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
        assert len({tuple(tokens(e)) for e in out}) == 1 and all(len(tokens(e)) == 5 for e in out)
    finally:
        eng.shutdown()


def test_sampling_seeded_reproducible(tiny_dir: Path) -> None:
    eng = make_engine(tiny_dir, dtype="float32")
    try:
        ids = eng.tokenizer("hello")["input_ids"]
        p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
        a, b = run_many(eng, [ids, ids], p)
        assert tokens(a) == tokens(b)
        c = run_many(eng, [ids], SamplingParams(**{**p.__dict__, "seed": 8}))[0]
        assert tokens(c) != tokens(a)
    finally:
        eng.shutdown()


def test_stop_string_truncates_and_streams_consistently(tiny_dir: Path) -> None:
    eng = make_engine(tiny_dir, dtype="float32")
    try:
        ids = eng.tokenizer("Hello, world.")["input_ids"]
        free = run_many(eng, [ids], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
        text = "".join(e.text for e in free)
        stop = text[5:8]
        assert stop and stop not in text[:5]
        got = run_many(eng, [ids], SamplingParams(max_tokens=30, temperature=0.0, stop=(stop,), ignore_eos=True))[0]
        assert "".join(e.text for e in got) == text[: text.index(stop)]
        assert got[-1].finish_reason == "stop"
    finally:
        eng.shutdown()


def test_rtn_checkpoints_serve_close_to_fp(tiny_dir: Path, tiny_rtn4_dir: Path, tiny_rtn8_dir: Path) -> None:
    """Quantized checkpoints load through the same engine; int8 logits stay near fp."""
    from qserve.kvcache import Batch, KVCache
    from qserve.model import load_model

    ids = torch.tensor([list(range(3, 40))])
    ref = load_model(tiny_dir, torch.float32, 64)
    out = {}
    for name, d in (("fp", tiny_dir), ("w8", tiny_rtn8_dir), ("w4", tiny_rtn4_dir)):
        m = ref if name == "fp" else load_model(d, torch.bfloat16, 64)
        c = KVCache(2, 1, 64, 2, 32, m.dtype)
        out[name] = m(ids, Batch.make([0], [0], ids.shape[1]), c, all_logits=True)
    scale = float(out["fp"].abs().max())
    assert float((out["w8"] - out["fp"]).abs().max()) < 0.1 * scale
    assert float((out["w4"] - out["fp"]).abs().max()) < 0.5 * scale
    assert float((out["w8"] - out["fp"]).abs().mean()) < float((out["w4"] - out["fp"]).abs().mean())
