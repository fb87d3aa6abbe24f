"""KV-cache variants on SmolLM2-135M: perplexity at context 2048 and KV bytes per token.

Rows: KV bf16 / int8 / int4 on the fp checkpoint; CSKV at ratios 0.5, 0.3, 0.2 with bf16 and
int4 features (checkpoints made here if missing); SageAttention2 emulation (INT4 and INT8 Q·K,
FP8 P·V) on the fp checkpoint. Perplexity: held-out wiki eval split, windows of `--context`
tokens every `--context` tokens (each window a fresh prefill; CSKV's bi-branch visibility is
the same as in token-by-token decode), bf16 compute, the first `--max-tokens` tokens.

    python bench/kv_quality.py [--max-tokens 16384] [--work DIR] [--only NAME ...] [--resume]

Writes bench/results/kv.md (rows are appended to it as they finish).
"""

from __future__ import annotations

import argparse
import json
from functools import partial
import shutil
import sys
import time
from pathlib import Path

import torch

from qserve.attention import register_attention
from qserve.calib import encode_texts
from qserve.config import load_config
from qserve.corpus import corpus_path, load_texts
from qserve.evaluate import NLL, window_nll
from qserve.kvformats import kv_bytes_per_token, kv_window_bytes, make_kv_cache
from qserve.model import load_model
from qserve.pull import pull, qserve_home
from qserve.quant_methods.sage_attention import sage_attention

RATIOS = (0.5, 0.3, 0.2)


def perplexity(model_dir: Path, ids: torch.Tensor, context: int, kv_format: str, attention: str) -> tuple[NLL, float]:
    from qserve.attention import get_attention

    model = load_model(model_dir, torch.bfloat16, context)
    model.attention = get_attention(attention)
    cache = make_kv_cache(model, kv_format, 1, context)
    out = NLL()
    t0 = time.perf_counter()
    for begin in range(0, ids.numel() - 1, context):
        win = ids[begin:begin + context]
        if win.numel() >= 2:
            out.add(window_nll(model, cache, win, 1))
    return out, time.perf_counter() - t0


def make_cskv(src: Path, out: Path, ratio: float, steps: int, args: argparse.Namespace) -> Path:
    """A CSKV checkpoint (bf16 features) with `steps` Adam steps of refinement per layer."""
    if (out / "config.json").is_file():
        return out
    from qserve.offline import record_provenance
    from qserve.quant_methods import cskv

    ns = argparse.Namespace(kv_ratio=ratio, window=args.window, feature_bits=16, refine_steps=steps, refine_lr=1e-3,
                            refine_windows=args.refine_windows, calib=None, samples=args.samples, seq_len=512, seed=0)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    info = cskv.run(src, tmp, ns)
    record_provenance(tmp, {"method": "cskv", "source": str(src), "seconds": round(time.perf_counter() - t0, 1), **info})
    tmp.rename(out)
    return out


