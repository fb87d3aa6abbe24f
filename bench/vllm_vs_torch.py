"""Prefill and decode tokens/s of `--engine torch` vs `--engine vllm` on one model, bf16 and w4.

    .venv-vllm/bin/python bench/vllm_vs_torch.py [MODEL_DIR] [--batches 1 8] [--eager]

MODEL_DIR defaults to SmolLM2-135M from `qserve pull smollm2-135m`; w4 is RTN int4 (group 128
by default: hidden 576 leaves a ragged last group, padded by both engines). Each (engine,
variant) runs in its own process, so vLLM's thread binding never touches the torch engine's
run. Per batch size: `batch` identical-length prompts submitted together; prefill tok/s = prompt
tokens / time to the last first token; decode tok/s = generated tokens after each stream's
first / time from the last first token to the end. One warm-up request first (vLLM compiles
then, unless --eager; ours compiles its decode step at start, unless --eager). One run: compare
rows of one run only (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qserve.engine_api import Engine, SamplingParams
from qserve.tokenizer import load_tokenizer


def build(engine: str, model_dir: Path, dtype: str, args: argparse.Namespace) -> Engine:
    tok = load_tokenizer(model_dir)
    seqs = max(args.batches)
    if engine == "vllm":
        from qserve.vllm_engine import VLLMEngine

        ns = argparse.Namespace(max_model_len=args.max_model_len, max_num_seqs=seqs, dtype=dtype,
                                enforce_eager=args.eager, threads=args.threads)
        return VLLMEngine(model_dir, model_dir.name, tok, ns)
    from qserve.engine import EngineConfig, TorchEngine

    return TorchEngine(model_dir, model_dir.name, tok,
                       EngineConfig(max_model_len=args.max_model_len, max_num_seqs=seqs, dtype=dtype,
                                    threads=args.threads, compile="off" if args.eager else "auto"))


async def one_batch(eng: Engine, prompts: list[list[int]], n: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) for these prompts submitted together, greedy, n tokens each."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    firsts: list[float] = []

    async def one(i: int, p: list[int]) -> None:
        first = True
        async for _ in eng.submit(f"r{i}-{t0}", p, params):
            if first:
                firsts.append(time.perf_counter())
                first = False

    await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    t1 = time.perf_counter()
    prefill = sum(len(p) for p in prompts) / (max(firsts) - t0)
    return prefill, len(prompts) * (n - 1) / (t1 - max(firsts))


def run_one(engine: str, model_dir: Path, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    eng = build(engine, model_dir, dtype, args)
    t0 = time.perf_counter()
    eng.start()
    start_s = time.perf_counter() - t0
    base = list(range(1000, 1000 + args.prompt_len))

    async def main() -> list[dict[str, float]]:
        await one_batch(eng, [base[:16]], 4)  # warm-up (and vLLM's compile)
        rows = []
        for b in args.batches:
            # distinct first tokens, so vLLM's prefix cache cannot skip the prefill
            prompts = [[2000 + i + 10 * (args.batches.index(b))] + base[1:] for i in range(b)]
            pre, dec = await one_batch(eng, prompts, args.tokens)
            rows.append({"batch": b, "prefill": pre, "decode": dec})
        return rows

    try:
        rows = asyncio.run(main())
    finally:
        eng.shutdown()
    return {"start_s": start_s, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per stream")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="both engines without torch.compile")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both engines (default: all)")
    ap.add_argument("--engines", nargs="+", default=["torch", "vllm"])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vllm_vs_torch.md")
    ap.add_argument("--one", nargs=3, metavar=("ENGINE", "DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.one[2], args)))
        return 0
    if args.model:
        src = Path(args.model)
    else:
        from qserve.pull import pull

        src = pull("smollm2-135m")
    passthrough = ["--batches", *map(str, args.batches), "--tokens", str(args.tokens), "--prompt-len",
                   str(args.prompt_len), "--max-model-len", str(args.max_model_len)] + (["--eager"] if args.eager else []) \
        + ([] if args.threads is None else ["--threads", str(args.threads)])
    lines = [f"model {src.name}, prompt {args.prompt_len} tokens, {args.tokens} generated per stream, "
             f"w4 = RTN int4 g{args.group_size}, both engines {'eager' if args.eager else 'compiled'}, "
             f"threads {args.threads or 'all'}, load average {os.getloadavg()[0]:.1f}", "",
             "| engine | variant | batch | prefill tok/s | decode tok/s | start s |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        from qserve.offline import quantizers

        w4 = Path(tmp) / f"w4-g{args.group_size}"
        quantizers()["rtn"].run(src, w4, argparse.Namespace(bits=4, group_size=args.group_size))
        for variant, d in (("bf16", src), ("w4", w4)):
            for engine in args.engines:
                cmd = [sys.executable, __file__, *passthrough, "--one", engine, str(d), "bfloat16"]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    print(res.stderr[-3000:], file=sys.stderr)
                    lines.append(f"| {engine} | {variant} | - | failed | failed | - |")
                    continue
                out = json.loads(res.stdout.strip().splitlines()[-1])
                for r in out["rows"]:
                    lines.append(f"| {engine} | {variant} | {r['batch']} | {r['prefill']:.0f} | {r['decode']:.1f} "
                                 f"| {out['start_s']:.0f} |")
                print(lines[-1], flush=True)
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
