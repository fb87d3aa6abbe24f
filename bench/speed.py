"""Embedded-engine speed on one model, one run: decode tokens/s at several batch sizes, prefill
tokens/s, time to first token and peak RSS for fp32, bf16, int8 and int4 (g32, g128); and
llama.cpp on the model's GGUF in the same run when `llama-cpp-python` is installed.

    python bench/speed.py [MODEL_DIR] [--tiny] [--batches 1 4 8 16] [--prefill 128 512 2048]
                          [--tokens 64] [--repeats 3] [--compile auto] [--eager-too bf16 int4-g32]
                          [--single-stream fp32 bf16 int4-g32] [--out bench/results/speed.md]

MODEL_DIR defaults to SmolLM2-135M (`qserve pull smollm2-135m`). Variants run as `qserve serve`
runs them (decode step compiled when it applies, --compile auto); the --eager-too variants are
measured again with it off, to show what compiling buys. Each variant's engine takes as many
streams as the largest batch, so unquantized weights are oneDNN-packed (--dense-layout auto); the
--single-stream variants are measured again at batch 1 on a one-stream engine, which lays bf16
weights and int8 heads out in tiles for the compiled batch-1 step (fp32 stays plain), as
`qserve serve --max-num-seqs 1` does. Each variant runs in its own
process (so its peak RSS is its own). Decode figures are medians of --repeats runs after a
warm-up; prefill goes through the engine's chunked prefill (--prefill-chunk, default 512), as a
served request would. Shared machines are noisy: compare rows of one run, and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_variants(src: Path, variants: list[str], tmp: Path) -> dict[str, tuple[Path, str]]:
    """Model directory and serving dtype of each variant: fp32 and bf16 are `src` itself; int8 and
    int4-gN are RTN-quantized from it into `tmp`."""
    from qserve.offline import quantizers

    dirs = {"fp32": (src, "float32"), "bf16": (src, "bfloat16")}
    for v in variants:
        if v == "int8" or v.startswith("int4-g"):
            bits, gs = (8, -1) if v == "int8" else (4, int(v.removeprefix("int4-g")))
            quantizers()["rtn"].run(src, tmp / v, argparse.Namespace(bits=bits, group_size=gs))
            dirs[v] = (tmp / v, "bfloat16")
    return dirs


def serve_measurements(measure: Callable[[str], float]) -> None:
    """Child side of a paired bench (decode_ab, batch_ab): says "ready", then answers each line read
    from stdin with one JSON figure, measure(line)."""
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(measure(line.strip())), flush=True)


class MeasureChild:
    """Parent side: a process started with `cmd` that speaks serve_measurements' protocol, so that
    several stay loaded and are measured in alternation."""

    def __init__(self, cmd: list[str], name: str):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"{name} failed to start")

    def ask(self, line: str = "run") -> float:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def write_result(lines: list[str], out: Path) -> None:
    """Print a bench's result and write it to `out` (bench/results/)."""
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


def peak_rss() -> int:
    """This process's own peak RSS in bytes: VmHWM, which starts afresh at exec. Not ru_maxrss:
    Linux keeps it across execve, so a child forked from the bench's parent (which holds the
    quantized variants it made, ~0.8 GiB for SmolLM2) reported at least the parent's size."""
    from qserve.sysmem import process_memory

    return process_memory().get("peak") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(n: int, stream: int = 0) -> list[int]:
    """The synthetic prompt every engine here is given: the same tokens for stream 0 in each, so
    paired rows prefill and attend to the same keys; other streams are shifted."""
    return [(100 + 7 * stream + j) % 1000 + 10 for j in range(n)]


def open_engine(model_dir: str, dtype: str, max_num_seqs: int, ctx: int, chunk: int, threads: int | None,
                compile_mode: str, dense_layout: str = "auto"):
    """A started TorchEngine as `qserve serve` would run it."""
    from qserve.engine import EngineConfig, TorchEngine
    from qserve.tokenizer import load_tokenizer

    d = Path(model_dir)
    eng = TorchEngine(d, d.name, load_tokenizer(d), EngineConfig(
        dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=ctx, prefill_chunk=chunk, threads=threads,
        max_waiting=1024, compile=compile_mode, dense_layout=dense_layout))
    eng.start()
    return eng


def engine_run(eng, batch: int, prompt_len: int, n: int) -> tuple[float, float]:
    """`batch` concurrent greedy requests of n tokens: (aggregate decode tok/s after every stream's
    first token, time to the first token of any stream)."""
    from qserve.engine_api import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        firsts: list[float] = []

        async def one(i: int) -> None:
            prompt = prompt_ids(prompt_len, i)
            first = True
            async for _ in eng.submit(f"r{i}", prompt, params):
                if first:
                    firsts.append(time.perf_counter())
                    first = False

        await asyncio.gather(*[one(i) for i in range(batch)])
        end = time.perf_counter()
        return batch * (n - 1) / (end - max(firsts)), min(firsts) - t0

    return asyncio.run(run())


