"""Runtime overhead for the planner: RSS of `qserve serve` beyond its weights and KV cache.

Starts the server on each model, waits for /ready, reads the baseline the server measured for
itself (RSS once the serving stack and tokenizer are loaded, from /admin/memory-budget), sends
SEQS completion requests that fill every KV slot (--max-model-len 512), then reads VmRSS and
VmHWM (peak) from /proc. Reported: the peak less weights (qserve.planner.resident_weight_bytes,
the bytes the runtime holds) and KV ("overhead", what RUNTIME_OVERHEAD estimates offline), and
that less the baseline ("working": model-load transients and the activations of requests, what
WORKING_OVERHEAD allows for), with the decode step compiled or not (the baseline of a compiling
server includes the compiler's imports; COMPILE_OVERHEAD allows for the compile itself); and the
peak against the server's own plan (weights + KV + its overhead).

Run: python bench/runtime_overhead.py MODEL_DIR [MODEL_DIR ...] [--compile off auto]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from qserve.config import load_config
from qserve.planner import COMPILE_OVERHEAD, WORKING_OVERHEAD, int8_head_default, kv_bytes, resident_weight_bytes
from qserve.sysmem import process_memory

MAX_LEN, SEQS = 512, 4
ADMIN = "overhead-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model_dir: Path, compile_mode: str) -> dict[str, float]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qserve.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-model-len", str(MAX_LEN), "--max-num-seqs", str(SEQS), "--admin-token", ADMIN,
                             "--log-level", "warning", "--compile", compile_mode],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("server did not become ready")
        model_id = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        status = urllib.request.Request(base + "/admin/memory-budget", headers={"Authorization": f"Bearer {ADMIN}"})
        st = json.load(urllib.request.urlopen(status))
        overhead = st["overhead_bytes"]
        baseline = overhead - WORKING_OVERHEAD - (COMPILE_OVERHEAD if "compile" in st["overhead_source"] else 0)
        body = json.dumps({"model": model_id, "prompt": "fox " * 200, "max_tokens": MAX_LEN - 260,
                           "ignore_eos": True, "temperature": 0}).encode()
        for _ in range(SEQS):
            req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=600).read()
        mem = process_memory(proc.pid)
        rss, hwm = mem["rss"], mem["peak"]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    cfg = load_config(model_dir)
    if cfg.quant_method == "qserve-bitstack":  # blocks + the rest + scratch, all blocks loaded
        from qserve.quant_methods.bitstack_stack import BitStackStack

        stack = BitStackStack(model_dir)
        weights = stack.resident_bytes(stack.total_blocks, torch.bfloat16, int8_head_default(cfg))
    else:
        weights = resident_weight_bytes(model_dir, torch.bfloat16, int8_head_default(cfg))
    kv = kv_bytes(cfg, MAX_LEN, SEQS, torch.bfloat16)
    mib = 2**20
    return {"weights_mib": weights / mib, "kv_mib": kv / mib, "rss_mib": rss / mib, "peak_mib": hwm / mib,
            "baseline_mib": baseline / mib, "peak_overhead_mib": (hwm - weights - kv) / mib,
            "working_mib": (hwm - weights - kv - baseline) / mib, "plan_mib": (weights + kv + overhead) / mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--compile", nargs="+", default=["off", "auto"], help="`qserve serve --compile` modes to run")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, pid {os.getpid()}; MiB")
    print("| model | --compile | weights | KV | baseline | RSS | peak RSS | overhead = peak - weights - KV | "
          "working = overhead - baseline | plan | peak / plan |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for m in args.models:
        for mode in args.compile:
            r = measure(m, mode)
            print(f"| {m.name} | {mode} | {r['weights_mib']:.1f} | {r['kv_mib']:.2f} | {r['baseline_mib']:.0f} | "
                  f"{r['rss_mib']:.0f} | {r['peak_mib']:.0f} | {r['peak_overhead_mib']:.0f} | {r['working_mib']:.0f} | "
                  f"{r['plan_mib']:.0f} | {r['peak_mib'] / r['plan_mib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
