"""Runtime overhead for the planner: RSS of `qserve serve` beyond its weights and KV cache.

Starts the server on each model, waits for /ready, sends one completion request (a prefill chunk
and some decode steps), then reads the process's VmRSS and VmHWM (peak) from /proc and
subtracts the weights (qserve.planner.resident_weight_bytes, the bytes the runtime holds) and
the KV cache. The KV cache is kept small (--max-model-len 512, --max-num-seqs 1; the prompt fills ~300 positions) because its
zero-filled pages only become resident when written; what remains is the interpreter, torch,
the tokenizer, FastAPI/uvicorn and the activations of a forward.

Run: python bench/runtime_overhead.py MODEL_DIR [MODEL_DIR ...]
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
from qserve.planner import int8_head_default, kv_bytes, resident_weight_bytes

MAX_LEN, SEQS = 512, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(model_dir: Path) -> dict[str, float]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qserve.cli", "serve", str(model_dir), "--port", str(port),
                             "--max-model-len", str(MAX_LEN), "--max-num-seqs", str(SEQS), "--log-level", "warning"],
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
        body = json.dumps({"model": model_id, "prompt": "The quick brown fox jumps over the lazy dog. " * 25,
                           "max_tokens": 16, "temperature": 0}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=300).read()
        rss, hwm = _status_kib(proc.pid, "VmRSS") * 1024, _status_kib(proc.pid, "VmHWM") * 1024
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
            "overhead_mib": (rss - weights - kv) / mib, "peak_overhead_mib": (hwm - weights - kv) / mib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, pid {os.getpid()}; MiB")
    print("| model | weights | KV | RSS | peak RSS | RSS - weights - KV | peak - weights - KV |")
    print("|---|---|---|---|---|---|---|")
    for m in args.models:
        r = measure(m)
        print(f"| {m.name} | {r['weights_mib']:.1f} | {r['kv_mib']:.2f} | {r['rss_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['overhead_mib']:.0f} | {r['peak_overhead_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
