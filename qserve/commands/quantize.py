"""`qserve quantize`: run a method's offline step on an fp checkpoint, writing a new checkpoint."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from qserve.offline import quantizers

    qs = quantizers()
    p = sub.add_parser("quantize", help="quantize a checkpoint with one of qserve's methods")
    p.add_argument("model", help="fp checkpoint directory (or cached hub id)")
    p.add_argument("--method", required=True, choices=sorted(qs))
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    for q in qs.values():
        q.add_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qserve.checkpoint import resolve_model_dir
    from qserve.errors import ConfigError
    from qserve.offline import quantizers, record_provenance
    from qserve.sysmem import process_memory

    src = resolve_model_dir(args.model)
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise ConfigError("--out must differ from the source checkpoint")
    t0 = time.perf_counter()
    info = quantizers()[args.method].run(src, out, args)
    took = time.perf_counter() - t0
    # This process's own peak (VmHWM): a parent's rusage of its child would not do, since Linux
    # carries ru_maxrss over execve, so the child would report at least the parent's peak.
    peak = process_memory().get("peak")
    record_provenance(out, {"method": args.method, "source": str(src), "seconds": round(took, 1),
                            **({"peak_rss_mib": round(peak / 2**20)} if peak else {}), **info})
    print(f"wrote {out} ({args.method}, {took:.1f} s)")
    return 0
