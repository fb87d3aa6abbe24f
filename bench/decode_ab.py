"""Batch-1 decode of several engines measured in alternation, for ratios a noisy machine cannot skew.

A run of bench/speed.py measures each engine in turn, minutes apart; on a shared host the
memory bandwidth a decode streams from changes over minutes, and single rows moved by 30%
between two runs. Here every engine stays loaded in its own process and each round runs one
decode of each (the order rotates every round), so each round gives a ratio measured within
seconds; the table reports per-engine medians and the median of the per-round ratios.

    python bench/decode_ab.py [MODEL_DIR] [--rounds 15] [--tokens 64] [--threads 2] [--prompt 32]
                              [--out bench/results/decode_ab.md]

Engines: ours (int4 g32 and bf16, decode step compiled and eager; every engine here is single-stream,
max_num_seqs 1, so compiled bf16 lays its weights out in tiles; "ours bf16 plain" is the same engine
on plain rows, and "ours bf16 packed" with the packed layout a multi-stream server uses),
`transformers.generate` bf16, and llama.cpp on the model's Q4_1 GGUF when `llama-cpp-python` is
installed. One more row is a bound, not an engine: "bf16 weight stream" runs only the bf16 model's
matmuls, each linear and the head once per token with nothing between them, as oneDNN-packed
matmul calls and as one compiled graph of in-graph GEMVs on plain and on tiled weights, and reports
the fastest. A bf16 decode must read every weight once
per token, so no bf16 engine here decodes much faster than that row (in the same round), and its
ratio to transformers is about the largest bf16 speed-up there is to have.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the engines' open/decode helpers)

RESULTS = Path(__file__).resolve().parent / "results"


def child(spec: str, tokens: int, threads: int, prompt: int) -> None:
    """Serve decode measurements on stdin/stdout: a line in, one tok/s figure out."""
    kind, path, dtype, mode, *layout = spec.split("::")
    if kind == "qserve":
        eng = speed.open_engine(path, dtype, 1, prompt + tokens + 8, 512, threads, mode, *layout)
        decode = lambda: speed.engine_run(eng, 1, prompt, tokens)[0]  # noqa: E731
    elif kind == "hf":
        model = speed.open_transformers(path, dtype, threads)
        decode = lambda: speed.transformers_decode(model, tokens, prompt)  # noqa: E731
    elif kind == "stream":
        decode = weight_stream(path, threads, tokens)
    else:
        llm = speed.open_llama(Path(path), threads, prompt + tokens + 16)
        decode = lambda: speed.llama_decode(llm, tokens, prompt)  # noqa: E731
    decode()  # warm-up
    speed.serve_measurements(lambda _: decode())


def weight_stream(path: str, threads: int, tokens: int):
    """A callable timing `tokens` passes over the model's weights: every linear and the head once per
    pass at batch 1, as a decode step reads them, and nothing else. Every way our engine reads them
    (packed matmul calls; in-graph GEMVs on plain or tiled weights, one graph); it returns the fastest."""
    import time

    import torch

    from qserve.linear import DenseLinear, gemv
    from qserve.model import load_model

    torch.set_num_threads(threads)
    plain, packed, tiled = (load_model(Path(path), torch.bfloat16, 64) for _ in range(3))
    if packed.pack_dense_linears() == 0:
        raise SystemExit("the weight-stream bound needs oneDNN bf16 packing on this CPU")
    tiled.tile_linears()
    plain_ls, packed_ls, tiled_ls = ([m for m in model.modules() if isinstance(m, DenseLinear)]
                                     for model in (plain, packed, tiled))
    inputs = [torch.randn(1, 1, m.in_features, dtype=torch.bfloat16) for m in plain_ls]
    graph = torch.compile(lambda xs: [gemv(x, m.weight, m.bias) for m, x in zip(plain_ls, xs)])
    tiled_graph = torch.compile(lambda xs: [m(x) for m, x in zip(tiled_ls, xs)])  # gemv_tiled on tiles

    def packed_pass() -> None:
        for m, x in zip(packed_ls, inputs):
            torch.ops.mkldnn._linear_pointwise(x, m.weight, m.bias, "none", [], "")  # packed_linear's call

    def run() -> float:
        best = 0.0
        with torch.inference_mode():
            for one_pass in (packed_pass, lambda: graph(inputs), lambda: tiled_graph(inputs)):
                t0 = time.perf_counter()
                for _ in range(tokens):
                    one_pass()
                best = max(best, tokens / (time.perf_counter() - t0))
        return best

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32,
                    help="prompt tokens before the decode (the keys it attends to)")
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_ab.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.threads, args.prompt)
        return 0

    from qserve.pull import alias_gguf, pull

    src = Path(args.model) if args.model else pull("smollm2-135m")
    int4 = speed.make_variants(src, ["int4-g32"], Path(tempfile.mkdtemp()))["int4-g32"][0]
    engines = {"ours int4-g32": f"qserve::{int4}::bfloat16::auto",
               "ours int4-g32 eager": f"qserve::{int4}::bfloat16::off",
               "ours bf16": f"qserve::{src}::bfloat16::auto",
               "ours bf16 plain": f"qserve::{src}::bfloat16::auto::plain",
               "ours bf16 packed": f"qserve::{src}::bfloat16::auto::packed",
               "ours bf16 eager": f"qserve::{src}::bfloat16::off",
               "transformers bf16": f"hf::{src}::bfloat16::-",
               "bf16 weight stream": f"stream::{src}::bfloat16::-"}
    if _has_llama_cpp():
        engines["llama.cpp Q4_1"] = f"llama::{alias_gguf('smollm2-135m')}::-::-"
    procs = {}
    for name, spec in engines.items():  # started one at a time: loads and compiles do not overlap
        procs[name] = speed.MeasureChild([sys.executable, __file__, "--child", spec, "--tokens", str(args.tokens),
                                          "--threads", str(args.threads), "--prompt", str(args.prompt)], name)
        print(f"started {name}", file=sys.stderr)
    names = list(procs)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            rates[name].append(procs[name].ask())
    for p in procs.values():
        p.close()

    def ratio(a: str, b: str) -> str:
        rs = sorted(x / y for x, y in zip(rates[a], rates[b]))
        return f"{a} / {b}: median {statistics.median(rs):.2f}x (min {rs[0]:.2f}, max {rs[-1]:.2f})"

    lines = [f"model: {src.name}; {args.threads} threads; batch 1, {args.tokens} tokens after a {args.prompt}-token prompt; "
             f"{args.rounds} rounds, each engine once per round (order rotating)", "",
             "| engine | median tok/s | min | max |", "|---|---|---|---|"]
    lines += [f"| {n} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |" for n, v in rates.items()]
    lines += ["", "per-round ratios:"]
    pairs = [("ours int4-g32", "llama.cpp Q4_1"), ("ours int4-g32", "ours int4-g32 eager"),
             ("ours bf16", "transformers bf16"), ("ours bf16 eager", "transformers bf16"),
             ("ours bf16", "ours bf16 plain"), ("ours bf16 plain", "transformers bf16"),
             ("ours bf16", "ours bf16 packed"), ("ours bf16 packed", "transformers bf16"),
             ("ours bf16", "ours bf16 eager"), ("ours bf16", "bf16 weight stream"),
             ("bf16 weight stream", "transformers bf16")]
    lines += [f"- {ratio(a, b)}" for a, b in pairs if a in rates and b in rates]
    speed.write_result(lines, args.out)
    return 0


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


if __name__ == "__main__":
    sys.exit(main())
