"""Peak RSS of a serving process against the planner's estimate (weights + KV + overhead)."""

from __future__ import annotations

from pathlib import Path

import httpx
import torch

from server_util import start_cli_server
from qserve.config import load_config
from qserve.planner import RUNTIME_OVERHEAD, kv_bytes, resident_weight_bytes


def _status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def test_peak_rss_within_10_percent_of_plan(tiny_dir: Path) -> None:
    ctx, seqs = 512, 4
    proc, base = start_cli_server(tiny_dir, "--served-model-name", "tiny", "--max-model-len", str(ctx),
                                  "--max-num-seqs", str(seqs), "--log-level", "warning")
    try:
        for i in range(seqs):  # touch every slot's KV pages, as a full server would
            r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "fox " * 200,
                                                           "max_tokens": ctx - 260, "ignore_eos": True}, timeout=300)
            assert r.status_code == 200
        peak = _status_bytes(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    cfg = load_config(tiny_dir)
    plan = resident_weight_bytes(tiny_dir, torch.bfloat16) + kv_bytes(cfg, ctx, seqs, torch.bfloat16) + RUNTIME_OVERHEAD
    print(f"peak RSS {peak / 2**20:.0f} MiB, plan {plan / 2**20:.0f} MiB ({peak / plan:.2f}x)")
    assert abs(peak - plan) <= 0.10 * plan, (peak, plan)
