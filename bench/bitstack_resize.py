"""BitStack live resize: how long loading and dropping blocks takes on the live model, what it
reads, what the process holds after, and decode speed at a few sizes.

    python bench/bitstack_resize.py [BITSTACK_DIR]      # default: the family bench/quality.py made

Perplexity per size is bench/quality.py's job (same family, same evaluation); this measures the
runtime side of a budget change: BitStackStack.apply on a loaded model, the call the engine makes
between two steps when PUT /admin/memory-budget changes the size. Writes bench/results/bitstack_resize.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from qserve.kvcache import Batch, KVCache
from qserve.model import CausalLM
from qserve.quant_methods.bitstack_stack import BitStackStack
from qserve.sysmem import process_memory
from quality import bitstack_sizes

MIB = 2**20


def decode_ms(model: CausalLM, steps: int = 16) -> float:
    """ms per token at batch 1 after a 32-token prefill."""
    c = model.cfg
    cache = KVCache(c.num_layers, 1, 64, c.num_kv_heads, c.head_dim, model.dtype)
    logits = model(torch.arange(100, 132)[None], Batch.make([0], [0], 32), cache)
    t0 = time.perf_counter()
    for i in range(steps):
        logits = model(logits.argmax(-1)[:, None], Batch.make([0], [32 + i], 1), cache)
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bitstack", type=Path, nargs="?",
                    default=Path("~/.cache/qserve/families/smollm2-135m/bitstack").expanduser())
    ap.add_argument("--sizes", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bitstack_resize.md")
    args = ap.parse_args()
    dt = torch.bfloat16
    stack = BitStackStack(args.bitstack)
    sizes = bitstack_sizes(stack, args.sizes, dt)
    t0 = time.perf_counter()
    model = stack.load_model(None, dt, 128, int8_head=True)
    load_s = time.perf_counter() - t0
    moves, decode = [], {}
    path = sizes + sizes[-2::-1] + [sizes[len(sizes) // 2], stack.total_blocks]  # all the way down, up, jumps
    for n in path:
        rep = stack.apply(model, n)
        moves.append((rep, process_memory().get("rss", 0)))
        if n in (sizes[0], sizes[len(sizes) // 2], sizes[-1]) and n not in decode:
            decode[n] = decode_ms(model)
    lines = [
        f"# BitStack live resize: {args.bitstack.name}",
        "",
        f"`python bench/bitstack_resize.py` on {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}. "
        f"Stack: {stack.total_blocks} blocks, smallest model {stack.min_blocks}; loading it whole took {load_s:.1f} s.",
        "",
        "| from blocks | to blocks | resident weight MiB after | blocks added | blocks dropped | MiB read | seconds | process RSS after MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rep, rss in moves:
        lines.append(f"| {rep.blocks_before} | {rep.blocks} | {stack.resident_bytes(rep.blocks, dt, True) / MIB:.1f} | "
                     f"{rep.added} | {rep.dropped} | {rep.bytes_read / MIB:.1f} | {rep.seconds:.3f} | {rss / MIB:.0f} |")
    lines += ["", "Decode at batch 1 (ms per token, 16 steps after a 32-token prefill):", "",
              "| blocks | resident weight MiB | ms/token |", "|---|---|---|"]
    lines += [f"| {n} | {stack.resident_bytes(n, dt, True) / MIB:.1f} | {ms:.1f} |" for n, ms in decode.items()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
