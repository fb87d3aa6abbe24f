"""Live resize over real HTTP: the memory budget changes while streams run; none fails."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from calib_util import calib_args, write_text
from server_util import start_cli_server
from qserve.config import load_config
from qserve.planner import RUNTIME_OVERHEAD, kv_bytes
from qserve.quant_methods.bitstack_stack import BitStackStack

CTX, SEQS = 256, 4
ADMIN = {"Authorization": "Bearer resize-admin"}


@pytest.fixture(scope="module")
def bitstack_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qserve.offline import quantizers

    tmp = tmp_path_factory.mktemp("resize")
    args = calib_args(write_text(tmp / "calib.txt"), samples=4, seq_len=32)
    args.blocks, args.rank = 6, 8
    quantizers()["bitstack"].run(tiny_dir, tmp / "tiny-bitstack", args)
    return tmp / "tiny-bitstack"


def _budget_for(stack: BitStackStack, n: int) -> int:
    """The budget whose plan loads exactly n blocks (int8 head: the engine's default for BitStack)."""
    kv = kv_bytes(load_config(stack.dir), CTX, SEQS, torch.bfloat16)
    return stack.resident_bytes(n, torch.bfloat16, int8_head=True) + kv + RUNTIME_OVERHEAD


def _gauges(base: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics").text):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def test_budget_lowered_and_raised_during_streams(bitstack_dir: Path) -> None:
    stack = BitStackStack(bitstack_dir)
    n_full, n_small = stack.total_blocks, stack.min_blocks + (stack.total_blocks - stack.min_blocks) // 4
    max_block = max(nb for *_, nb in stack.stack)
    proc, base = start_cli_server(bitstack_dir, "--served-model-name", "tiny", "--max-model-len", str(CTX),
                                  "--max-num-seqs", str(SEQS), "--memory-budget", str(_budget_for(stack, n_full)),
                                  "--runtime-overhead", str(RUNTIME_OVERHEAD),
                                  "--admin-token", "resize-admin", "--log-level", "warning")
    try:
        assert _gauges(base)["qserve_bitstack_blocks"] == n_full
        c = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        running = threading.Barrier(5)

        def stream(i: int) -> tuple[str | None, int]:
            out = c.completions.create(model="tiny", prompt=f"stream {i}", max_tokens=120, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
            finish, n = None, 0
            for k, ch in enumerate(out):
                if k == 2:
                    running.wait(timeout=60)
                n += len(ch.choices[0].text)
                finish = ch.choices[0].finish_reason or finish
            return finish, n

        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(stream, i) for i in range(4)]
            running.wait(timeout=60)
            sizes = []
            for n in (n_small, n_full):
                r = httpx.put(base + "/admin/memory-budget", json={"memory_budget": _budget_for(stack, n)},
                              headers=ADMIN, timeout=120)
                assert r.status_code == 200, r.text
                assert r.json()["blocks"] == n
                g = _gauges(base)
                assert g["qserve_bitstack_blocks"] == n
                assert abs(g["qserve_weight_bytes"] - stack.resident_bytes(n, torch.bfloat16, True)) <= max_block
                sizes.append(g["qserve_weight_bytes"])
            results = [f.result(timeout=120) for f in futs]
        assert sizes[0] < sizes[1]
        assert all(finish == "length" for finish, _ in results), results
        g = _gauges(base)
        assert g["qserve_resizes_total"] == 2 and g["qserve_resize_seconds_count"] == 2
        too_small = httpx.put(base + "/admin/memory-budget", json={"memory_budget": "1MiB"}, headers=ADMIN)
        assert too_small.status_code == 400
        err = too_small.json()["error"]
        assert err["code"] == "budget_too_small" and "smallest viable budget" in err["message"]
        ok = c.completions.create(model="tiny", prompt="after", max_tokens=4)
        assert ok.choices[0].finish_reason in ("length", "stop")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
