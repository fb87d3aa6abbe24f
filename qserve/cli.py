"""`qserve` command line: one module per subcommand under qserve.commands.

Each module defines `add_parser(subparsers)` and sets `func` on its parser. Errors the user can
act on (QServeError) print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from qserve import __version__
from qserve.errors import QServeError

COMMANDS = ("serve", "info", "quantize", "make_tiny", "pull", "data", "eval", "plan")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (`only`) just one command's: some commands' parsers import torch to
    list methods, and a one-line `qserve pull` should not pay for that."""
    parser = argparse.ArgumentParser(prog="qserve", description="LLM quantization serving backend")
    parser.add_argument("--version", action="version", version=f"qserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS if only is None else (only,):
        mod_name = f"qserve.commands.{name}"
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue  # a command whose module is not part of this build
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = argv[0].replace("-", "_") if argv else None
    args = build_parser(first if first in COMMANDS else None).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QServeError as e:
        print(f"qserve {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
