"""Peak RSS of a serving process against the planner's estimate (weights + KV + overhead)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from server_util import start_cli_server
from qserve.config import load_config
from qserve.compilation import toolchain_problem
from qserve.planner import COMPILE_OVERHEAD, WORKING_OVERHEAD, kv_bytes, resident_weight_bytes
from qserve.sysmem import process_memory

ADMIN = {"Authorization": "Bearer memory-admin"}


@pytest.mark.parametrize("compile_mode", ["off", "auto"])
def test_peak_rss_within_10_percent_of_plan(tiny_dir: Path, compile_mode: str) -> None:
    """Weights and KV come from the planner's formulas (from headers, nothing loaded); the overhead
    is the one the server measured for itself at start (its baseline RSS + WORKING_OVERHEAD, and
    COMPILE_OVERHEAD when it compiles its decode step, with the compiler imported before measuring)."""
    ctx, seqs = 512, 4
    compiled = compile_mode == "auto" and toolchain_problem() is None
    proc, base = start_cli_server(tiny_dir, "--served-model-name", "tiny", "--max-model-len", str(ctx),
                                  "--max-num-seqs", str(seqs), "--admin-token", "memory-admin",
                                  "--log-level", "warning", "--compile", compile_mode)
    try:
        status = httpx.get(base + "/admin/memory-budget", headers=ADMIN).json()
        assert f"qserve_decode_step_compiled {1.0 if compiled else 0.0}" in httpx.get(base + "/metrics").text
        for i in range(seqs):  # touch every slot's KV pages, as a full server would
            r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "fox " * 200,
                                                           "max_tokens": ctx - 260, "ignore_eos": True}, timeout=300)
            assert r.status_code == 200
        peak = process_memory(proc.pid)["peak"]
        assert httpx.get(base + "/admin/memory-budget", headers=ADMIN).json()["peak_rss_bytes"] >= peak
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert status["overhead_source"] == ("measured + compile" if compiled else "measured")
    overhead = status["overhead_bytes"]
    baseline = overhead - WORKING_OVERHEAD - (COMPILE_OVERHEAD if compiled else 0)
    assert 0 < baseline <= status["rss_bytes"]  # measured before the weights were loaded
    weights = resident_weight_bytes(tiny_dir, torch.bfloat16)
    kv = kv_bytes(load_config(tiny_dir), ctx, seqs, torch.bfloat16)
    plan = weights + kv + overhead
    print(f"compile {compile_mode}: peak RSS {peak / 2**20:.0f} MiB, plan {plan / 2**20:.0f} MiB ({peak / plan:.2f}x): baseline "
          f"{baseline / 2**20:.0f}, weights {weights / 2**20:.1f}, KV {kv / 2**20:.1f} MiB")
    assert abs(peak - plan) <= 0.10 * plan, (peak, plan, baseline, weights, kv)


def test_runtime_overhead_bad_values_are_cli_errors(tiny_dir: Path, capsys) -> None:
    """A typo, or 'auto' (which as a budget means the machine's free memory), is refused."""
    from qserve.cli import main

    for value, says in (("lots", "invalid memory budget"), ("auto", "not 'auto'")):
        assert main(["serve", str(tiny_dir), "--memory-budget", "1GiB", "--runtime-overhead", value]) == 2
        err = capsys.readouterr().err
        assert "--runtime-overhead" in err and says in err and "Traceback" not in err
