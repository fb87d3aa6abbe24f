"""CSKV on the tiny model: full rank reproduces the model, the bi-branch cache gives the same
logits in one pass, in chunks and in decode, continuous batching, byte counts, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from calib_util import rel_err, write_text
from engine_util import make_engine, run_many, tokens
from qserve.config import load_config
from qserve.engine_api import SamplingParams
from qserve.errors import ConfigError
from qserve.kvcache import Batch
from qserve.kvformats import kv_bytes_per_token, kv_cache_bytes, kv_window_bytes, make_kv_cache
from qserve.model import CausalLM, load_model
from qserve.quant_methods import cskv


def cskv_args(calib: Path, ratio: float, window: int = 8, bits: int = 16, steps: int = 0) -> argparse.Namespace:
    return argparse.Namespace(kv_ratio=ratio, window=window, feature_bits=bits, refine_steps=steps, refine_lr=1e-3,
                              refine_windows=4, calib=str(calib), samples=8, seq_len=64, seed=0)


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("cskv_calib") / "calib.txt")


@pytest.fixture(scope="module")
def cskv_half(tiny_dir: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cskv") / "half"
    info = cskv.run(tiny_dir, out, cskv_args(calib, 0.5, steps=10))
    assert info["rank"] == 32 and info["mean_rel_err_refined"] <= info["mean_rel_err_svd"]
    return out


def logits(model: CausalLM, ids: torch.Tensor, chunks: list[int], fmt: str = "auto", slot: int = 1) -> torch.Tensor:
    """All logits of ids [T], fed as prefill chunks of the given sizes (the rest one by one)."""
    cache = make_kv_cache(model, fmt, 2, 128)
    out, p = [], 0
    for n in chunks + [1] * (ids.numel() - sum(chunks)):
        out.append(model(ids[None, p:p + n], Batch.make([slot], [p], n), cache, all_logits=True)[0])
        p += n
    return torch.cat(out)


IDS = torch.arange(3, 63) % 500


def test_full_rank_equals_original_model(tiny_dir: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "full"
    info = cskv.run(tiny_dir, out, cskv_args(calib, 1.0, steps=5))
    assert info["rank"] == 64
    ref = logits(load_model(tiny_dir, torch.float32, 128), IDS, [60])
    model = load_model(out, torch.float32, 128)
    assert model.layers[0].kv_module is not None
    for chunks in ([60], [17, 30], [5]):  # one pass, chunked prefill, mostly decode
        assert rel_err(logits(model, IDS, chunks), ref) < 1e-4


def test_low_rank_bi_branch_is_consistent_and_compresses(tiny_dir: Path, cskv_half: Path) -> None:
    ref = logits(load_model(tiny_dir, torch.float32, 128), IDS, [60])
    model = load_model(cskv_half, torch.float32, 128)
    one = logits(model, IDS, [60])
    # the same visibility (window of exact keys per query) however the tokens arrive
    assert rel_err(logits(model, IDS, [13, 20]), one) < 1e-5
    assert rel_err(logits(model, IDS, [2], slot=0), one) < 1e-5
    # the first `window` positions see only exact keys; later ones see reconstructed ones
    w = 8
    assert rel_err(one[:w], ref[:w]) < 1e-5
    assert rel_err(one[w:], ref[w:]) > 1e-3
    # run with a dense format instead, the checkpoint is the uncompressed model
    assert rel_err(logits(model, IDS, [60], fmt="model"), ref) < 1e-5


def test_bytes_and_nbytes(cskv_half: Path, tiny_dir: Path) -> None:
    cfg = load_config(cskv_half)
    # per layer: 32 + 32 bf16 features; window: 8 tokens x K,V x 64 channels x 2 bytes x 2 layers
    assert kv_bytes_per_token(cfg, "cskv") == 2 * 64 * 2
    assert kv_window_bytes(cfg, "cskv") == 2 * 2 * 8 * 64 * 2
    model = load_model(cskv_half, torch.bfloat16, 100)
    cache = make_kv_cache(model, "auto", 3, 100)
    assert cache.nbytes() == kv_cache_bytes(cfg, "cskv", 100, 3)
    # planning a checkpoint not made yet: ratio 0.25 of 64 channels, int4 features in one group
    plain = load_config(tiny_dir)
    assert kv_bytes_per_token(plain, "cskv", cskv_ratio=0.25, feature_bits=4) == 2 * 2 * (8 + 4)
    assert kv_bytes_per_token(plain, "cskv", cskv_ratio=0.25) < kv_bytes_per_token(plain, "int4")


def test_engine_continuous_batching_with_int4_features(tiny_dir: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "f4"
    cskv.run(tiny_dir, out, cskv_args(calib, 0.5, bits=4))
    assert load_config(out).raw["kv_compression"]["feature_bits"] == 4
    solo = make_engine(out, dtype="float32", max_num_seqs=1, kv_format="cskv")
    batched = make_engine(out, dtype="float32", max_num_seqs=4, prefill_chunk=6, kv_format="cskv")
    try:
        tok = solo.tokenizer
        prompts = [tok("Numbers: 0 1 2 3" + " 4" * (3 * i))["input_ids"] for i in range(4)]
        params = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True)
        alone = [tokens(run_many(solo, [p], params)[0]) for p in prompts]
        together = [tokens(evs) for evs in run_many(batched, prompts, params)]
        assert together == alone and all(len(t) == 14 for t in alone)
    finally:
        solo.shutdown()
        batched.shutdown()


def test_rtn_on_top_of_cskv_serves(cskv_half: Path, tmp_path: Path) -> None:
    from conftest import quantize_dir

    out = quantize_dir(cskv_half, tmp_path / "rtn", "rtn", bits=8, group_size=-1)
    cfg = load_config(out)
    assert cfg.quant_method == "qserve-rtn" and cfg.raw["kv_compression"]["method"] == "cskv"
    ref = logits(load_model(cskv_half, torch.float32, 128), IDS, [60])
    assert rel_err(logits(load_model(out, torch.bfloat16, 128), IDS, [60]), ref) < 0.1


def test_bad_inputs_are_config_errors(tiny_dir: Path, calib: Path, tmp_path: Path, cskv_half: Path) -> None:
    with pytest.raises(ConfigError):
        cskv.run(tiny_dir, tmp_path / "x", cskv_args(calib, 0.0))
    with pytest.raises(ConfigError):
        cskv.run(tiny_dir, tmp_path / "x", cskv_args(calib, 0.5, bits=3))
    with pytest.raises(ConfigError):
        cskv.run(cskv_half, tmp_path / "x", cskv_args(calib, 0.5))  # already compressed
    with pytest.raises(ConfigError):  # the cskv format needs a CSKV checkpoint
        make_kv_cache(load_model(tiny_dir, torch.float32, 32), "cskv", 1, 32)


def test_planner_picks_cskv_for_long_context_and_server_serves_it(tiny_dir: Path, cskv_half: Path,
                                                                   tmp_path: Path) -> None:
    """A budget that holds bf16 KV at a short context but only CSKV KV at a long one: the planner
    switches to the CSKV variant as the context grows, and a server started on that budget serves
    it with a prompt longer than the short context. Perplexities are test fixtures."""
    import shutil

    import httpx

    from server_util import start_cli_server
    from qserve.planner import RUNTIME_OVERHEAD, kv_bytes, plan, record_quality, resident_weight_bytes
    from qserve.tokenizer import encode_text, load_tokenizer

    fam = tmp_path / "fam"
    shutil.copytree(tiny_dir, fam / "bf16")
    shutil.copytree(cskv_half, fam / "cskv")
    record_quality(fam / "bf16", 10.0, 4096, 256, 256)
    record_quality(fam / "cskv", 10.5, 4096, 256, 256)
    short, long, seqs, bf = 256, 2048, 8, torch.bfloat16
    cfg = load_config(fam / "cskv")

    def total(name: str, ctx: int) -> int:
        d = fam / name
        return resident_weight_bytes(d, bf) + kv_bytes(load_config(d), ctx, seqs, bf, "auto") + RUNTIME_OVERHEAD

    budget = max(total("bf16", short), total("cskv", long))
    assert total("bf16", long) > budget  # bf16 KV at the long context does not fit
    assert kv_bytes(cfg, long, seqs, bf, "auto") < 0.6 * kv_bytes(cfg, long, seqs, bf, "model")
    assert plan(fam, budget, short, seqs, kv_format="auto").choice.name == "bf16"
    assert plan(fam, budget, long, seqs, kv_format="auto").choice.name == "cskv"

    proc, base = start_cli_server(fam, "--memory-budget", str(budget), "--max-model-len", str(long),
                                  "--max-num-seqs", str(seqs), "--runtime-overhead", str(RUNTIME_OVERHEAD),
                                  "--admin-token", "kv-admin", "--log-level", "warning")
    try:
        status = httpx.get(base + "/admin/memory-budget", headers={"Authorization": "Bearer kv-admin"}).json()
        assert status["variant"] == "cskv"
        prompt = "the quick brown fox " * 300
        n_prompt = len(encode_text(load_tokenizer(fam / "cskv"), prompt))
        assert short < n_prompt < long - 16
        r = httpx.post(base + "/v1/completions", json={"model": "fam", "prompt": prompt, "max_tokens": 16,
                                                       "ignore_eos": True}, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 16,
                                     "total_tokens": n_prompt + 16}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