def _measure(model_dir: str, dtype: str, batches: list[int], prefills: list[int], tokens: int, repeats: int,
             chunk: int, threads: int | None, compile_mode: str) -> dict:
    """Runs in a child process: one engine, every measurement for it."""
    import torch

    eng = open_engine(model_dir, dtype, max(batches), max(max(prefills) + 8, 64 + tokens + 8), chunk, threads,
                      compile_mode)
    out: dict = {"weight_bytes": eng.info().weight_bytes, "kv_bytes": eng.info().kv_cache_bytes,
                 "threads": torch.get_num_threads(), "decode": {}, "prefill": {}, "compile": eng.compile_status}
    for b in batches:
        engine_run(eng, b, 32, 4)
        out["decode"][b] = statistics.median(engine_run(eng, b, 32, tokens)[0] for _ in range(repeats))
    for p in prefills:
        engine_run(eng, 1, p, 1)
        ttft = statistics.median(engine_run(eng, 1, p, 2)[1] for _ in range(repeats))
        out["prefill"][p] = {"tok_s": p / ttft, "ttft_ms": 1000 * ttft}
    eng.shutdown()
    out["peak_rss"] = peak_rss()
    return out


def open_transformers(model_dir: str, dtype: str, threads: int | None):
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def transformers_generate(model, prompt_len: int, n: int) -> float:
    """Seconds for one greedy `generate` of n tokens after a prompt_len-token prompt."""
    import torch

    ids = torch.tensor([prompt_ids(prompt_len)])
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def transformers_decode(model, tokens: int, prompt_len: int = 32) -> float:
    """Decode tok/s: (tokens - 1) / (time for `tokens` new tokens - time for one), so the prompt's
    prefill cancels out."""
    return (tokens - 1) / (transformers_generate(model, prompt_len, tokens) - transformers_generate(model, prompt_len, 1))


