"""`qserve make-tiny`: write the small random test checkpoint (see qserve.tiny)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny", help="write a small random Llama checkpoint for tests and demos")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", action="store_true", help="tie the output head to the embedding")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qserve.tiny import make_tiny_model

    print(make_tiny_model(args.out, seed=args.seed, tie=args.tie))
    return 0
