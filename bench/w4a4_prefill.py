"""W4A4 prefill speed: integer GEMM (torch._int_mm, int4 values in int8) against bf16 F.linear at
SmolLM2-135M's linear shapes, the time share of the online transforms, and (given checkpoints)
whole-model prefill tokens/s.

Layer part (synthetic weights, no checkpoint needed): for each linear shape and M tokens, the median
of --repeat timed calls of
- bf16: F.linear(x_bf16, W_bf16);
- int_mm: torch._int_mm(x_int8, W_int8ᵀ) alone;
- W4A4 layer: qserve.w4a4.W4A4Linear end to end (online transform + per-token quantization +
  integer GEMM + scales), with no transform, QuaRot's Hadamard (down_proj/o_proj) or FlatQuant's
  Kronecker factors, and the transform alone.
Model part (`--models DIR ...`): one forward of M tokens (fresh prefill) per checkpoint, with the
time spent in W4A4 online transforms and the q/k Hadamard accumulated by wrapping them.

    python bench/w4a4_prefill.py --threads 2
    python bench/w4a4_prefill.py --models ~/.cache/qserve/models/smollm2-135m /tmp/qserve-w4a4/quarot-w4a4
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2-135M: hidden 576, 9 heads / 3 KV heads of 64, FFN 1536 (q/k/v and gate/up fused as served)
SHAPE_SETS = {
    "smollm2-135m": (("qkv", 576, 960), ("o_proj", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576)),
    # Llama-3-8B (14336 = 28·512), to see the GEMMs where they dominate
    "llama3-8b": (("qkv", 4096, 6144), ("o_proj", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)),
}


def median_time(fn, repeat: int, device: str = "cpu") -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def layer_rows(shapes: tuple, ms: list[int], repeat: int, dev: str = "cpu") -> list[str]:
    from qserve.hadamard import hadamard_matrix, random_signs
    from qserve.w4a4 import W4A4Linear, kron_factors, pack_weight, quantize_weight_sym

    rows = []
    qcfg = {"quant_method": "x", "w_bits": 4, "a_bits": 4, "a_clip": 0.9}
    for m in ms:
        tot = {"bf16": 0.0, "int_mm": 0.0, "plain": 0.0, "quarot": 0.0, "flat": 0.0, "had": 0.0, "kron": 0.0}
        for name, k, n in shapes:
            w = torch.randn(n, k)
            x = torch.randn(m, k, device=dev)
            xb, wb = x.bfloat16(), w.bfloat16().to(dev)
            q, s = quantize_weight_sym(w, 4)
            st = pack_weight(q, s)
            a, b = kron_factors(k)
            variants = {
                "plain": W4A4Linear(st, k, n, qcfg, torch.bfloat16),
                "quarot": W4A4Linear(st | {"had_signs": random_signs(k, 0)}, k, n, qcfg, torch.bfloat16),
                "flat": W4A4Linear(st | {"trans_left": hadamard_matrix(a, torch.float32),
                                        "trans_right": hadamard_matrix(b, torch.float32)},
                                   k, n, qcfg, torch.bfloat16),
            }
            for layer in variants.values():
                layer.to(dev)
            xq = torch.randint(-8, 8, (m, k), dtype=torch.int8, device=dev)
            wq_t = variants["plain"].qweight.t()
            t = {
                "bf16": median_time(lambda: F.linear(xb, wb), repeat, dev),
                "int_mm": median_time(lambda: torch._int_mm(xq, wq_t), repeat, dev),
                "had": median_time(lambda: variants["quarot"].online(xb), repeat, dev),
                "kron": median_time(lambda: variants["flat"].online(xb), repeat, dev),
            }
            for v, layer in variants.items():
                t[v] = median_time(lambda: layer(xb), repeat, dev)
            for key in tot:
                tot[key] += t[key]
            rows.append(f"| {m} | {name} {k}→{n} | {t['bf16'] * 1e3:.2f} | {t['int_mm'] * 1e3:.2f} | "
                        f"{t['plain'] * 1e3:.2f} | {t['quarot'] * 1e3:.2f} ({t['had'] * 1e3:.2f}) | "
                        f"{t['flat'] * 1e3:.2f} ({t['kron'] * 1e3:.2f}) |")
        rows.append(f"| {m} | **sum of one layer's linears** | {tot['bf16'] * 1e3:.2f} | {tot['int_mm'] * 1e3:.2f} | "
                    f"{tot['plain'] * 1e3:.2f} | {tot['quarot'] * 1e3:.2f} ({tot['had'] * 1e3:.2f}) | "
                    f"{tot['flat'] * 1e3:.2f} ({tot['kron'] * 1e3:.2f}) |")
    return rows


def model_rows(dirs: list[Path], ms: list[int], repeat: int) -> list[str]:
    """Prefill of M tokens per checkpoint; time inside online transforms accumulated by wrapping."""
    from qserve.hadamard import QKRotation
    from qserve.kvcache import Batch, KVCache
    from qserve.model import load_model
    from qserve.w4a4 import W4A4Linear

    spent = {"t": 0.0}

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            spent["t"] += time.perf_counter() - t0
            return out
        return wrapper

    rows = []
    orig_online, orig_qk = W4A4Linear.online, QKRotation.__call__
    W4A4Linear.online = timed(orig_online)
    QKRotation.__call__ = timed(orig_qk)
    try:
        for d in dirs:
            model = load_model(d, torch.bfloat16, max(ms))
            c = model.cfg
            for m in ms:
                ids = torch.randint(0, c.vocab_size, (1, m))
                cache = KVCache(c.num_layers, 1, m, c.num_kv_heads, c.head_dim, torch.bfloat16)
                batch = Batch.make([0], [0], m)
                run = lambda: model(ids, batch, cache)  # noqa: E731
                run()
                ts, shares = [], []
                for _ in range(repeat):
                    spent["t"] = 0.0
                    t0 = time.perf_counter()
                    run()
                    ts.append(time.perf_counter() - t0)
                    shares.append(spent["t"])
                sec = statistics.median(ts)
                method = (c.quantization_config or {}).get("quant_method", "bf16")
                rows.append(f"| {d.name} | {method} | {m} | {sec * 1e3:.0f} | {m / sec:.0f} | "
                            f"{statistics.median(shares) / sec:.1%} |")
    finally:
        W4A4Linear.online, QKRotation.__call__ = orig_online, orig_qk
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--models", nargs="*", default=[], help="checkpoints for whole-model prefill")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the layer part runs")
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="smollm2-135m", help="linear shapes of the layer part")
    p.add_argument("--results", default=str(ROOT / "bench/results/w4a4_prefill.md"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = [
        f"# W4A4 prefill: integer GEMM vs bf16 ({args.shapes} shapes)", "",
        f"Median of {args.repeat} calls, ms. int_mm = torch._int_mm alone (int8 × int8 → int32). W4A4 layer = "
        "qserve.w4a4.W4A4Linear end to end from bf16 input: online transform (in parentheses, alone), per-token "
        "4-bit quantization, integer GEMM, per-token × per-channel scales, bf16 output. QuaRot puts its Hadamard "
        "only on o_proj and down (576 = 36·16, 1536 = 12·128); the column shows it on every shape for comparison.",
        "", "| M | linear | bf16 F.linear | int_mm | W4A4 no transform | W4A4 + Hadamard (transform) | "
        "W4A4 + Kronecker (transform) |", "|---|---|---|---|---|---|---|",
    ]
    lines += layer_rows(SHAPE_SETS[args.shapes], args.tokens, args.repeat, args.device)
    if args.models:
        lines += ["", "## Whole-model prefill (one forward of M tokens, bf16 compute, dense KV)", "",
                  "| checkpoint | method | M | ms | tokens/s | share in online transforms (incl. q/k Hadamard) |",
                  "|---|---|---|---|---|---|"]
        lines += model_rows([Path(d) for d in args.models], args.tokens, max(3, args.repeat // 2))
    gpu = f", layer part on {torch.cuda.get_device_name()}" if args.device == "cuda" else ""
    lines += ["", f"Machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs{gpu}, torch "
              f"{torch.__version__}, {torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}.", ""]
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
