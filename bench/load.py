"""Bounded load run against a qserve server on loopback: rising concurrency, fixed duration each.

    python bench/load.py [--model DIR | --tiny] [--levels 1 4 8 16 32] [--seconds 20] [--max-tokens 32]
    python bench/load.py --url http://127.0.0.1:8000 --model-name NAME   # an already running server

Prints, per concurrency level: requests ok / 429 / other errors, output tokens/s, and p50/p95/p99
of time to first token and inter-token latency, measured by streaming clients. Loopback only;
every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def one(client: httpx.AsyncClient, url: str, model: str, max_tokens: int, stats: dict) -> None:
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.7,
            "messages": [{"role": "user", "content": "Tell me about the history of Paris."}]}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                stats["429" if r.status_code == 429 else "err"] += 1
                return
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stats["err"] += 1
                    return
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - t0)
                    else:
                        stats["itl"].append(now - last)
                    last = now
                    stats["tokens"] += 1
            stats["ok"] += 1
    except httpx.HTTPError:
        stats["err"] += 1


async def level(url: str, model: str, conc: int, seconds: float, max_tokens: int) -> dict:
    stats = {"ok": 0, "429": 0, "err": 0, "tokens": 0, "ttft": [], "itl": []}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        async def worker() -> None:
            while time.perf_counter() < deadline:
                await one(client, url, model, max_tokens, stats)
                if stats["429"]:
                    await asyncio.sleep(0.05)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(conc)])
        stats["wall"] = time.perf_counter() - t0
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--model")
    ap.add_argument("--model-name", default="bench")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--server-args", default="--max-num-seqs 8 --max-waiting 16")
    args = ap.parse_args()
    proc = None
    url = args.url
    if url is None:
        from server_util import start_cli_server

        if args.tiny or not args.model:
            from qserve.tiny import make_tiny_model

            model = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
        else:
            model = Path(args.model)
        proc, url = start_cli_server(model, "--served-model-name", args.model_name, "--log-level", "warning",
                                     *args.server_args.split())
    try:
        print(f"server: {url}  model: {args.model or 'tiny'}  {args.seconds:.0f} s per level, "
              f"max_tokens {args.max_tokens}")
        print("| concurrency | ok | 429 | errors | out tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms |")
        print("|---|---|---|---|---|---|---|")
        for conc in args.levels:
            s = asyncio.run(level(url, args.model_name, conc, args.seconds, args.max_tokens))
            ttft = "/".join(f"{1000 * pct(s['ttft'], p):.0f}" for p in (50, 95, 99))
            itl = "/".join(f"{1000 * pct(s['itl'], p):.1f}" for p in (50, 95, 99))
            print(f"| {conc} | {s['ok']} | {s['429']} | {s['err']} | {s['tokens'] / s['wall']:.1f} | {ttft} | {itl} |",
                  flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
