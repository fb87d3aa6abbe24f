"""SageAttention2's quantized attention as an exact emulation in torch (any device, CI on CPU).

What is emulated, step by step (the arithmetic a SageAttention2 kernel does, not an approximation
of it; registered as attention "sage"):
- K smoothing: subtract the mean of K over the sequence's (valid) tokens, per KV head. Every
  score of a query row shifts by the same q·mean, so the softmax is unchanged.
- Q smoothing: per Q block, subtract the block's mean q̄; the term q̄·Kᵀ is added back to the
  scores in fp32 (a GEMV in the kernel). Blocks of one token (decode) are not smoothed.
- Q quantized to INT4 per block of Q_BLOCK = 32 tokens (one warp's rows) and K per block of
  K_BLOCK = 64 tokens (one CTA's K tile), per head, symmetric, codes in [-7, 7].
- Q·Kᵀ in integer arithmetic: the products of INT4 codes (|·| <= 49) summed over head_dim are
  integers below 2^24, so the fp32 matmul used here computes exactly the int32 MMA result
  (tests check it against an int32 product).
- Online softmax over K blocks in order, as the kernel iterates: running row max m, P̃ =
  exp(S - m) in [0, 1], l accumulated from the fp32 P̃.
- P̃ quantized to FP8 e4m3 with the static scale 448 (P̃·448, round-to-nearest-even by the cast),
  V to FP8 e4m3 per channel (scale max|V_c| / 448 over valid tokens); P̃·V from the FP8 values
  with fp32 accumulation (each fp8×fp8 product is exact in fp32), rescaled by exp(m_old - m_new)
  between blocks; O = acc · scale_V / 448 / l.

Masks: the engine's boolean mask [B, 1, T, L] (rows of different lengths, CSKV's bi-branch key
sets) or None (causal, the T queries being the last T positions of L keys). Keys no query may
see are excluded from the smoothing mean and zeroed before quantization, as a varlen kernel never
loads them.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from qserve.attention import register_attention

Q_BLOCK = 32
K_BLOCK = 64
INT4_MAX = 7
FP8_MAX = 448.0
FP8 = torch.float8_e4m3fn


def causal_mask(t: int, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 1, T, L]: the T queries are positions L-T .. L-1."""
    q_pos = torch.arange(length - t, length, device=device)
    return (torch.arange(length, device=device)[None, :] <= q_pos[:, None])[None, None]


