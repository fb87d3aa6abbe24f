"""`qserve plan`: which variant of a model fits a memory budget, and how large a BitStack can be."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from qserve.planner import DEFAULT_CONCURRENCY, DEFAULT_CONTEXT

    p = sub.add_parser("plan", help="pick the best-quality variant of a model that fits a memory budget")
    p.add_argument("model", metavar="MODEL_DIR", help="a checkpoint, or a directory of variant checkpoints")
    p.add_argument("--memory-budget", required=True,
                   help="bytes for weights + KV cache + runtime: 'auto', 3GiB, 512MiB, 2.5GB, ...")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"tokens per sequence the KV cache holds (serve --max-model-len; default {DEFAULT_CONTEXT})")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help=f"sequences served at once (serve --max-num-seqs; default {DEFAULT_CONCURRENCY})")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="serving dtype (serve --dtype; auto is bfloat16)")
    p.add_argument("--head", choices=["auto", "int8", "model"], default="auto",
                   help="output head precision, as serve --head")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="draw perplexity vs memory with the budget line (needs matplotlib)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qserve.planner import plan, plot
    from qserve.sysmem import format_bytes, parse_budget

    budget = parse_budget(args.memory_budget)
    p = plan(args.model, budget, args.context, args.concurrency, dtype=getattr(torch, args.dtype), head=args.head)
    print(f"budget {format_bytes(budget)}; KV cache for {args.context} tokens x {args.concurrency} sequences "
          f"({args.dtype}); runtime overhead {format_bytes(p.rows[0].overhead_bytes)}")
    print(p.table())
    for note in p.notes:
        print(f"note: {note}")
    c = p.choice
    size = f", {c.blocks} blocks" if c.blocks is not None else ""
    ppl = "unknown ppl" if c.ppl is None else f"ppl {c.ppl:.3f}"
    print(f"choice: {c.name} ({c.kind}{size}) at {format_bytes(c.bytes)}, {ppl}: {c.dir}")
    if args.plot:
        print(f"wrote {plot(p, args.plot)}")
    return 0
