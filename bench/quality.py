"""Every variant qserve can make of one model, made and evaluated in one run: the quality table,
its plot, and the family directory the memory-budget planner serves from.

    python bench/quality.py                                  # SmolLM2-135M, first 16k eval tokens
    python bench/quality.py --max-tokens 65536 --only awq-w4g128 rtn-w4g128

Variants (each a subdirectory of --family, made by `qserve quantize` in its own process, timed,
peak RSS from the kernel; a directory that already holds a provenance file is reused, so a rerun
only evaluates what is missing): bf16 (the pulled checkpoint, linked), RTN w8 and w4 at groups
32/64/128 and w3 g128, AWQ and SmoothQuant+ at w4/w3 g128, BitStack (one stack, --bitstack-sizes
sizes evaluated by resizing it in place), and, when present in --family, W4A4 checkpoints made by
bench/w4a4_quality.py (QuaRot, FlatQuant).

Every variant is measured by the same code: perplexity on the held-out wiki eval split (never seen
by calibration), first --max-tokens tokens, --context/--stride windows, bf16 compute, the output
head the engine serves (int8 for quantized checkpoints). Each result is stored with its variant
(qserve.planner.record_quality), so `qserve plan FAMILY` and `qserve serve FAMILY --memory-budget`
rank variants by exactly these numbers. Writes bench/results/quality.md and quality.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from w4a4_quality import quantize

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
CALIB = ["--samples", "64", "--seq-len", "512"]
# family subdirectory -> `qserve quantize` arguments
MADE: dict[str, list[str]] = {
    "rtn-w8": ["--method", "rtn", "--bits", "8", "--group-size", "-1"],
    "rtn-w4g32": ["--method", "rtn", "--bits", "4", "--group-size", "32"],
    "rtn-w4g64": ["--method", "rtn", "--bits", "4", "--group-size", "64"],
    "rtn-w4g128": ["--method", "rtn", "--bits", "4", "--group-size", "128"],
    "rtn-w3g128": ["--method", "rtn", "--bits", "3", "--group-size", "128"],
    "awq-w4g128": ["--method", "awq", "--bits", "4", "--group-size", "128", *CALIB],
    "awq-w3g128": ["--method", "awq", "--bits", "3", "--group-size", "128", *CALIB],
    "sqp-w4g128": ["--method", "smoothquant-plus", "--bits", "4", "--group-size", "128", *CALIB],
    "sqp-w3g128": ["--method", "smoothquant-plus", "--bits", "3", "--group-size", "128", *CALIB],
    "bitstack": ["--method", "bitstack", "--samples", "32", "--seq-len", "512"],
}
W4A4 = ("quarot-w4a4", "flatquant-gptq-w4a4")  # made by bench/w4a4_quality.py when wanted


def bitstack_sizes(stack, n: int, dtype: torch.dtype) -> list[int]:
    """n sizes evenly spaced in resident bytes from the smallest to the largest model."""
    lo = stack.resident_bytes(stack.min_blocks, dtype, True)
    hi = stack.resident_bytes(stack.total_blocks, dtype, True)
    sizes = {stack.min_blocks, stack.total_blocks}
    sizes |= {stack.blocks_for_budget(lo + (hi - lo) * i // (n - 1), dtype, True) for i in range(1, n - 1)}
    return sorted(sizes, reverse=True)


def main() -> int:
    from qserve.calib import encode_texts
    from qserve.config import load_config
    from qserve.corpus import corpus_path, load_texts
    from qserve.evaluate import sliding_nll
    from qserve.model import load_model
    from qserve.planner import int8_head_default, read_quality, record_quality, resident_weight_bytes, variant_kind
    from qserve.pull import pull
    from qserve.quant_methods.bitstack_stack import BitStackStack

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="alias or fp checkpoint directory")
    ap.add_argument("--family", type=Path, default=Path("~/.cache/qserve/families/smollm2-135m").expanduser())
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--stride", type=int, default=2048)
    ap.add_argument("--bitstack-sizes", type=int, default=7)
    ap.add_argument("--only", nargs="*", default=None, help="make/evaluate only these variants (and bf16)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/quality.md")
    args = ap.parse_args()

    src = Path(args.model) if Path(args.model).is_dir() else pull(args.model)
    fam = args.family
    fam.mkdir(parents=True, exist_ok=True)
    if not (fam / "bf16").exists():
        (fam / "bf16").symlink_to(src.resolve(), target_is_directory=True)
    text = f"wiki/eval first {args.max_tokens}"
    ids = encode_texts(src, load_texts(corpus_path("wiki", "eval")))[: args.max_tokens]
    dt = torch.bfloat16
    wanted = [n for n in ["bf16", *MADE, *W4A4] if args.only is None or n in args.only or n == "bf16"]
    made: dict[str, dict] = {}
    for name in wanted:
        if name in MADE:
            made[name] = quantize(src, fam / name, MADE[name])
    rows: list[dict] = []

    def measure(model, name: str, d: Path, weight_bytes: int, blocks: int | None = None) -> None:
        old = read_quality(d) or {}
        rec = next((p for p in old.get("points", []) if p["blocks"] == blocks), None) if blocks else old
        t0 = time.perf_counter()
        if rec and rec.get("text") == text and rec.get("context") == args.context and "ppl" in rec:
            ppl, tokens, secs = rec["ppl"], rec["tokens"], None  # measured by an earlier run, same settings
        else:
            nll = sliding_nll(model(), ids, args.context, args.stride)
            ppl, tokens, secs = nll.perplexity, nll.tokens, time.perf_counter() - t0
            record_quality(d, ppl, tokens, args.context, args.stride, blocks=blocks, text=text, dtype="bfloat16")
        rows.append({"name": name if blocks is None else f"{name} @{blocks}", "dir": d, "blocks": blocks,
                     "kind": variant_kind(load_config(d)), "weight_bytes": weight_bytes, "ppl": ppl,
                     "tokens": tokens, "eval_s": secs})
        print(f"{rows[-1]['name']}: ppl {ppl:.3f}, {weight_bytes / MIB:.1f} MiB", file=sys.stderr, flush=True)

    for name in wanted:
        d = fam / name
        if not (d / "config.json").is_file():
            continue  # a W4A4 checkpoint that was not made
        cfg = load_config(d)
        head = int8_head_default(cfg)
        if variant_kind(cfg) == "bitstack":
            stack = BitStackStack(d)
            live = stack.load_model(None, dt, args.context, int8_head=True)
            for n in bitstack_sizes(stack, args.bitstack_sizes, dt):
                stack.apply(live, n)
                measure(lambda: live, name, d, stack.resident_bytes(n, dt, True), n)
            del live
        else:
            measure(lambda: load_model(d, dt, args.context, int8_head=head), name, d,
                    resident_weight_bytes(d, dt, head))
    write(args, src, rows, made)
    return 0


def write(args, src: Path, rows: list[dict], made: dict[str, dict]) -> None:
    fp = next(r["ppl"] for r in rows if r["name"] == "bf16")
    lines = [
        f"# Quality of every qserve variant of {src.name}",
        "",
        f"Generated by `python bench/quality.py` ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}). Perplexity on the held-out wiki eval split "
        f"(`qserve data wiki`), first {args.max_tokens} tokens ({rows[0]['tokens']} scored), context "
        f"{args.context}, stride {args.stride}, bf16 compute, the output head the engine serves (int8 for "
        "quantized checkpoints). Weight MiB: what the runtime keeps resident (qserve.planner). Calibration: "
        "wiki calib split; AWQ / SmoothQuant+ 64 x 512 tokens, BitStack 32 x 512.",
        "",
        "Caveat (FINDINGS.md): SmolLM2's only source here is a Q4_1 GGUF, so its linear weights sit on a 4-bit "
        "grid of 32-weight blocks with a float scale and minimum. A 4-bit format with 32-aligned groups and a float "
        "minimum would nearly reproduce it; ours stores an integer zero point, so rtn-w4g32 does not, but group-32 "
        "rows may still be flattered by the grid: compare methods at groups 64/128 and at 3 bits.",
        "",
        "| variant | kind | weight MiB | perplexity | vs bf16 | quantize s | quantize peak RSS MiB | eval s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["weight_bytes"]):
        q = made.get(r["dir"].name)
        if q is None or r["blocks"] not in (None, max(x["blocks"] or 0 for x in rows if x["dir"] == r["dir"])):
            qs = rss = "-"
        elif q["reused"]:
            qs, rss = f"{q['provenance'].get('seconds', 0):.0f} (earlier run)", "-"
        else:
            qs, rss = f"{q['seconds']:.0f}", f"{q['peak_mib']:.0f}"
        ev = "(earlier run)" if r["eval_s"] is None else f"{r['eval_s']:.0f}"
        lines.append(f"| {r['name']} | {r['kind']} | {r['weight_bytes'] / MIB:.1f} | {r['ppl']:.3f} | "
                     f"{r['ppl'] / fp - 1:+.1%} | {qs} | {rss} | {ev} |")
    lines += ["", f"The family directory ({args.family}) now holds each variant's `qserve_quality.json`; "
              f"`qserve plan {args.family} --memory-budget 1GiB` ranks them by these numbers.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    plot(rows, args.out.with_suffix(".png"), src.name)


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = 6 * next(r["ppl"] for r in rows if r["name"] == "bf16")  # clip: a collapsed size would flatten the rest
    fig, ax = plt.subplots(figsize=(9, 6))
    stacks = sorted((r for r in rows if r["blocks"] is not None), key=lambda r: r["weight_bytes"])
    if stacks:
        ax.plot([r["weight_bytes"] / MIB for r in stacks], [min(r["ppl"], top) for r in stacks], "o-",
                label="BitStack sizes (clipped at the top edge)")
    points = sorted((r for r in rows if r["blocks"] is None), key=lambda r: (r["weight_bytes"], r["ppl"]))
    for i, r in enumerate(points):
        x, y = r["weight_bytes"] / MIB, min(r["ppl"], top)
        ax.plot(x, y, "s")
        ax.annotate(f"{r['name']} ({r['ppl']:.1f})", (x, y), fontsize=7, xytext=(6, 10 * (i % 3) - 10),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_ylim(top=top * 1.05)
    ax.set_xlabel("resident weight MiB")
    ax.set_ylabel("perplexity (wiki eval, log scale)")
    ax.set_title(f"{model}: perplexity vs weight bytes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
