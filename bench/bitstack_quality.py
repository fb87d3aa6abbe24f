"""BitStack perplexity vs bytes next to RTN (and AWQ) points, resize time and decode speed.

    qserve quantize SMOL --method bitstack --out BS --samples 32      # once (time it)
    python bench/bitstack_quality.py --fp SMOL --bitstack BS --work DIR [--awq AWQ_DIR ...] [--record]

- every variant is measured by the same code (qserve.evaluate.sliding_nll over our CausalLM) on
  the first --max-tokens tokens of the held-out wiki eval split, bf16, with the output head the
  engine serves (int8 for quantized checkpoints);
- RTN w4 g128, w4 g64 and w3 g64 are made in --work when missing;
- BitStack is loaded once and resized in place (BitStackStack.apply) through --sizes sizes, from
  the largest down: its smallest and largest models, the sizes that fit each quantized variant's
  weight bytes (the equal-bytes comparison), and sizes evenly spaced in bytes between;
- resize time: apply() down and up between sizes, the blocks and bytes each moved;
- decode: ms per token at batch 1 (after a 32-token prefill) for a few variants;
- --record stores every measured perplexity with its variant (qserve.planner.record_quality),
  the quality the planner reads.
Writes a Markdown report (default bench/results/bitstack.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from qserve.calib import encode_texts
from qserve.corpus import corpus_path, load_texts
from qserve.evaluate import sliding_nll
from qserve.kvcache import Batch, KVCache
from qserve.model import CausalLM, load_model
from qserve.planner import int8_head_default, record_quality, resident_weight_bytes, variant_kind
from qserve.config import load_config
from qserve.quant_methods.bitstack_stack import BitStackStack

RTN = (("rtn-w4g128", 4, 128), ("rtn-w4g64", 4, 64), ("rtn-w3g64", 3, 64))
MIB = 2**20


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def decode_ms(model: CausalLM, steps: int = 16) -> float:
    c = model.cfg
    cache = KVCache(c.num_layers, 1, 64, c.num_kv_heads, c.head_dim, model.dtype)
    ids = torch.arange(100, 132)[None]
    logits = model(ids, Batch.make([0], [0], 32), cache)
    t0 = time.perf_counter()
    for i in range(steps):
        logits = model(logits.argmax(-1)[:, None], Batch.make([0], [32 + i], 1), cache)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp", type=Path, required=True, help="fp checkpoint (the bench model)")
    ap.add_argument("--bitstack", type=Path, required=True, help="its BitStack checkpoint")
    ap.add_argument("--work", type=Path, required=True, help="where the RTN variants are (made when missing)")
    ap.add_argument("--awq", type=Path, nargs="*", default=[], help="AWQ (or other) checkpoints to include")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--sizes", type=int, default=8, help="BitStack sizes to measure (at least 6)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--record", action="store_true", help="write qserve_quality.json into each variant")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bitstack.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dt = torch.bfloat16
    ids = encode_texts(args.fp, load_texts(corpus_path("wiki", "eval")))[: args.max_tokens]
    ctx = args.context
    rows: list[dict] = []

    def measure(model: CausalLM, label: str, kind: str, weight_bytes: int, vdir: Path, blocks: int | None) -> dict:
        t0 = time.perf_counter()
        nll = sliding_nll(model, ids, ctx, ctx)
        row = {"variant": label, "kind": kind, "blocks": blocks, "weight_bytes": weight_bytes,
               "ppl": nll.perplexity, "tokens": nll.tokens, "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.record:
            record_quality(vdir, nll.perplexity, nll.tokens, ctx, ctx, blocks=blocks, text="wiki/eval",
                           dtype="bfloat16")
        return row

    from qserve.offline import quantizers

    dense = [args.fp]
    for name, bits, gs in RTN:
        d = args.work / name
        if not (d / "config.json").is_file():
            quantizers()["rtn"].run(args.fp, d, argparse.Namespace(bits=bits, group_size=gs))
        dense.append(d)
    dense += args.awq
    decode: dict[str, float] = {}
    for d in dense:
        cfg = load_config(d)
        head = int8_head_default(cfg)
        model = load_model(d, dt, ctx, int8_head=head)
        kind = variant_kind(cfg)
        label = d.name if kind != "fp" else "bf16"
        measure(model, label, kind, resident_weight_bytes(d, dt, head), d, None)
        if d in (args.fp, args.work / "rtn-w4g128"):
            decode[label] = decode_ms(model)
        del model

    stack = BitStackStack(args.bitstack)
    sizes = {stack.min_blocks, stack.total_blocks}
    for r in rows[1:]:  # equal bytes with each quantized variant
        if r["weight_bytes"] >= stack.resident_bytes(stack.min_blocks, dt, True):
            sizes.add(stack.blocks_for_budget(r["weight_bytes"], dt, True))
    lo, hi = stack.resident_bytes(stack.min_blocks, dt, True), stack.resident_bytes(stack.total_blocks, dt, True)
    extra = max(0, args.sizes - len(sizes))
    for i in range(1, extra + 1):
        sizes.add(stack.blocks_for_budget(lo + (hi - lo) * i // (extra + 1), dt, True))
    t0 = time.perf_counter()
    model = stack.load_model(None, dt, ctx, int8_head=True)
    load_s = time.perf_counter() - t0
    resizes = []
    for n in sorted(sizes, reverse=True):
        rep = stack.apply(model, n)
        resizes.append((rep, rss_mib()))
        measure(model, f"bitstack@{n}", "bitstack", stack.resident_bytes(n, dt, True), args.bitstack, n)
        if n in (stack.total_blocks, min(sizes, key=lambda s: abs(stack.resident_bytes(s, dt, True) - rows[1]["weight_bytes"]))):
            decode[f"bitstack@{n}"] = decode_ms(model)
    mid = sorted(sizes)[len(sizes) // 2]
    for n in (mid, stack.total_blocks, stack.min_blocks, stack.total_blocks):
        resizes.append((stack.apply(model, n), rss_mib()))
    write_report(args, rows, resizes, decode, stack, load_s)


def write_report(args, rows, resizes, decode, stack: BitStackStack, load_s: float) -> None:
    prov_path = args.bitstack / "qserve_quantize.json"
    prov = json.loads(prov_path.read_text()) if prov_path.is_file() else {}
    lines = [
        "# BitStack on SmolLM2-135M: perplexity vs bytes, resize time, decode speed",
        "",
        f"Generated by `python bench/bitstack_quality.py` on {platform.machine()} with torch {torch.__version__}, "
        f"{args.threads} threads, load average at the end {os.getloadavg()[0]:.1f} (a shared 2-core machine: "
        "times are noisy, compare ratios within this run).",
        "",
        f"Perplexity: first {rows[0]['tokens'] + 1} tokens of the held-out wiki eval split (`qserve data`), context "
        f"{args.context}, stride {args.context}, bf16; the output head as the engine serves it (int8 for quantized "
        "checkpoints, which adds an int8 copy of SmolLM2's tied embedding). Weight bytes: what the runtime keeps "
        "resident (qserve.planner), BitStack including its reconstruction scratch.",
        "",
        f"BitStack: {prov.get('blocks', '?')} blocks of rank {prov.get('rank', '?')} per linear, calibration "
        f"{prov.get('samples', '?')} x {prov.get('seq_len', '?')} tokens of wiki/calib; decomposition "
        f"{prov.get('decompose_seconds', '?')} s and the whole `qserve quantize` {prov.get('seconds', '?')} s wall "
        f"(see the report text for CPU time). Stack: {stack.total_blocks} blocks, smallest model {stack.min_blocks} blocks.",
        "",
        "Caveat: SmolLM2's GGUF-derived weights sit on a Q4_1 grid (32-weight groups), which favours 4-bit "
        "RTN at aligned groups; groups 64/128 and 3 bits are the fairer comparison.",
        "",
        "| variant | kind | blocks | weight MiB | perplexity | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["weight_bytes"]):
        b = "-" if r["blocks"] is None else str(r["blocks"])
        lines.append(f"| {r['variant']} | {r['kind']} | {b} | {r['weight_bytes'] / MIB:.1f} | {r['ppl']:.3f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", f"Resize (BitStackStack.apply on the live model; loading all {stack.total_blocks} blocks at start: "
              f"{load_s:.1f} s):", "", "| from | to | blocks added | blocks dropped | MiB read | seconds | process RSS after, MiB |",
              "|---|---|---|---|---|---|---|"]
    for rep, rss in resizes:
        lines.append(f"| {rep.blocks_before} | {rep.blocks} | {rep.added} | {rep.dropped} | {rep.bytes_read / MIB:.1f} | "
                     f"{rep.seconds:.3f} | {rss:.0f} |")
    lines += ["", "Decode, batch 1, ms per token (16 steps after a 32-token prefill):", "",
              "| variant | ms/token |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in decode.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
