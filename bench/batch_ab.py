"""Batch-8 against batch-1 decode, in alternation, and how much of it the weight-only kernels decide.

bench/speed.py measures batch 1, 4, 8 and 16 one after another, seconds to minutes apart, so its
"batch-8 aggregate / batch-1" line moves with the host's state. Here each variant runs two
processes, measured in rounds that alternate batch 1 and batch 8 (the order flips every round):

- "engine": a multi-stream engine as `qserve serve` runs it (max_num_seqs 16, decode step compiled
  when it applies), decoding 64 tokens for 1 and for 8 concurrent greedy requests;
- "step": the engine's decode step alone (`CausalLM.decode`, compiled), called in a loop with no
  scheduler, sampling or streaming around it (the engine is stopped first, so its thread's OpenMP
  team does not compete);
- "matmuls": the same model's linears and head alone, called in model order once per decode step at
  1 and at 8 rows, nothing between them: what torch's kernels (`_weight_int4pack_mm_for_cpu`,
  oneDNN bf16) and the compiled int8 head's loops cost per step at each batch.

Each reports per-round ratios (8 rows per step / 1 row per step, as aggregate tokens/s). A step's
fixed costs (Python, norms, attention at short context) weigh more at batch 1 than at batch 8, so
the engine's ratio sits between the matmuls' ratio and 8; a kernel whose cost grows almost
linearly from 1 to 8 rows pins it near its own.

    python bench/batch_ab.py [MODEL_DIR] [--variants int4-g32 int8 bf16] [--rounds 8]
                             [--out bench/results/batch_ab.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the engines' open/decode helpers)

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8)


def _engine(path: str, threads: int | None, tokens: int):
    """A started 16-stream engine for 32-token prompts and `tokens` more, as `qserve serve` runs it."""
    return speed.open_engine(path, "bfloat16", 16, 32 + tokens + 8, 512, threads, "auto")


def engine_child(path: str, threads: int | None, tokens: int):
    eng = _engine(path, threads, tokens)
    for b in BATCHES:
        speed.engine_run(eng, b, 32, 8)
    return lambda b: speed.engine_run(eng, b, 32, tokens)[0]


def step_child(path: str, threads: int | None, tokens: int):
    import torch

    from qserve.engine import COMPILED_KV_BUCKET
    from qserve.kvcache import Batch

    eng = _engine(path, threads, tokens)
    eng.shutdown()
    model, cache = eng.model, eng.cache
    ids = {b: torch.tensor([[100 + i] for i in range(b)]) for b in BATCHES}

    def run(b: int) -> float:
        steps = [Batch.make(list(range(b)), [32 + i] * b, 1, bucket=COMPILED_KV_BUCKET, max_len=cache.max_len)
                 for i in range(tokens)]  # the positions an engine run decodes at
        model.decode(ids[b], steps[0], cache)
        t0 = time.perf_counter()
        for batch in steps:
            model.decode(ids[b], batch, cache)
        return b * tokens / (time.perf_counter() - t0)

    return run


def matmul_child(path: str, threads: int | None, tokens: int):
    """Every linear of the model and its head, as the multi-stream engine holds and runs them (bf16
    weights oneDNN-packed; a quantized model's int8 head tiled and read by the compiled head's
    loops, when inductor can build here), in this process's only thread."""
    import torch

    from qserve.compilation import INDUCTOR_OPTIONS, will_try_compile
    from qserve.config import load_config
    from qserve.model import load_model
    from qserve.planner import int8_head_default

    if threads:
        torch.set_num_threads(threads)
    model = load_model(Path(path), torch.bfloat16, 64, int8_head=int8_head_default(load_config(Path(path))))
    model.pack_dense_linears()
    linears = [m for layer in model.layers for m in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)]
    linears.append(model.lm_head)
    inputs = {b: [torch.randn(b, m.in_features, dtype=torch.bfloat16) for m in linears] for b in BATCHES}
    if will_try_compile("auto") and model.tile_linears(head_only=True):
        linears[-1] = torch.compile(model.lm_head, options=INDUCTOR_OPTIONS)

    def run(b: int) -> float:
        with torch.inference_mode():
            for m, x in zip(linears, inputs[b]):  # warm: the kernels' first-call setup
                m(x)
            t0 = time.perf_counter()
            for _ in range(tokens):
                for m, x in zip(linears, inputs[b]):
                    m(x)
        return b * tokens / (time.perf_counter() - t0)

    return run


def child(spec: str, threads: int | None, tokens: int) -> None:
    """Serve measurements on stdin/stdout: a batch size in, one tokens/s figure out."""
    kind, path = spec.split("::")
    measure = {"engine": engine_child, "step": step_child, "matmuls": matmul_child}[kind](path, threads, tokens)
    speed.serve_measurements(lambda line: measure(int(line)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--variants", nargs="+", default=["int4-g32", "int8", "bf16"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS / "batch_ab.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads, args.tokens)
        return 0

    from qserve.pull import pull

    src = Path(args.model) if args.model else pull("smollm2-135m")
    made = speed.make_variants(src, args.variants, Path(tempfile.mkdtemp()))
    dirs = {v: made[v][0] for v in args.variants}
    lines = [f"model: {src.name}; batch 1 and batch 8, {args.tokens} tokens per stream; {args.rounds} rounds "
             f"alternating the two batch sizes; tokens/s are aggregate", "",
             "| variant | measured | b1 tok/s | b8 tok/s | b8 / b1 per round: median (min, max) |", "|---|---|---|---|---|"]
    for v, d in dirs.items():
        for kind in ("engine", "step", "matmuls"):
            p = speed.MeasureChild([sys.executable, __file__, "--child", f"{kind}::{d}", "--tokens", str(args.tokens)]
                                   + (["--threads", str(args.threads)] if args.threads else []), f"{v} {kind}")
            rates: dict[int, list[float]] = {b: [] for b in BATCHES}
            for r in range(args.rounds):
                for b in BATCHES if r % 2 == 0 else BATCHES[::-1]:
                    rates[b].append(p.ask(str(b)))
            p.close()
            ratios = sorted(x / y for x, y in zip(rates[8], rates[1]))
            lines.append(f"| {v} | {kind} | {statistics.median(rates[1]):.1f} | {statistics.median(rates[8]):.1f} | "
                         f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}, {ratios[-1]:.2f}) |")
            print(lines[-1], file=sys.stderr)
    speed.write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