def _transformers(model_dir: str, dtype: str, prefills: list[int], tokens: int, repeats: int,
                  threads: int | None) -> dict:
    """Runs in a child process: `transformers.generate`, batch 1, greedy."""
    import torch

    model = open_transformers(model_dir, dtype, threads)
    transformers_generate(model, 32, 4)
    dec = statistics.median(transformers_decode(model, tokens) for _ in range(repeats))
    out = {"weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "threads": torch.get_num_threads(), "decode": {1: dec}, "prefill": {}}
    for p in prefills:
        transformers_generate(model, p, 1)
        ttft = statistics.median(transformers_generate(model, p, 1) for _ in range(repeats))
        out["prefill"][p] = {"tok_s": p / ttft, "ttft_ms": 1000 * ttft}
    out["peak_rss"] = peak_rss()
    return out


def _int_keys(row: dict) -> dict:
    """A child's row with its batch / prompt-length keys back to ints (JSON made them strings)."""
    return row | {k: {int(n): x for n, x in row[k].items()} for k in ("decode", "prefill")}


def open_llama(gguf: Path, threads: int, ctx: int):
    """llama.cpp through llama-cpp-python, or None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=str(gguf), n_threads=threads, n_ctx=ctx, verbose=False)


def llama_decode(llm, tokens: int, prompt_len: int = 32) -> float:
    """Greedy decode tok/s after a prompt_len-token prompt (its high-level API serves one sequence)."""
    llm.reset()
    llm.eval(prompt_ids(prompt_len))
    t0 = time.perf_counter()
    for _ in range(tokens):
        llm.eval([llm.sample(temp=0.0)])
    return tokens / (time.perf_counter() - t0)


def _llama_cpp(gguf: Path, batches: list[int], prefills: list[int], tokens: int, repeats: int, threads: int) -> dict | None:
    llm = open_llama(gguf, threads, max(prefills) + tokens + 16)
    if llm is None:
        return None

    def prefill(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids(n))
        return n / (time.perf_counter() - t0)

    llama_decode(llm, tokens)
    out = {"decode": {1: statistics.median(llama_decode(llm, tokens) for _ in range(repeats))}, "prefill": {}}
    for p in prefills:
        prefill(p)
        tps = statistics.median(prefill(p) for _ in range(repeats))
        out["prefill"][p] = {"tok_s": tps, "ttft_ms": 1000 * p / tps}
    out["peak_rss"] = peak_rss()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--variants", nargs="+", default=["fp32", "bf16", "int8", "int4-g32", "int4-g128"])
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers.generate rows")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                    help="the engine's decode-step compilation for the variants (as `qserve serve --compile`)")
    ap.add_argument("--eager-too", nargs="*", default=["bf16", "int4-g32"],
                    help="variants also measured with --compile off, as '<variant> eager' rows")
    ap.add_argument("--single-stream", nargs="*", default=["fp32", "bf16", "int4-g32"],
                    help="variants also measured at batch 1 on a one-stream engine, as '<variant> single-stream' rows")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        d, dtype, engine, mode = args.child.split("::")
        if engine == "hf":
            print(json.dumps(_transformers(d, dtype, args.prefill, args.tokens, args.repeats, args.threads)))
        else:
            print(json.dumps(_measure(d, dtype, args.batches, args.prefill, args.tokens, args.repeats,
                                      args.prefill_chunk, args.threads, mode)))
        return 0

    if args.tiny:
        from qserve.tiny import make_tiny_model

        src = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny")
    else:
        from qserve.pull import pull

        src = Path(args.model) if args.model else pull("smollm2-135m")
    dirs = make_variants(src, args.variants, Path(tempfile.mkdtemp()))
    runs = [(v, *dirs[v], "qserve", args.compile, args.batches) for v in args.variants]
    if args.compile != "off":
        runs += [(f"{v} eager", *dirs[v], "qserve", "off", args.batches) for v in args.eager_too if v in dirs]
    runs += [(f"{v} single-stream", *dirs[v], "qserve", args.compile, [1]) for v in args.single_stream if v in dirs]
    if not args.no_transformers:
        runs += [(f"transformers {dt}", src, dt, "hf", "-", args.batches) for dt in ("float32", "bfloat16")]
    rows: dict[str, dict] = {}
    for v, d, dtype, engine, mode, batches in runs:
        cmd = [sys.executable, __file__, "--child", f"{d}::{dtype}::{engine}::{mode}", "--batches", *map(str, batches),
               "--prefill", *map(str, args.prefill), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
               "--prefill-chunk", str(args.prefill_chunk)] + (["--threads", str(args.threads)] if args.threads else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        rows[v] = _int_keys(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"measured {v}", file=sys.stderr)
    threads = rows[args.variants[0]]["threads"]
    if not args.tiny:
        from qserve.pull import alias_gguf

        lc = _llama_cpp(alias_gguf("smollm2-135m"), args.batches, args.prefill, args.tokens, args.repeats, threads)
        if lc is not None:
            rows["llama.cpp Q4_1"] = lc
    lines = [f"model: {src.name}; {threads} threads; decode: {args.tokens} tokens after a 32-token prompt, "
             f"median of {args.repeats}; prefill chunk {args.prefill_chunk}; decode step: --compile {args.compile} "
             f"('eager' rows: off)", ""]
    head = ["variant", "decode step", "weights MB"] + [f"decode b{b} tok/s (per stream)" for b in args.batches] + \
        [f"prefill {p} tok/s (TTFT ms)" for p in args.prefill] + ["peak RSS MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, r in rows.items():
        dec = [f"{r['decode'][b]:.1f} ({r['decode'][b] / b:.1f})" if b in r["decode"] else "–" for b in args.batches]
        pre = [f"{r['prefill'][p]['tok_s']:.0f} ({r['prefill'][p]['ttft_ms']:.0f})" for p in args.prefill]
        lines.append("| " + " | ".join([v, r.get("compile", "–"),
                                        f"{r.get('weight_bytes', 0) / 1e6:.1f}" if "weight_bytes" in r else "–",
                                        *dec, *pre, f"{r['peak_rss'] / 2**20:.0f}"]) + " |")
    b1 = {v: r["decode"][1] for v, r in rows.items() if 1 in r["decode"]}
    ref = b1.get("llama.cpp Q4_1")
    ours_b1 = [v for v in args.variants + [f"{v} single-stream" for v in args.single_stream] if v in b1]
    if ref and ours_b1:
        lines += ["", "ratio ours / llama.cpp Q4_1, batch-1 decode: " + ", ".join(f"{v} {b1[v] / ref:.2f}x" for v in ours_b1)]
    for ours, hf in (("fp32", "transformers float32"), ("bf16", "transformers bfloat16"),
                     ("fp32 single-stream", "transformers float32"), ("bf16 single-stream", "transformers bfloat16")):
        if ours in b1 and hf in b1:
            lines.append(f"ratio ours / transformers.generate, batch-1 decode, {ours}: {b1[ours] / b1[hf]:.2f}x")
    for v in args.eager_too:
        if v in rows and f"{v} eager" in rows:
            lines.append(f"compiled / eager decode step, {v}: " + ", ".join(
                f"b{b} {rows[v]['decode'][b] / rows[f'{v} eager']['decode'][b]:.2f}x" for b in args.batches))
    for v in args.variants:
        if v in b1 and 8 in rows[v]["decode"]:
            lines.append(f"batch-8 aggregate / batch-1 decode, {v}: {rows[v]['decode'][8] / b1[v]:.2f}x")
    write_result(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