def token_groups(n: int, block: int, layout: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
    """Scale group of each of n tokens, and the number of groups. "q": blocks of `block` tokens,
    8 groups per block (token i's group is i mod 8: the rows one MMA thread holds); "k": 4 groups
    per block ((i mod 8) // 2: a thread's pair of key columns); "block": one group per block."""
    i = torch.arange(n, device=device)
    within = i % block
    if layout == "q":
        g, per = within % 8, 8
    elif layout == "k":
        g, per = (within % 8) // 2, 4
    else:
        g, per = torch.zeros_like(i), 1
    return (i // block) * per + g, math.ceil(n / block) * per


def quantize_int(x: torch.Tensor, block: int, layout: str, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., N, D] -> integer-valued codes (fp32, symmetric in [-qmax, qmax], qmax = 7 for
    INT4, 127 for INT8) and each token's scale [..., N] (the max |x| of its group / qmax)."""
    qmax = 2 ** (bits - 1) - 1
    gid, ng = token_groups(x.shape[-2], block, layout, x.device)
    tok = x.abs().amax(-1)  # [..., N]
    idx = gid.expand_as(tok)
    gmax = torch.zeros(*tok.shape[:-1], ng, device=x.device).scatter_reduce(-1, idx, tok, "amax", include_self=True)
    s = (gmax / qmax).clamp(min=1e-12).gather(-1, idx)
    return torch.round(x / s[..., None]).clamp(-qmax, qmax), s


def smooth_q_blocks(q: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract each Q block's mean over its tokens: returns (q - mean, mean per token) [..., T, D]."""
    t = q.shape[-2]
    if t == 1:
        return q, torch.zeros_like(q)
    nb = math.ceil(t / block)
    means = []
    for i in range(nb):
        blk = q[..., i * block:(i + 1) * block, :]
        means.append(blk.mean(-2, keepdim=True).expand_as(blk))
    mean = torch.cat(means, -2)
    return q - mean, mean


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   smooth_q: bool = True, per_thread: bool = True, qk_bits: int = 4,
                   pv_fp8: bool = True) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, L, D], mask [B, 1, T, L] bool or None -> [B, H, T, D].
    per_thread=False uses one INT4 scale per whole block (coarser than SageAttention2)."""
    b, h, t, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    g = h // hkv
    if mask is None:
        mask = causal_mask(t, length, q.device)
    mask = mask.expand(b, 1, t, length)
    valid = mask.any(2, keepdim=True).transpose(-1, -2).float()  # [B, 1, L, 1]
    qf, kf, vf = q.float(), k.float(), v.float()

    # K smoothing (mean over the tokens any query may see), invalid keys zeroed
    kmean = (kf * valid).sum(2, keepdim=True) / valid.sum(2, keepdim=True).clamp(min=1)
    ks = (kf - kmean) * valid
    # Q smoothing per block, the removed part returned as an fp32 score bias
    qf = qf.view(b, hkv, g, t, d)
    qs, qmean = smooth_q_blocks(qf, Q_BLOCK) if smooth_q else (qf, torch.zeros_like(qf))
    qi, sq = quantize_int(qs, Q_BLOCK, "q" if per_thread else "block", qk_bits)  # [B, Hkv, G, T, D], [B, Hkv, G, T]
    ki, sk = quantize_int(ks, K_BLOCK, "k" if per_thread else "block", qk_bits)  # [B, Hkv, L, D], [B, Hkv, L]

    # V in FP8 e4m3, per-channel scale over valid tokens
    vmax = (vf.abs() * valid).amax(2, keepdim=True)  # [B, Hkv, 1, D]
    sv = (vmax / FP8_MAX).clamp(min=1e-12)
    v8 = (vf / sv).clamp(-FP8_MAX, FP8_MAX)
    v8 = (v8.to(FP8).float() if pv_fp8 else v8) * valid

    sm_scale = d ** -0.5
    dev = q.device
    neg_inf = torch.tensor(float("-inf"), device=dev)
    m = torch.full((b, hkv, g, t, 1), float("-inf"), device=dev)
    l_sum = torch.zeros(b, hkv, g, t, 1, device=dev)
    acc = torch.zeros(b, hkv, g, t, d, device=dev)
    mask5 = mask.view(b, 1, 1, t, length)
    for j0 in range(0, length, K_BLOCK):
        j1 = min(j0 + K_BLOCK, length)
        kb = ki[:, :, None, j0:j1]  # [B, Hkv, 1, n, D]
        s_int = qi @ kb.transpose(-1, -2)  # exact integer sums
        s = s_int * sq[..., None] * sk[:, :, None, None, j0:j1]
        if smooth_q:
            s = s + qmean @ ks[:, :, None, j0:j1].transpose(-1, -2)
        s = torch.where(mask5[..., j0:j1], s * sm_scale, neg_inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - m_safe)  # 0 where masked
        alpha = torch.exp(m - m_safe)  # 0 while m was -inf
        l_sum = l_sum * alpha + p.sum(-1, keepdim=True)
        p8 = (p * FP8_MAX).to(FP8).float() if pv_fp8 else p * FP8_MAX
        acc = acc * alpha + p8 @ v8[:, :, None, j0:j1]
        m = m_new
    out = acc * sv[:, :, None] / FP8_MAX / l_sum.clamp(min=1e-30)
    return out.view(b, h, t, d).to(q.dtype)


register_attention("sage", sage_attention)
# SageAttention2's 8-bit variant (INT8 Q·K, FP8 P·V): the arithmetic of its Hopper kernel
register_attention("sage8", partial(sage_attention, qk_bits=8))
