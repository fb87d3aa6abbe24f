"""Quality of W4A4 / W4A4KV4 on a real model, in one run: fp, naive W4A4, QuaRot, FlatQuant, AWQ.

Each checkpoint is made by `qserve quantize` in its own process (timed; peak RSS as that process
records it in its provenance file; an existing checkpoint with a provenance file is reused, so a
rerun only evaluates), then every variant's perplexity is measured on the held-out wiki eval split
through our own model code, with the dense KV cache or the int4 KV cache format
(`qserve.kvformats`, "int4"). Writes a Markdown table to bench/results/w4a4.md and records each
variant's (dense-KV) perplexity beside it for the planner (`qserve.planner.record_quality`).

    python bench/w4a4_quality.py                     # SmolLM2-135M, first 64k eval tokens
    python bench/w4a4_quality.py --max-tokens 16384  # quicker

Calibration budget: QuaRot's GPTQ on 32 x 512 tokens; FlatQuant on 32 x 256 tokens, 2 epochs of
4-sample steps per block. On a machine shared with other jobs, run with OMP_NUM_THREADS=1: with 2
threads competing for 2 busy cores, OpenMP's spinning made a block forward 3.7x slower.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# calibration sized for ~30 min on 2 shared cores (see the module docstring)
QUAROT = ["--method", "quarot", "--samples", "32"]
FLATQUANT = ["--method", "flatquant", "--samples", "32", "--seq-len", "256", "--fq-epochs", "2"]
# label, checkpoint dir name (None: the source), quantize args, KV format
VARIANTS: list[tuple[str, str | None, list[str], str]] = [
    ("fp32", None, [], "model"),
    ("bf16", None, [], "model"),
    ("naive W4A4 (RTN, no transform)", "naive-w4a4", ["--method", "quarot", "--rotate", "none", "--w-quant", "rtn"], "model"),
    ("QuaRot W4A4 (RTN weights)", "quarot-rtn-w4a4", ["--method", "quarot", "--w-quant", "rtn"], "model"),
    ("QuaRot W4A4 (GPTQ weights)", "quarot-w4a4", QUAROT, "model"),
    ("QuaRot W4A4KV4", "quarot-w4a4", QUAROT, "int4"),
    ("FlatQuant W4A4 (RTN weights, learned clips)", "flatquant-w4a4", FLATQUANT, "model"),
    ("FlatQuant W4A4KV4 (RTN weights)", "flatquant-w4a4", FLATQUANT, "int4"),
    ("FlatQuant W4A4 (GPTQ weights)", "flatquant-gptq-w4a4", FLATQUANT + ["--fq-w-quant", "gptq"], "model"),
    ("FlatQuant W4A4KV4 (GPTQ weights)", "flatquant-gptq-w4a4", FLATQUANT + ["--fq-w-quant", "gptq"], "int4"),
    ("AWQ W4A16 g128 (reference)", "awq-w4g128", ["--method", "awq", "--group-size", "128"], "model"),
]


def quantize(src: Path, out: Path, argv: list[str]) -> dict:
    """Run `qserve quantize` in a child process unless `out` already holds its result."""
    prov_path = out / "qserve_quantize.json"
    if prov_path.is_file():
        return {"reused": True, "provenance": json.loads(prov_path.read_text())}
    cmd = [sys.executable, "-m", "qserve.cli", "quantize", str(src), "--out", str(out)] + argv
    print(" ".join(cmd[3:]), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
        raise SystemExit(f"{' '.join(cmd[3:])} failed")
    return {"reused": False, "seconds": time.perf_counter() - t0,
            "provenance": json.loads(prov_path.read_text())}


def perplexity(model_dir: Path, ids: torch.Tensor, context: int, stride: int, dtype: torch.dtype,
               kv_format: str) -> tuple[float, int, int, float]:
    """(ppl, scored tokens, resident weight bytes, seconds) with the given KV cache format."""
    from qserve.evaluate import NLL, window_nll
    from qserve.kvcache import get_kv_format
    from qserve.model import load_model

    t0 = time.perf_counter()
    model = load_model(model_dir, dtype, context)
    c = model.cfg
    cache = get_kv_format(kv_format)(c.num_layers, 1, min(context, ids.numel()), c.num_kv_heads, c.head_dim, dtype)
    nll, begin, prev_end, n = NLL(), 0, 0, ids.numel()
    while True:  # qserve.evaluate.sliding_nll with a chosen cache
        end = min(begin + context, n)
        nll.add(window_nll(model, cache, ids[begin:end], max(prev_end, begin + 1) - begin))
        prev_end = end
        if end == n:
            break
        begin += stride
    return nll.perplexity, nll.tokens, model.weight_bytes(), time.perf_counter() - t0


def main() -> None:
    from qserve.calib import encode_texts
    from qserve.corpus import corpus_path, load_texts
    from qserve.pull import pull

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="alias or fp checkpoint directory")
    p.add_argument("--work", default="/tmp/qserve-w4a4", help="where the quantized checkpoints go")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--stride", type=int, default=2048)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="compute dtype of the quantized variants (default bfloat16, what the server runs)")
    p.add_argument("--flatquant-args", default="", help="extra flatquant options, e.g. '--samples 32 --fq-epochs 2'")
    p.add_argument("--only", nargs="*", default=None, help="evaluate only these checkpoint names (and fp)")
    p.add_argument("--results", default=str(ROOT / "bench/results/w4a4.md"))
    args = p.parse_args()

    src = Path(args.model) if Path(args.model).is_dir() else pull(args.model)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    eval_path = corpus_path("wiki", "eval")
    ids = encode_texts(src, load_texts(eval_path))[: args.max_tokens]
    runs = []
    quant: dict[str, dict] = {}
    for label, name, qargs, kv in VARIANTS:
        if name is not None and args.only is not None and name not in args.only:
            continue
        if name is None:
            runs.append((label, src, kv, torch.float32 if label == "fp32" else torch.bfloat16, None))
            continue
        if name not in quant:
            # both FlatQuant variants share one work dir: the GPTQ export reuses the trained blocks
            extra = (args.flatquant_args.split() + ["--fq-work-dir", str(work / "flatquant-w4a4.flatquant-work")]
                     if "flatquant" in qargs else [])
            quant[name] = quantize(src, work / name, qargs + extra)
        runs.append((label, work / name, kv, getattr(torch, args.dtype), quant[name]))

    rows = []
    for label, path, kv, dtype, q in runs:
        print(f"evaluating {label}", file=sys.stderr, flush=True)
        ppl, tokens, wbytes, secs = perplexity(path, ids, args.context, args.stride, dtype, kv)
        rows.append((label, path, kv, ppl, tokens, wbytes, secs, q))
        print(f"  ppl {ppl:.3f} ({tokens} tokens, {secs:.0f} s)", file=sys.stderr, flush=True)
        if q is not None and kv == "model":
            from qserve.planner import record_quality

            record_quality(path, ppl, tokens, args.context, args.stride, text=f"wiki/eval first {args.max_tokens}",
                           dtype=str(dtype).removeprefix("torch."))

    fp = rows[0][3]
    lines = [
        f"# W4A4 / W4A4KV4 quality: {src.name}",
        "",
        f"Perplexity on the held-out wiki eval split ({eval_path.name}), first {args.max_tokens} tokens "
        f"({rows[0][4]} scored), context {args.context}, stride {args.stride}. Quantized variants run with "
        f"{args.dtype} for their unquantized parts; W4A4 layers quantize activations per token to 4 bits and "
        "multiply integers (torch._int_mm). KV4 = the int4 KV cache format (asymmetric, groups of 32 along "
        "head_dim, fp16 scale and minimum). Weights per output channel, symmetric; lm_head and embeddings "
        "unquantized. Calibration: wiki calib split.",
        "",
        "Caveat: SmolLM2's only source here is a Q4_1 GGUF (weights on a 4-bit grid of 32-weight groups), which "
        "flatters group-wise weight-only 4-bit (AWQ) more than per-channel W4A4.",
        "",
        "| variant | KV cache | perplexity | vs fp32 | weight MiB resident | quantize s | quantize peak RSS MiB | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, path, kv, ppl, tokens, wbytes, secs, q in rows:
        qs = "-" if q is None else (f"{q['provenance'].get('seconds', 0):.0f} (earlier run)" if q["reused"]
                                    else f"{q['seconds']:.0f}")
        peak = None if q is None else q["provenance"].get("peak_rss_mib")
        rss = "-" if peak is None else f"{peak:.0f}" + (" (earlier run)" if q["reused"] else "")
        lines.append(f"| {label} | {'int4' if kv == 'int4' else 'dense'} | {ppl:.3f} | {ppl / fp - 1:+.1%} | "
                     f"{wbytes / 2**20:.1f} | {qs} | {rss} | {secs:.0f} |")
    lines += ["", "Quantization settings (qserve_quantize.json):", ""]
    for name, q in quant.items():
        prov = {k: v for k, v in q["provenance"].items() if k not in ("alphas",)}
        lines.append(f"- {name}: `{json.dumps(prov)}`")
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
