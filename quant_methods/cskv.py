"""CSKV: channel shrinking of the KV cache (low-rank key/value projections, bi-branch cache).

Offline (`qserve quantize --method cskv --kv-ratio R [--window W] [--feature-bits 16|8|4]`):
for every layer, W_k ≈ B_k·A_k and W_v ≈ B_v·A_v with rank r = R × kv_dim (rounded to a multiple
of 8). Initialised by an activation-aware SVD: with C = E[h hᵀ] the covariance of the layer's
(normalised) input on the calibration split, factor W·C^½ and undo the whitening, which is the
rank-r map with the least K (V) reconstruction error on that data. Then refined with Adam on the
layer-wise reconstruction error where K and V errors actually land: the layer's attention output
(after o_proj) computed with the bi-branch cache below against the exact one — the whitened SVD
already minimises plain K/V MSE, so refining that objective again would change nothing. With
--feature-bits 8/4 the refinement sees the features quantized (straight-through rounding). The
best factors seen on a held-back calibration batch are kept, so refinement never makes a layer
worse than its SVD start.

Checkpoint: the original tensors unchanged, plus `model.layers.N.self_attn.cskv.{k_a,k_b,v_a,v_b}`
(fp32: small, and exact enough that full rank reproduces the model) and a config.json entry
`kv_compression: {method: cskv, rank_k, rank_v, window, feature_bits, feature_group}`. There is
no quantization_config, so weight-only RTN can be applied on top (`qserve quantize CSKV_DIR
--method rtn`); calibrated weight methods (AWQ, ...) rebuild the tensors from the model and would
drop the factors, so they must run first — they do not today (they refuse quantized inputs only
by quantization_config, and CSKV refuses quantized sources).

Runtime (kv_format "cskv"): the cache stores the features h·A_kᵀ and h·A_vᵀ of every token
(optionally int8/int4, groups of 32), plus the exact post-RoPE K and V of the most recent
`window` tokens of each sequence in a ring buffer. Attention of a query at position p sees the
exact keys/values of positions p-window+1..p and, for older positions, K = RoPE((f_k)·B_kᵀ) and
V = f_v·B_vᵀ reconstructed at read time (RoPE after reconstruction, at the cached positions'
precomputed cos/sin). Both branches are handed to attention as one key set with a mask, so the
semantics are the same in one prefill pass, chunked prefill and token-by-token decode, and for
batches whose rows sit at different positions (continuous batching).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qserve.errors import CheckpointError, ConfigError
from qserve.kvcache import Batch, KVCache, register_kv_format
from qserve.kvformats import FLOAT_BITS, TokenStore, dequantize_groups, kv_compression, quantize_groups

DEFAULT_WINDOW = 64
FEATURE_GROUP = 32
RANK_MULTIPLE = 8
FACTOR_NAMES = ("k_a", "k_b", "v_a", "v_b")


def cskv_rank(kv_dim: int, ratio: float) -> int:
    """Rank for a channel ratio of the KV width, rounded to a multiple of 8 (int4 packing and
    feature groups stay aligned), at least 8 and at most kv_dim."""
    if not 0 < ratio <= 1:
        raise ConfigError(f"--kv-ratio must be in (0, 1], got {ratio}")
    r = RANK_MULTIPLE * round(ratio * kv_dim / RANK_MULTIPLE)
    return max(RANK_MULTIPLE, min(kv_dim, r)) if kv_dim >= RANK_MULTIPLE else kv_dim


@dataclass(frozen=True)
class CSKVLayout:
    ranks: tuple[int, int]  # (rank_k, rank_v)
    feature_bits: int
    group: int
    window: int


def check_feature_bits(bits: int) -> int:
    if bits not in (4, 8, FLOAT_BITS):
        raise ConfigError(f"--feature-bits must be 16 (unquantized), 8 or 4, got {bits}")
    return bits


def cskv_layout(cfg: Any, ratio: float | None = None, feature_bits: int | None = None,
                window: int | None = None, allow_plain: bool = False) -> CSKVLayout:
    """Layout from a CSKV checkpoint's config, or (plain config) from a ratio to plan with."""
    kc = kv_compression(cfg)
    if kc is not None:
        return CSKVLayout((int(kc["rank_k"]), int(kc["rank_v"])), int(kc["feature_bits"]),
                          int(kc.get("feature_group", FEATURE_GROUP)), int(kc["window"]))
    win = DEFAULT_WINDOW if window is None else window
    if ratio is None:
        if allow_plain:
            return CSKVLayout((0, 0), FLOAT_BITS, FEATURE_GROUP, win)
        raise ConfigError("this checkpoint has no CSKV factors; pass a CSKV ratio to plan for one")
    r = cskv_rank(cfg.kv_dim, ratio)
    return CSKVLayout((r, r), check_feature_bits(FLOAT_BITS if feature_bits is None else feature_bits),
                      FEATURE_GROUP, win)


