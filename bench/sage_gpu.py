"""SageAttention2-style attention on a CUDA GPU: our Triton kernel (INT8 MMA for INT8 or INT4-range
Q·K codes, FP8 e4m3 P̃·V) against the exact torch emulation, fp32 attention, PyTorch SDPA (bf16
flash) and the `sageattention` 1.0.6 package (SageAttention1: INT8 Q·K, fp16 P·V) as a baseline.

    python bench/sage_gpu.py [--out FILE]

Needs torch with CUDA and triton (sageattention optional). Never part of CI.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0))


def main() -> int:
    import triton
    import triton.testing

    from qserve.quant_methods.sage_attention import sage_attention
    from qserve.quant_methods.sage_triton import quantize_inputs, sage_attention_triton, sage_kernel

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    try:
        from sageattention import sageattn
    except ImportError:
        sageattn = None
    dev = torch.device("cuda")
    lines = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
             f"sageattention {'1.0.6' if sageattn else 'absent'}", ""]

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    g = torch.Generator(device=dev).manual_seed(0)
    say("## Accuracy (causal, random q/k/v ~ N(0,1), k + a per-channel bias of std 3)")
    say("| shape B,H,Hkv,L,D | Q·K | PV | kernel vs emulation: cosine / max abs diff | kernel vs fp32: cosine | emulation vs fp32 |")
    say("|---|---|---|---|---|---|")
    for b, h, hkv, n, d in ((2, 9, 3, 1024, 64), (1, 32, 8, 2048, 128)):
        q = torch.randn(b, h, n, d, device=dev, generator=g)
        k = torch.randn(b, hkv, n, d, device=dev, generator=g) + 3 * torch.randn(1, 1, 1, d, device=dev, generator=g)
        v = torch.randn(b, hkv, n, d, device=dev, generator=g)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        for bits in (8, 4):
            emu = sage_attention(q, k, v, None, smooth_q=False, qk_bits=bits)
            for fp8 in (True, False):
                try:
                    ker = sage_attention_triton(q, k, v, qk_bits=bits, pv_fp8=fp8).float()
                except Exception as e:  # a Triton build without FP8 MMA on this GPU
                    say(f"| {b},{h},{hkv},{n},{d} | INT{bits} | {'FP8' if fp8 else 'fp16'} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
                    continue
                say(f"| {b},{h},{hkv},{n},{d} | INT{bits} | {'FP8' if fp8 else 'fp16'} | {cos(ker, emu):.6f} / "
                    f"{float((ker - emu).abs().max()):.2e} | {cos(ker, ref):.5f} | {cos(emu, ref):.5f} |")
        if sageattn is not None:
            kk, vv = (x.repeat_interleave(h // hkv, 1).half().contiguous() for x in (k, v))
            s1 = sageattn(q.half().contiguous(), kk, vv, is_causal=True).float()
            say(f"| {b},{h},{hkv},{n},{d} | sageattention 1.0.6 (INT8 QK, fp16 PV) | | | {cos(s1, ref):.5f} | |")

    say("")
    say("## Speed (causal, bf16 inputs; ms per call, do_bench median; TFLOP/s counts 2·2·B·H·L²·D/2)")
    say("| shape B,H,Hkv,L,D | SDPA bf16 (flash) | sageattention 1.0.6 | ours INT8 QK + FP8 PV, kernel | ours incl. torch quantization | ours FP8 PV, V stored transposed, best config | ours kernel, fp16 PV |")
    say("|---|---|---|---|---|---|---|")
    for b, h, hkv, n, d in ((16, 9, 3, 2048, 64), (4, 32, 32, 4096, 128), (1, 32, 32, 16384, 128)):
        q = torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(b, hkv, n, d, device=dev, dtype=torch.bfloat16, generator=g)
        flops = 2 * 2 * b * h * n * n * d / 2

        def fmt(ms: float) -> str:
            return f"{ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)"

        cells = [fmt(triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)))]
        if sageattn is not None:
            kk, vv = (x.repeat_interleave(h // hkv, 1).contiguous() for x in (k, v))
            cells.append(fmt(triton.testing.do_bench(lambda: sageattn(q, kk, vv, is_causal=True))))
        else:
            cells.append("-")
        qi, sq, ki, sk, v8, sv = quantize_inputs(q, k, v, 8)
        for fp8 in (True,):
            try:
                cells.append(fmt(triton.testing.do_bench(lambda: sage_kernel(qi, sq, ki, sk, v8, sv, q.dtype, True, fp8))))
            except Exception as e:
                cells.append(f"failed: {type(e).__name__}")
        cells.append(fmt(triton.testing.do_bench(lambda: sage_attention_triton(q, k, v, qk_bits=8))))
        v8t = v8.transpose(2, 3).contiguous().transpose(2, 3)
        best = None
        for nw, ns in ((4, 2), (8, 2), (8, 3), (4, 3)):
            ms = triton.testing.do_bench(lambda: sage_kernel(qi, sq, ki, sk, v8t, sv, q.dtype, True, True,
                                                             num_warps=nw, num_stages=ns))
            best = min(best or (ms, nw, ns), (ms, nw, ns))
        ok = cos(sage_kernel(qi, sq, ki, sk, v8t, sv, q.dtype, True, True).float(),
                 sage_kernel(qi, sq, ki, sk, v8, sv, q.dtype, True, True).float())
        cells.append(f"{fmt(best[0])}, warps {best[1]}, stages {best[2]} (cos vs row-major V {ok:.6f})")
        try:
            cells.append(fmt(triton.testing.do_bench(lambda: sage_kernel(qi, sq, ki, sk, v8, sv, q.dtype, True, False))))
        except Exception as e:
            cells.append(f"failed: {type(e).__name__}")
        say(f"| {b},{h},{hkv},{n},{d} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
