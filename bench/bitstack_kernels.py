"""BitStack runtime options on CPU, at SmolLM2-135M's linear shapes (random blocks, bf16 compute).

- dense: the weight reconstructed once per resize and held in bf16 (fast, but the resident bytes
  are the bf16 model's: no memory saving);
- reconstruct: what BitStackLinear does, the dense weight rebuilt from the packed blocks at every
  call into the shared scratch, then one F.linear;
- sign-lowrank: y = Σ_i Σ_j u_ij ⊙ (S_i (x ⊙ v_ij)), the signs unpacked into the same scratch.

Prints the best µs per call over --reps calls for M tokens per call and k blocks per layer, and the one-off reconstruct time
(the per-resize cost of `dense`). Run: python bench/bitstack_kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qserve.quant_methods.bitstack import (
    STORE_DTYPE, Block, BitStackLinear, BitStackPart, _sign_lut, pack_signs, reconstruct, sign_row_bytes,
)

SHAPES = {"qkv 576->960": (576, [576, 192, 192]), "o 576->576": (576, [576]),
          "gate_up 576->3072": (576, [1536, 1536]), "down 1536->576": (1536, [576])}


def random_blocks(n: int, k: int, count: int, rank: int, g: torch.Generator) -> list[Block]:
    return [Block((torch.randn(n, rank, generator=g) * 0.05).to(STORE_DTYPE),
                  (torch.randn(k, rank, generator=g) * 0.05).to(STORE_DTYPE),
                  pack_signs(torch.rand(n, k, generator=g) > 0.5)) for _ in range(count)]


def sign_lowrank(x: torch.Tensor, blocks: list[Block], n: int, k: int, signs: torch.Tensor,
                 index: torch.Tensor) -> torch.Tensor:
    lut = _sign_lut(x.dtype)
    y = torch.zeros(x.shape[0], n, dtype=x.dtype)
    for b in blocks:
        index.copy_(b.signs.view(-1))
        torch.index_select(lut, 0, index, out=signs)
        s = signs.view(n, -1)[:, :k]
        z = (x[:, None, :] * b.v.t().contiguous()[None]).reshape(-1, k)  # [M*r, K], rows x ⊙ v_j
        t = F.linear(z, s).view(x.shape[0], -1, n)  # [M, r, N]
        y += (t * b.u.t().contiguous()).sum(1)
    return y


def timeit(fn, reps: int) -> float:
    """Best of `reps` calls, in µs: the least disturbed run on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 128])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    print(f"torch {torch.__version__}, {args.threads} threads, rank {args.rank}, bf16; µs per call")
    print("| shape | blocks | tokens | dense | reconstruct | sign-lowrank | reconstruct / dense | one-off reconstruct |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (k, outs) in SHAPES.items():
        all_blocks = [random_blocks(n, k, max(args.blocks), args.rank, g) for n in outs]
        for nb in args.blocks:
            parts = [BitStackPart(j, n, k, args.rank, bl[:nb]) for j, (n, bl) in enumerate(zip(outs, all_blocks))]
            layer = BitStackLinear(parts, None, dt)
            once = timeit(lambda: torch.cat([reconstruct(p.blocks(), p.out_features, k, dt) for p in parts]), 3)
            w = torch.cat([reconstruct(p.blocks(), p.out_features, k, dt) for p in parts])
            nmax = max(outs)
            signs = torch.empty(nmax * sign_row_bytes(k), 8, dtype=dt)
            index = torch.empty(nmax * sign_row_bytes(k), dtype=torch.int32)
            for m in args.tokens:
                x = torch.randn(m, k).to(dt)
                t_dense = timeit(lambda: F.linear(x, w), args.reps * 5)
                t_rec = timeit(lambda: layer(x), args.reps)
                t_slr = timeit(lambda: torch.cat(
                    [sign_lowrank(x, p.blocks(), p.out_features, k, signs[:p.out_features * sign_row_bytes(k)],
                                  index[:p.out_features * sign_row_bytes(k)]) for p in parts], -1), args.reps)
                print(f"| {label} | {nb} | {m} | {t_dense:.0f} | {t_rec:.0f} | {t_slr:.0f} | "
                      f"{t_rec / t_dense:.1f}x | {once:.0f} |", flush=True)


if __name__ == "__main__":
    main()