# --- runtime --------------------------------------------------------------------------------------

class _LayerState:
    """One layer's CSKV storage: features of every position, exact K/V of the recent window."""

    def __init__(self, cache: "CSKVCache", lay: CSKVLayout):
        s, ln, dt = cache.num_slots, cache.max_len, cache.dtype
        self.fk = TokenStore(s, (), ln, lay.ranks[0], lay.feature_bits, lay.group, dt)
        self.fv = TokenStore(s, (), ln, lay.ranks[1], lay.feature_bits, lay.group, dt)
        self.window = lay.window
        shape = (s, cache.kv_heads, lay.window, cache.head_dim)
        self.wk = torch.zeros(shape, dtype=dt)
        self.wv = torch.zeros(shape, dtype=dt)

    def nbytes(self) -> int:
        return self.fk.nbytes() + self.fv.nbytes() + 2 * self.wk.numel() * self.wk.element_size()

    def read_window(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact K, V of positions start-W .. start-1 of each row, oldest first: [B, H, W, D]."""
        w = self.window
        idx = torch.remainder(batch.starts[:, None] - w + torch.arange(w)[None, :], w)  # [B, W]
        gidx = idx[:, None, :, None].expand(-1, self.wk.shape[1], -1, self.wk.shape[3])
        return self.wk[batch.slots].gather(2, gidx), self.wv[batch.slots].gather(2, gidx)

    def write_window(self, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the last min(T, W) new positions of each row."""
        w, t = self.window, batch.num_new
        if t == 1:
            pos = torch.remainder(batch.starts, w)
            self.wk[batch.slots, :, pos] = k[:, :, 0]
            self.wv[batch.slots, :, pos] = v[:, :, 0]
            return
        m = min(t, w)
        for b, (s, p) in enumerate(zip(batch.slot_list, batch.start_list)):
            pos = torch.remainder(torch.arange(p + t - m, p + t), w)
            self.wk[s][:, pos] = k[b, :, t - m:]
            self.wv[s][:, pos] = v[b, :, t - m:]


@register_kv_format("cskv")
class CSKVCache(KVCache):
    """Bi-branch compressed cache; layer storage is sized from the model's CSKV layers (`bind`,
    or on a layer's first use)."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        self.num_slots, self.max_len, self.kv_heads, self.head_dim, self.dtype = (
            num_slots, max_len, kv_heads, head_dim, dtype)
        self.layers: list[_LayerState | None] = [None] * num_layers

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        raise ConfigError("CSKV's KV bytes depend on the checkpoint's ranks: use "
                          "qserve.kvformats.kv_bytes_per_token(model_config, 'cskv')")

    def bind(self, model: nn.Module) -> None:
        """Allocate every layer's storage now, so nbytes() is what serving will use."""
        for i, layer in enumerate(model.layers):
            mod = getattr(layer, "kv_module", None)
            if mod is None:
                raise ConfigError("the cskv KV format serves CSKV checkpoints (`qserve quantize --method cskv`)")
            self.state(i, mod)

    def state(self, layer: int, mod: "CSKVProjector") -> _LayerState:
        st = self.layers[layer]
        if st is None:
            st = self.layers[layer] = _LayerState(self, mod.layout)
        return st

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers if s is not None)

    def write(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        raise ConfigError("the cskv KV format serves CSKV checkpoints (`qserve quantize --method cskv`)")

    read = write  # type: ignore[assignment]


def bi_branch_mask(starts: torch.Tensor, num_new: int, n_comp: int, window: int) -> torch.Tensor:
    """[B, 1, T, n_comp + W + T] bool: compressed key j is visible to the query at p iff
    j <= p - W; exact key i (position start - W + i) iff it exists and p - W < pos <= p."""
    p = starts[:, None] + torch.arange(num_new)[None, :]  # [B, T]
    j = torch.arange(n_comp)
    comp = j[None, None, :] <= (p - window)[:, :, None]
    e = starts[:, None] - window + torch.arange(window + num_new)[None, :]  # [B, W+T]
    ex = (e[:, None, :] >= 0) & (e[:, None, :] <= p[:, :, None]) & (e[:, None, :] > (p - window)[:, :, None])
    return torch.cat([comp, ex], -1).unsqueeze(1)


class CSKVProjector(nn.Module):
    """A layer's CSKV factors; caches features and rebuilds K/V for attention (model hook)."""

    def __init__(self, k_a: torch.Tensor, k_b: torch.Tensor, v_a: torch.Tensor, v_b: torch.Tensor,
                 k_bias: torch.Tensor | None, v_bias: torch.Tensor | None, layout: CSKVLayout,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.layout = layout
        self.rk, self.rv = layout.ranks
        self.nkv, self.hd = num_kv_heads, head_dim
        self.a = nn.Parameter(torch.cat([k_a, v_a], 0).to(dtype).contiguous(), requires_grad=False)
        self.k_b = nn.Parameter(k_b.to(dtype).contiguous(), requires_grad=False)
        self.v_b = nn.Parameter(v_b.to(dtype).contiguous(), requires_grad=False)
        self.k_bias = None if k_bias is None else nn.Parameter(k_bias.to(dtype), requires_grad=False)
        self.v_bias = None if v_bias is None else nn.Parameter(v_bias.to(dtype), requires_grad=False)

    @classmethod
    def from_checkpoint(cls, cfg: Any, ckpt: Any, idx: int, dtype: torch.dtype) -> "CSKVProjector":
        lay = cskv_layout(cfg)
        p = f"model.layers.{idx}.self_attn."
        rk, rv = lay.ranks
        kvd, hid = cfg.kv_dim, cfg.hidden_size
        shapes = {"k_a": (rk, hid), "k_b": (kvd, rk), "v_a": (rv, hid), "v_b": (kvd, rv)}
        t = {n: ckpt.get(p + "cskv." + n, s).float() for n, s in shapes.items()}
        kb = ckpt.get(p + "k_proj.bias") if p + "k_proj.bias" in ckpt else None
        vb = ckpt.get(p + "v_proj.bias") if p + "v_proj.bias" in ckpt else None
        if lay.window < 0:
            raise CheckpointError(f"kv_compression.window must be >= 0, got {lay.window}")
        return cls(t["k_a"], t["k_b"], t["v_a"], t["v_b"], kb, vb, lay, cfg.num_kv_heads, cfg.head_dim, dtype)

    def reconstruct(self, fk: torch.Tensor, fv: torch.Tensor, rope: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Features [B, n, r] of positions 0..n-1 -> K (RoPE applied), V: [B, Hkv, n, D]."""
        b, n, _ = fk.shape
        k = F.linear(fk, self.k_b, self.k_bias).view(b, n, self.nkv, self.hd).transpose(1, 2)
        v = F.linear(fv, self.v_b, self.v_bias).view(b, n, self.nkv, self.hd).transpose(1, 2)
        return rope(k, torch.arange(n)[None]), v

    def forward(self, cache: KVCache, idx: int, batch: Batch, h: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, rope: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """h: the layer's normalised input [B, T, hidden]; k (post-RoPE), v: exact [B, Hkv, T, D].
        Returns keys, values and the mask attention must use."""
        if not isinstance(cache, CSKVCache):  # another format: the uncompressed model
            cache.write(idx, batch, k, v)
            kk, vv = cache.read(idx, batch)
            return kk, vv, batch.mask
        st = cache.state(idx, self)
        f = F.linear(h, self.a)
        st.fk.write(batch, f[..., :self.rk])
        st.fv.write(batch, f[..., self.rk:])
        w, t = self.layout.window, batch.num_new
        if w:
            pk, pv = st.read_window(batch)
            st.write_window(batch, k, v)
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        n_comp = max(0, max(batch.start_list) + t - w)
        if n_comp:
            kc, vc = self.reconstruct(st.fk.read(batch, n_comp), st.fv.read(batch, n_comp), rope)
            k, v = torch.cat([kc, k], 2), torch.cat([vc, v], 2)
        return k, v, bi_branch_mask(batch.starts, t, n_comp, w)


# --- offline --------------------------------------------------------------------------------------

def whitened_svd(w: torch.Tensor, cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] ≈ B [out, r] · A [r, in] minimising E‖(W - BA)h‖² for E[hhᵀ] = cov (fp64)."""
    cov = cov.double()
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp(min=0) + 1e-6 * lam.clamp(min=0).mean() + 1e-12
    s = u * lam.sqrt()  # C^½ = U diag(√λ) Uᵀ up to the right rotation Uᵀ, which the SVD absorbs
    s_inv = (u / lam.sqrt()).t()
    p, sig, qt = torch.linalg.svd(w.double() @ s, full_matrices=False)
    root = sig[:rank].sqrt()
    b = p[:, :rank] * root
    a = (root[:, None] * qt[:rank]) @ s_inv
    return a.float(), b.float()


def fake_quant(f: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient."""
    if bits == FLOAT_BITS:
        return f
    with torch.no_grad():
        codes, meta = quantize_groups(f.detach(), bits, group)
        fq = dequantize_groups(codes, meta, group, f.dtype)
    return f + (fq - f).detach()


@dataclass
class LayerData:
    """What refining one layer needs, for a few calibration windows [N, T]: its normalised
    input, RoPE'd queries, exact K/V, and the exact attention output after o_proj."""

    h: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor


def layer_data(layer: nn.Module, rope: nn.Module, h: torch.Tensor) -> LayerData:
    n, t, _ = h.shape
    qkv = layer.qkv(h)
    qd, kvd, _ = layer.split
    q = qkv[..., :qd].view(n, t, layer.nh, layer.hd).transpose(1, 2)
    k = qkv[..., qd:qd + kvd].view(n, t, layer.nkv, layer.hd).transpose(1, 2)
    v = qkv[..., qd + kvd:].view(n, t, layer.nkv, layer.hd).transpose(1, 2)
    pos = torch.arange(t)[None]
    q, k = rope(q, pos), rope(k, pos)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return LayerData(h, q, k, v, layer.o_proj(o.transpose(1, 2).reshape(n, t, -1)))


def bi_branch_output(layer: nn.Module, rope: nn.Module, d: LayerData, sel: torch.Tensor,
                     a: torch.Tensor, bk: torch.Tensor, bv: torch.Tensor, rk: int, window: int,
                     bits: int, group: int, k_bias: torch.Tensor | None, v_bias: torch.Tensor | None) -> torch.Tensor:
    """Layer attention output (after o_proj) for windows `sel` with the bi-branch cache, prefilled
    in one pass (the same visibility as token-by-token decode)."""
    h, q, k, v = d.h[sel], d.q[sel], d.k[sel], d.v[sel]
    n, t, _ = h.shape
    f = h @ a.t()
    fk, fv = fake_quant(f[..., :rk], bits, group), fake_quant(f[..., rk:], bits, group)
    kc = F.linear(fk, bk, k_bias).view(n, t, layer.nkv, layer.hd).transpose(1, 2)
    vc = F.linear(fv, bv, v_bias).view(n, t, layer.nkv, layer.hd).transpose(1, 2)
    kc = rope(kc, torch.arange(t)[None])
    mask = bi_branch_mask(torch.zeros(n, dtype=torch.long), t, t, window)
    ek = F.pad(k, (0, 0, window, 0))  # exact branch: W (masked) positions before the window start
    ev = F.pad(v, (0, 0, window, 0))
    o = F.scaled_dot_product_attention(q, torch.cat([kc, ek], 2), torch.cat([vc, ev], 2),
                                       attn_mask=mask, enable_gqa=True)
    return layer.o_proj(o.transpose(1, 2).reshape(n, t, -1))


@dataclass
class RefineResult:
    a: torch.Tensor
    bk: torch.Tensor
    bv: torch.Tensor
    svd_loss: float
    loss: float


def refine_layer(layer: nn.Module, rope: nn.Module, d: LayerData, a: torch.Tensor, bk: torch.Tensor,
                 bv: torch.Tensor, rk: int, window: int, bits: int, group: int, steps: int, lr: float,
                 batch: int, seed: int) -> RefineResult:
    """Adam on the relative error of the bi-branch attention output; keeps the best factors
    seen on the held-back window (the last one)."""
    kvd = layer.split[1]
    bias = getattr(layer.qkv, "bias", None)
    k_bias = None if bias is None else bias[layer.split[0]:layer.split[0] + kvd].detach()
    v_bias = None if bias is None else bias[layer.split[0] + kvd:].detach()
    n = d.h.shape[0]
    held = torch.tensor([n - 1])
    train = max(n - 1, 1)

    def loss_of(sel: torch.Tensor, a_: torch.Tensor, bk_: torch.Tensor, bv_: torch.Tensor) -> torch.Tensor:
        out = bi_branch_output(layer, rope, d, sel, a_, bk_, bv_, rk, window, bits, group, k_bias, v_bias)
        ref = d.out[sel]
        return (out - ref).pow(2).sum() / ref.pow(2).sum()

    params = [a.clone().requires_grad_(True), bk.clone().requires_grad_(True), bv.clone().requires_grad_(True)]
    with torch.no_grad():
        best = svd_loss = float(loss_of(held, *params))
    best_params = [p.detach().clone() for p in params]
    if steps <= 0 or svd_loss < 1e-10:
        return RefineResult(*best_params, svd_loss, best)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    check_every = max(steps // 10, 1)
    for step in range(1, steps + 1):
        sel = torch.randint(0, train, (min(batch, train),), generator=g)
        opt.zero_grad()
        loss_of(sel, *params).backward()
        opt.step()
        if step % check_every == 0 or step == steps:
            with torch.no_grad():
                cur = float(loss_of(held, *params))
            if cur < best:
                best, best_params = cur, [p.detach().clone() for p in params]
    return RefineResult(*best_params, svd_loss, best)


def _add_args(p: argparse.ArgumentParser) -> None:
    from qserve.calib import add_calib_args

    g = p.add_argument_group("cskv")
    g.add_argument("--kv-ratio", type=float, default=0.3, help="cskv: kept fraction of the KV channels (default 0.3)")
    g.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"cskv: recent tokens kept at full precision (default {DEFAULT_WINDOW})")
    g.add_argument("--feature-bits", type=int, default=16, choices=(16, 8, 4),
                   help="cskv: bits of the cached features (16 = compute dtype; default 16)")
    g.add_argument("--refine-steps", type=int, default=200, help="cskv: Adam steps per layer (default 200; 0 = SVD only)")
    g.add_argument("--refine-lr", type=float, default=1e-3, help="cskv: Adam learning rate (default 1e-3)")
    g.add_argument("--refine-windows", type=int, default=16,
                   help="cskv: calibration windows of min(256, --seq-len) tokens the refinement uses (default 16)")
    add_calib_args(p)


REFINE_LEN = 256


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from qserve.calib import layer_forward, prepare
    from qserve.checkpoint import Checkpoint, save_checkpoint
    from qserve.config import load_config
    from qserve.kvcache import KVCache as DenseCache

    cfg = load_config(src)
    if cfg.quantization_config or kv_compression(cfg):
        raise ConfigError(f"{src} is already quantized or compressed; CSKV starts from an fp checkpoint")
    if args.window < 0:
        raise ConfigError(f"--window must be >= 0, got {args.window}")
    check_feature_bits(args.feature_bits)
    rank = cskv_rank(cfg.kv_dim, args.kv_ratio)
    model, samples, info = prepare(src, args)
    n, t = samples.shape
    cache = DenseCache(cfg.num_layers, 1, t, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    hidden = F.embedding(samples, model.embed).float()
    factors: dict[str, torch.Tensor] = {}
    per_layer: list[dict[str, float]] = []
    rl = min(REFINE_LEN, t)
    refine_n = min(args.refine_windows, n * (t // rl))
    for i, layer in enumerate(tqdm(model.layers, desc="cskv", unit="layer", file=sys.stderr)):
        with torch.no_grad():
            h = layer.input_norm(hidden)  # [N, T, hidden]
            flat = h.reshape(-1, h.shape[-1]).double()
            cov = flat.t() @ flat / flat.shape[0]
            w = layer.qkv.weight.detach().float()
            qd, kvd = layer.split[0], layer.split[1]
            ak, bk = whitened_svd(w[qd:qd + kvd], cov, rank)
            av, bv = whitened_svd(w[qd + kvd:], cov, rank)
        a = torch.cat([ak, av], 0)
        stats = {"svd_loss": float("nan"), "loss": float("nan")}
        if refine_n:
            with torch.no_grad():
                hw = h[:, :(t // rl) * rl].reshape(-1, rl, h.shape[-1])[:refine_n]
                d = layer_data(layer, model.rope, hw)
            r = refine_layer(layer, model.rope, d, a, bk, bv, rank, args.window, args.feature_bits,
                             FEATURE_GROUP, args.refine_steps, args.refine_lr, batch=1, seed=args.seed + i)
            a, bk, bv = r.a, r.bk, r.bv
            stats = {"svd_loss": r.svd_loss, "loss": r.loss}
        per_layer.append(stats)
        p = f"model.layers.{i}.self_attn.cskv."
        factors |= {p + "k_a": a[:rank], p + "k_b": bk, p + "v_a": a[rank:], p + "v_b": bv}
        with torch.no_grad():
            hidden = torch.cat([layer_forward(model, layer, hidden[j:j + 1], cache) for j in range(n)])
    ckpt = Checkpoint(src)
    tensors = {name: ckpt.get(name) for name in ckpt.names()}
    tensors |= {k: v.float().contiguous() for k, v in factors.items()}
    raw = dict(cfg.raw)
    raw["kv_compression"] = {"method": "cskv", "rank_k": rank, "rank_v": rank, "window": args.window,
                             "feature_bits": args.feature_bits, "feature_group": FEATURE_GROUP,
                             "kv_ratio": args.kv_ratio}
    save_checkpoint(Path(out), tensors, raw, source_dir=src)
    mean = lambda key: float(sum(s[key] for s in per_layer) / len(per_layer))  # noqa: E731
    return {"kv_ratio": args.kv_ratio, "rank": rank, "window": args.window, "feature_bits": args.feature_bits,
            "refine_steps": args.refine_steps, "refine_windows": refine_n, **info,
            "mean_rel_err_svd": mean("svd_loss"), "mean_rel_err_refined": mean("loss"), "layers": per_layer}


def _register() -> None:
    from qserve.offline import Quantizer, register_quantizer

    register_quantizer(Quantizer("cskv", _add_args, run,
                                 "CSKV: low-rank K/V projections, compressed bi-branch KV cache"))


_register()
