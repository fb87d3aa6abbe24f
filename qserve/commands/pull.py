"""`qserve pull SOURCE [--out DIR]`: make a local checkpoint directory (see qserve.pull)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from qserve.pull import ALIASES

    known = ", ".join(f"{k} ({a.about})" for k, a in sorted(ALIASES.items()))
    p = sub.add_parser(
        "pull", help="fetch or convert a model into a local safetensors checkpoint",
        description="Make a local Hugging Face checkpoint directory and print its path (the last "
                    f"line of stdout). SOURCE is an alias [{known}], a local .gguf file, or a "
                    "Hugging Face repo id. Converted models are cached under $QSERVE_HOME/models.")
    p.add_argument("source", help="alias, .gguf file or owner/name repo id")
    p.add_argument("--out", help="output directory (default: the cache under $QSERVE_HOME)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qserve.pull import pull

    print(pull(args.source, args.out))
    return 0