def with_feature_bits(ckpt: Path, out: Path, bits: int) -> Path:
    """The same factors with the cached features stored at `bits` (quantized at runtime; no
    quantization-aware refinement): links to the tensors, a config with feature_bits changed."""
    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["kv_compression"]["feature_bits"] = bits
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.add_argument("--work", default=str(qserve_home() / "kvbench"), help="where CSKV checkpoints are kept")
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--refine-steps", type=int, default=60)
    p.add_argument("--refine-windows", type=int, default=16)
    p.add_argument("--refine-ratios", nargs="*", default=["0.5"],
                   help="ratios whose factors are refined with Adam (the others keep the whitened SVD)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--resume", action="store_true", help="keep the rows already in --out and skip them")
    p.add_argument("--only", nargs="*", default=None, help="row names to run (default all)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kv.md"))
    args = p.parse_args()

    src = pull(args.model)
    cfg = load_config(src)
    ids = encode_texts(src, load_texts(corpus_path("wiki", "eval")))[:args.max_tokens]
    work = Path(args.work)
    rows: list[tuple[str, Path | None, str, str]] = [
        ("KV bf16", None, "model", "sdpa"), ("KV int8", None, "int8", "sdpa"), ("KV int4", None, "int4", "sdpa"),
    ]
    def cskv_dir(r: float, steps: int) -> Path:
        return work / f"{args.model}-cskv{r}-w{args.window}-s{steps}"

    refined = {float(r) for r in args.refine_ratios}
    for r in RATIOS:
        steps = args.refine_steps if r in refined else 0
        tag = "" if steps else " (SVD init only)"
        rows.append((f"CSKV {r}{tag}", cskv_dir(r, steps), "cskv", "sdpa"))
        rows.append((f"CSKV {r}{tag} + int4 features", cskv_dir(r, steps), "cskv", "sdpa"))
    rows += [(f"CSKV {r} (SVD init only)", cskv_dir(r, 0), "cskv", "sdpa") for r in sorted(refined, reverse=True)]
    rows += [("Sage INT4 QK / FP8 PV", None, "model", "sage"), ("Sage INT8 QK / FP8 PV", None, "model", "sage8"),
             ("Sage INT4, no Q smoothing (decode arithmetic)", None, "model", "sage-decode")]
    register_attention("sage-decode", partial(sage_attention, smooth_q=False))
    if args.only:
        rows = [r for r in rows if r[0] in args.only]
    bf16 = kv_bytes_per_token(cfg, "model")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# KV variants on {args.model}: perplexity, context {args.context}\n\n"
              f"Held-out wiki eval split, first {ids.numel()} tokens ({ids.numel() // args.context} windows of "
              f"{args.context}, stride {args.context}), bf16 compute, one run. KV bytes/token: all "
              f"{cfg.num_layers} layers; CSKV adds a per-sequence window of {args.window} full-precision tokens, "
              f"counted in the 'at {args.context}' column. CSKV: factors from {args.samples} x 512 calibration tokens, refined "
              f"(ratios {' '.join(args.refine_ratios)}) with {args.refine_steps} Adam steps/layer (batch 1) on "
              f"{args.refine_windows} windows of 256 tokens, the others whitened SVD only; "
              "'+ int4 features' reuses those factors with int4 cached features (groups of 32, no "
              "quantization-aware refinement).\n\n"
              "| variant | KV format | attention | KV bytes/token | vs bf16 | KV MiB/seq at "
              f"{args.context} | vs bf16 | perplexity | tokens | eval s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    kept = ""
    if args.resume and out.exists():  # keep finished rows, refresh the header
        kept = "".join(line for line in out.read_text().splitlines(keepends=True)
                       if line.startswith("| ") and not line.startswith(("| variant", "|---")))
    out.write_text(header + kept)
    done = kept
    for name, ckpt, fmt, attn in rows:
        if f"| {name} |" in done:
            continue
        model_dir = src
        if ckpt is not None:
            model_dir = make_cskv(src, ckpt, float(name.split()[1]), int(ckpt.name.rsplit("-s", 1)[1]), args)
            if "int4 features" in name:
                model_dir = with_feature_bits(model_dir, ckpt.with_name(ckpt.name + "-f4"), 4)
        mcfg = load_config(model_dir)
        per_tok = kv_bytes_per_token(mcfg, fmt)
        at_ctx = args.context * per_tok + kv_window_bytes(mcfg, fmt)
        nll, secs = perplexity(model_dir, ids, args.context, fmt, attn)
        line = (f"| {name} | {fmt} | {attn} | {per_tok} | {per_tok / bf16:.1%} | {at_ctx / 2**20:.2f} | "
                f"{at_ctx / (args.context * bf16):.1%} | {nll.perplexity:.3f} | {nll.tokens} | {secs:.0f} |")
        print(line, flush=True)
        with out.open("a") as f:
            f.write(line + "\n")
        if ckpt is not None:
            prov = json.loads((ckpt / "qserve_quantize.json").read_text())
            print(f"  {name}: rank {prov['rank']}, quantize {prov['seconds']} s, mean layer rel err "
                  f"svd {prov['mean_rel_err_svd']:.4f} -> refined {prov['mean_rel_err_refined']:.4f}",
                  file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
