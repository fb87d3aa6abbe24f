"""`qserve eval`: perplexity and weight bytes of one or more checkpoints, one Markdown row each."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (sliding window) and weight bytes of checkpoints")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="checkpoint directories (fp or quantized)")
    p.add_argument("--text", default=None, metavar="PATH",
                   help="text file or JSONL of {\"text\": ...} (default: the held-out wiki eval split)")
    p.add_argument("--context", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--stride", type=int, default=2048, help="tokens between window starts (default 2048)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                   help="compute dtype of the non-quantized parts (default bfloat16, what the server runs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from qserve.checkpoint import resolve_model_dir
    from qserve.corpus import corpus_path, load_texts
    from qserve.errors import ConfigError
    from qserve.evaluate import MARKDOWN_HEADER, evaluate_dir

    if args.max_tokens is not None and args.max_tokens < 2:
        raise ConfigError("--max-tokens must be at least 2")
    text = Path(args.text) if args.text else corpus_path("wiki", "eval")
    texts = load_texts(text)
    dirs = [resolve_model_dir(m) for m in args.models]
    limit = "all tokens" if args.max_tokens is None else f"first {args.max_tokens} tokens"
    print(f"perplexity of {text} ({limit}), context {args.context}, stride {args.stride}, dtype {args.dtype}")
    print(MARKDOWN_HEADER, flush=True)
    for d in dirs:
        row = evaluate_dir(d, texts, args.context, args.stride, args.max_tokens, getattr(torch, args.dtype))
        print(row.markdown(), flush=True)
    return 0
