"""SageAttention2-style attention as a Triton kernel (CUDA only; never imported on CPU or in CI).

The quantization is done in torch by the same functions as the CPU emulation
(qserve.quant_methods.sage_attention): K smoothed by its mean, Q and K to symmetric integers with
per-token scale vectors (per-thread groups: Q blocks of 32 tokens in 8 groups, K blocks of 64 in
4), V to FP8 e4m3 with a per-channel scale. The kernel is a flash-attention loop over K blocks of
64: S = int8 MMA (int32 accumulation) × q_scale × k_scale, online softmax in fp32, P̃·448 cast to
FP8 e4m3 and P̃·V by an FP8 MMA with fp32 accumulation. Hopper has no INT4 MMA, so "INT4" runs
its [-7, 7] codes through the INT8 MMA: the same integer products and sums as an INT4 MMA.
Q smoothing (the fp32 q̄·Kᵀ bias) is not in the kernel: compare it with the emulation's
smooth_q=False. Causal masking assumes the queries are the last L_q of L_k positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qserve.quant_methods.sage_attention import FP8, FP8_MAX, K_BLOCK, Q_BLOCK, quantize_int


@triton.jit
def _sage_fwd(Q, K, V, QS, KS, VS, Out, L_q, L_k, sm_scale,
              sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, svd, sob, soh, som,
              H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, PV_FP8: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // G
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=offs_m[:, None] < L_q, other=0)
    qs = tl.load(QS + bh * L_q + offs_m, mask=offs_m < L_q, other=0.0) * sm_scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    shift = L_k - L_q
    hi = L_k
    if CAUSAL:  # at most one block past L_k (fully masked) for the last Q block
        hi = (start_m + 1) * BLOCK_M + shift
    kv_bh = b * (H // G) + hk
    for start_n in range(0, hi, BLOCK_N):
        n = start_n + offs_n
        k = tl.load(K + b * skb + hk * skh + n[None, :] * skn + offs_d[:, None], mask=n[None, :] < L_k, other=0)
        ks = tl.load(KS + kv_bh * L_k + n, mask=n < L_k, other=0.0)
        s = tl.dot(q, k).to(tl.float32) * qs[:, None] * ks[None, :]
        valid = n[None, :] < L_k
        if CAUSAL:
            valid = valid & (n[None, :] <= offs_m[:, None] + shift)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + b * svb + hk * svh + n[:, None] * svn + offs_d[None, :] * svd, mask=n[:, None] < L_k, other=0.0)
        if PV_FP8:
            acc = tl.dot((p * 448.0).to(tl.float8e4nv), v, acc)
        else:
            acc = tl.dot((p * 448.0).to(tl.float16), v.to(tl.float16), acc)
        m_i = m_new
    vs = tl.load(VS + kv_bh * D + offs_d)
    out = acc / l_i[:, None] * (vs[None, :] / 448.0)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < L_q)


def quantize_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk_bits: int) -> tuple[torch.Tensor, ...]:
    """The emulation's quantization (no Q smoothing): int8 codes, per-token fp32 scales, FP8 V."""
    kf = k.float()
    ks = kf - kf.mean(2, keepdim=True)
    qi, sq = quantize_int(q.float(), Q_BLOCK, "q", qk_bits)
    ki, sk = quantize_int(ks, K_BLOCK, "k", qk_bits)
    sv = (v.float().abs().amax(2, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    v8 = (v.float() / sv).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (qi.to(torch.int8).contiguous(), sq.contiguous(), ki.to(torch.int8).contiguous(), sk.contiguous(),
            v8.contiguous(), sv.squeeze(2).contiguous())


def sage_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                          qk_bits: int = 8, pv_fp8: bool = True, block_m: int = 128) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D] on CUDA -> [B, H, Lq, D] in q's dtype."""
    qi, sq, ki, sk, v8, sv = quantize_inputs(q, k, v, qk_bits)
    return sage_kernel(qi, sq, ki, sk, v8, sv, q.dtype, causal, pv_fp8, block_m)


def sage_kernel(qi: torch.Tensor, sq: torch.Tensor, ki: torch.Tensor, sk: torch.Tensor, v8: torch.Tensor,
                sv: torch.Tensor, dtype: torch.dtype, causal: bool, pv_fp8: bool, block_m: int = 128,
                num_warps: int | None = None, num_stages: int = 3) -> torch.Tensor:
    """v8 [B, Hkv, L, D] in any strides: a transposed copy (contiguous along L, as Hopper's FP8
    MMA wants its B operand) is passed as v8.transpose(2, 3).contiguous().transpose(2, 3)."""
    b, h, lq, d = qi.shape
    hkv, lk = ki.shape[1], ki.shape[2]
    out = torch.empty(b, h, lq, d, device=qi.device, dtype=dtype)
    grid = (triton.cdiv(lq, block_m), b * h)
    _sage_fwd[grid](qi, ki, v8, sq, sk, sv, out, lq, lk, d ** -0.5,
                    qi.stride(0), qi.stride(1), qi.stride(2), ki.stride(0), ki.stride(1), ki.stride(2),
                    v8.stride(0), v8.stride(1), v8.stride(2), v8.stride(3), out.stride(0), out.stride(1), out.stride(2),
                    H=h, G=h // hkv, D=d, BLOCK_M=block_m, BLOCK_N=K_BLOCK, CAUSAL=causal, PV_FP8=pv_fp8,
                    num_warps=num_warps or (8 if d >= 128 else 4), num_stages=num_stages)
    return out
