"""Decode tokens/s of the embedded engine for fp32, bf16, int8 and int4 RTN of one model, one run.

    python bench/decode.py [MODEL_DIR] [--tokens 64] [--batches 1 8]

MODEL_DIR defaults to SmolLM2-135M from `qserve pull smollm2-135m` (the tiny random model with
--tiny). Variants are quantized into a temp dir first. Prints a Markdown table; numbers are
medians of --repeats runs; compare rows of one run only (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from qserve.engine import EngineConfig, TorchEngine
from qserve.engine_api import SamplingParams
from qserve.offline import quantizers
from qserve.tokenizer import load_tokenizer


def variants(src: Path, tmp: Path, group_sizes: list[int]) -> list[tuple[str, Path, str]]:
    out = [("fp32", src, "float32"), ("bf16", src, "bfloat16")]
    rtn = quantizers()["rtn"]
    d8 = tmp / "int8"
    rtn.run(src, d8, argparse.Namespace(bits=8, group_size=-1))
    out.append(("int8 (per-channel)", d8, "bfloat16"))
    for g in group_sizes:
        d = tmp / f"int4-g{g}"
        rtn.run(src, d, argparse.Namespace(bits=4, group_size=g))
        out.append((f"int4 g{g}", d, "bfloat16"))
    return out


async def _decode(eng: TorchEngine, batch: int, n: int, prompt: list[int]) -> tuple[float, float]:
    """(aggregate decode tok/s, time to first token) for `batch` concurrent greedy streams."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    firsts: list[float] = []

    async def one(i: int) -> None:
        first = True
        async for _ in eng.submit(f"b{i}", prompt, params):
            if first:
                firsts.append(time.perf_counter())
                first = False

    await asyncio.gather(*[one(i) for i in range(batch)])
    t1 = time.perf_counter()
    t_first = max(firsts)
    return batch * (n - 1) / (t1 - t_first), min(firsts) - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--group-sizes", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    args = ap.parse_args()
    if args.tiny:
        from qserve.tiny import make_tiny_model

        src = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    elif args.model:
        src = Path(args.model)
    else:
        from qserve.pull import pull

        src = pull("smollm2-135m")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, d, dtype in variants(src, Path(tmp), args.group_sizes):
            eng = TorchEngine(d, name, load_tokenizer(d), EngineConfig(
                dtype=dtype, max_num_seqs=max(args.batches), max_model_len=args.prompt_len + args.tokens + 8))
            eng.start()
            prompt = list(range(100, 100 + args.prompt_len))
            row = [name, f"{eng.info().weight_bytes / 1e6:.1f}"]
            for b in args.batches:
                asyncio.run(_decode(eng, b, 8, prompt))  # warm-up
                runs = [asyncio.run(_decode(eng, b, args.tokens, prompt)) for _ in range(args.repeats)]
                tps = statistics.median(r[0] for r in runs)
                row += [f"{tps:.1f}", f"{tps / b:.1f}"]
            eng.shutdown()
            rows.append(row)
            print(f"done {name}", file=sys.stderr)
    head = ["variant", "weight MB"] + [x for b in args.batches for x in (f"b{b} tok/s", f"b{b} per-stream")]
    print(f"model: {src}  decode tokens: {args.tokens}  prompt: {args.prompt_len}  threads: "
          f"{__import__('torch').get_num_threads()}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
