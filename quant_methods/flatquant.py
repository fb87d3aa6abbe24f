"""FlatQuant (Sun et al., 2024): learnable affine transforms per linear group, W4A4 (KV4).

Every group of linears sharing an input gets an invertible transform P applied to the input at run
time, the weight getting P⁻ᵀ, so `x Wᵀ = (x P)(W P⁻ᵀ)ᵀ` in exact arithmetic, while both factors are
flat enough for 4 bits. P is Kronecker-factored (P = L ⊗ R, L [a, a], R [b, b], a·b = K: two
small matmuls per token instead of one K×K one) and trained, with per-channel scales and clipping:
- q/k/v: diag(s₁)·(L₁ ⊗ R₁); s₁ is folded into input_layernorm's weight;
- o_proj: O ⊗ T_v, O [heads, heads] online, T_v [head_dim, head_dim] folded into v_proj's rows
  (values are transformed per head before they reach the KV cache) and o_proj's columns;
- gate/up: diag(s₂)·(L₂ ⊗ R₂), s₂ folded into post_attention_layernorm;
- down: diag(s₃)·(L₃ ⊗ R₃), s₃ folded into up_proj's rows;
- per-row learnable weight clipping (sigmoid of a logit, per output channel) and one learnable
  activation clip per group; queries/keys get the fixed online Hadamard after RoPE
  (`qk_rotation`, as QuaRot), and with `--kv-bits 4` keys and values are fake-quantized in training
  like the int4 KV cache stores them (asymmetric, groups of 32 along head_dim).
Calibration is block by block on the fp model's own block inputs (qserve.calib, propagate
"original"): a few epochs of Adam on the MSE between the block's W4A4 output (straight-through
rounding) and its fp output, the loss normalised by its own value (a scale-free step, as the
authors do). Each trained block is saved to a work directory; a rerun with the same settings
skips finished blocks. Transforms start from Hadamard matrices where one exists for the size
(so training starts from a QuaRot-like rotation), else from a seeded random orthogonal matrix;
scales start SmoothQuant-style, s = max|W|^0.7 / max|x|^0.3.

Runtime: qserve.w4a4.W4A4Linear with `trans_left`/`trans_right` (two small matmuls, fp32), then
per-token int4 activations and the integer GEMM. lm_head and embeddings stay unquantized.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qserve.calib import BlockStats, add_calib_args, calibrate_blocks, prepare
from qserve.errors import ConfigError
from qserve.hadamard import factor, hadamard_matrix, hadamard_transform
from qserve.linear import register_quant_method
from qserve.model import CausalLM, DecoderLayer
from qserve.offline import Quantizer, load_fp_tensors, register_quantizer, write_quantized
from qserve.quant_methods.quarot import gptq
from qserve.w4a4 import W4A4Linear, kron_factors, kron_transform, pack_weight, quantize_weight_sym

DEFAULT_EPOCHS = 2  # with --samples 32 --seq-len 256: ~30 min for SmolLM2-135M on 2 shared cores
DEFAULT_LR = 5e-3
KV_GROUP = 32  # the int4 KV cache's group along head_dim


@register_quant_method("qserve-flatquant")
class FlatQuantLinear(W4A4Linear):
    """W4A4 layer of FlatQuant checkpoints (online Kronecker transform before quantization)."""


# --- learnable pieces -------------------------------------------------------------------------

def init_matrix(n: int, seed: int) -> torch.Tensor:
    """Orthonormal Hadamard of order n if we can build one, else a seeded random orthogonal."""
    try:
        factor(n)
        return hadamard_matrix(n, torch.float32)
    except ConfigError:
        g = torch.Generator().manual_seed(seed)
        q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).float()


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fq_act(x: torch.Tensor, clip: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per-token symmetric fake quantization with a differentiable clip ratio (W4A4Linear's math)."""
    m = 2 ** (bits - 1) - 1
    s = (x.abs().amax(-1, keepdim=True) * clip / m).clamp(min=1e-8)
    return torch.clamp(round_ste(x / s), -m - 1, m) * s


def fq_weight(w: torch.Tensor, clip: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Per-row symmetric fake quantization with per-row clip ratios clip [N]; the scale is rounded
    to fp16 (straight-through) as the checkpoint stores it."""
    m = 2 ** (bits - 1) - 1
    s = (w.abs().amax(1, keepdim=True) * clip[:, None] / m).clamp(min=1e-8)
    s = s + (s.half().float() - s).detach()
    return torch.clamp(round_ste(w / s), -m - 1, m) * s


def fq_kv(x: torch.Tensor, bits: int = 4, group: int = KV_GROUP) -> torch.Tensor:
    """Asymmetric fake quantization in groups along the last dim (the int4 KV cache's math)."""
    g = group if x.shape[-1] % group == 0 else x.shape[-1]
    xg = x.unflatten(-1, (-1, g))
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = ((mx - mn) / (2**bits - 1)).clamp(min=1e-8)
    return (torch.clamp(round_ste((xg - mn) / s), 0, 2**bits - 1) * s + mn).flatten(-2)


class Kron(nn.Module):
    """Trainable x -> x · (L ⊗ R) (R optional: identity) and its weight-side inverse-transpose."""

    def __init__(self, left: int, right: int | None, seed: int):
        super().__init__()
        self.left = nn.Parameter(init_matrix(left, seed))
        self.right = None if right is None else nn.Parameter(init_matrix(right, seed + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kron_transform(x, self.left, self.right)

    def weight_side(self, w: torch.Tensor) -> torch.Tensor:
        """W -> W · (L ⊗ R)⁻ᵀ for a weight [N, K] whose input this transform rotates."""
        li = torch.linalg.inv(self.left).t()
        ri = None if self.right is None else torch.linalg.inv(self.right).t()
        return kron_transform(w, li, ri)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class GroupParams(nn.Module):
    """The trainables of one linear group: transform, optional channel scale, clips."""

    def __init__(self, rows: int, k: int, kron: Kron, scale: torch.Tensor | None):
        super().__init__()
        self.kron = kron
        self.scale = None if scale is None else nn.Parameter(scale.float().clone())
        self.w_clip = nn.Parameter(torch.full((rows,), logit(0.98)))
        self.a_clip = nn.Parameter(torch.tensor(logit(0.98)))


class BlockParams(nn.Module):
    """Every trainable of one decoder block."""

    def __init__(self, layer: DecoderLayer, stats: BlockStats, seed: int):
        super().__init__()
        d, inter, hd = layer.qkv.in_features, layer.inter, layer.hd
        wqkv, wgu, wd = layer.qkv.weight.detach(), layer.gate_up.weight.detach(), layer.down.weight.detach()

        def sq_scale(w: torch.Tensor, attr: str) -> torch.Tensor:
            xmax = stats.inputs[attr].abs_max.clamp(min=1e-5)
            return (w.abs().amax(0).clamp(min=1e-5).pow(0.7) / xmax.pow(0.3)).clamp(min=1e-5)

        self.qkv = GroupParams(wqkv.shape[0], d, Kron(*kron_factors(d), seed), sq_scale(wqkv, "qkv"))
        self.o = GroupParams(layer.o_proj.out_features, layer.nh * hd, Kron(layer.nh, None, seed + 10), None)
        self.v = nn.Parameter(init_matrix(hd, seed + 20))
        self.gate_up = GroupParams(wgu.shape[0], d, Kron(*kron_factors(d), seed + 30), sq_scale(wgu, "gate_up"))
        self.down = GroupParams(wd.shape[0], inter, Kron(*kron_factors(inter), seed + 40), sq_scale(wd, "down"))

    def groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Parameter groups: transforms/scales at lr, clips at 10x lr (the authors' split)."""
        clips = [p for n, p in self.named_parameters() if n.endswith("clip")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("clip")]
        return [("trans", rest), ("clip", clips)]


@dataclass
class BlockWeights:
    """The transformed (not yet quantized) fp weights of one block and their online factors."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor
    post_norm: torch.Tensor


def transformed_weights(layer: DecoderLayer, bp: BlockParams) -> BlockWeights:
    """Weights after the (differentiable) reparameterisation: scales folded into the norms and
    up_proj, transforms' inverses into the weights, T_v into v rows and o columns."""
    h, kvd = layer.nh * layer.hd, layer.nkv * layer.hd
    hd, inter = layer.hd, layer.inter
    s1, s2, s3 = bp.qkv.scale, bp.gate_up.scale, bp.down.scale
    wqkv = bp.qkv.kron.weight_side(layer.qkv.weight / s1)
    tv = bp.v
    wv = wqkv[h + kvd:]  # rows per kv head: T_vᵀ · W_h
    wv = torch.matmul(tv.t(), wv.reshape(layer.nkv, hd, -1)).reshape(kvd, -1)
    wqkv = torch.cat([wqkv[:h + kvd], wv], 0)
    tv_inv_t = torch.linalg.inv(tv).t()
    wo = kron_transform(layer.o_proj.weight, torch.linalg.inv(bp.o.kron.left).t(), tv_inv_t)
    wgu = bp.gate_up.kron.weight_side(layer.gate_up.weight / s2)
    wgu = torch.cat([wgu[:inter], wgu[inter:] * s3[:, None]], 0)
    wd = bp.down.kron.weight_side(layer.down.weight / s3)
    return BlockWeights(wqkv, wo, wgu, wd, layer.input_norm.weight * s1, layer.post_norm.weight * s2)


def block_forward(model: CausalLM, layer: DecoderLayer, bp: BlockParams, x: torch.Tensor,
                  kv_bits: int, quant: bool = True) -> torch.Tensor:
    """The W4A4 block as served (fake-quantized, straight-through), on x [B, T, H], fp32."""
    b, t, _ = x.shape
    w = transformed_weights(layer, bp)
    eps = layer.input_norm.eps

    def qlinear(inp: torch.Tensor, weight: torch.Tensor, gp: GroupParams) -> torch.Tensor:
        inp = gp.kron(inp)
        if not quant:
            return F.linear(inp, weight)
        return F.linear(fq_act(inp, torch.sigmoid(gp.a_clip)), fq_weight(weight, torch.sigmoid(gp.w_clip)))

    hn = F.rms_norm(x, (x.shape[-1],), w.input_norm, eps)
    qkv = qlinear(hn, w.qkv, bp.qkv)
    h, kvd = layer.split[0], layer.split[1]
    qk, v = qkv.split((h + kvd, kvd), -1)
    pos = torch.arange(t)[None].expand(b, t)
    qk = model.rope(qk.view(b, t, layer.nh + layer.nkv, layer.hd).transpose(1, 2), pos)
    qk = hadamard_transform(qk)
    q, k = qk[:, :layer.nh], qk[:, layer.nh:]
    v = v.view(b, t, layer.nkv, layer.hd).transpose(1, 2)
    if quant and kv_bits < 16:
        k, v = fq_kv(k, kv_bits), fq_kv(v, kv_bits)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    x = x + qlinear(o.transpose(1, 2).reshape(b, t, -1), w.o, bp.o)
    g, u = qlinear(F.rms_norm(x, (x.shape[-1],), w.post_norm, eps), w.gate_up, bp.gate_up).split(layer.inter, -1)
    return x + qlinear(F.silu(g) * u, w.down, bp.down)


# --- calibration ------------------------------------------------------------------------------

def train_block(model: CausalLM, layer: DecoderLayer, bp: BlockParams, inputs: torch.Tensor,
                targets: torch.Tensor, epochs: int, lr: float, batch: int, kv_bits: int,
                desc: str) -> list[float]:
    """Adam on the normalised output MSE; returns the mean MSE per epoch."""
    from tqdm import tqdm

    for p in layer.parameters():
        p.requires_grad_(False)
    groups = bp.groups()
    opt = torch.optim.Adam([{"params": ps, "lr": lr * (10 if name == "clip" else 1)} for name, ps in groups])
    steps = epochs * math.ceil(inputs.shape[0] / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * 1e-3)
    history = []
    bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
    with torch.enable_grad():
        for _ in range(epochs):
            total = 0.0
            for i in range(0, inputs.shape[0], batch):
                out = block_forward(model, layer, bp, inputs[i:i + batch], kv_bits)
                loss = F.mse_loss(out, targets[i:i + batch])
                total += float(loss.detach()) * out.shape[0]
                opt.zero_grad(set_to_none=True)
                (loss / loss.detach()).backward()
                opt.step()
                sched.step()
                bar.update()
            history.append(total / inputs.shape[0])
            bar.set_postfix_str(f"mse {history[-1]:.3g}")
    bar.close()
    return history


@torch.no_grad()
def block_mse(model: CausalLM, layer: DecoderLayer, bp: BlockParams, inputs: torch.Tensor,
              targets: torch.Tensor, kv_bits: int, batch: int) -> float:
    total = 0.0
    for i in range(0, inputs.shape[0], batch):
        out = block_forward(model, layer, bp, inputs[i:i + batch], kv_bits)
        total += float(F.mse_loss(out, targets[i:i + batch])) * out.shape[0]
    return total / inputs.shape[0]


def transformed_moment(moment: torch.Tensor, kron: Kron, v: torch.Tensor | None,
                       scale: torch.Tensor | None) -> torch.Tensor:
    """E[x' x'ᵀ] of the transformed input x' = (x ⊙ s)·(L ⊗ R) (o_proj: x·(O ⊗ T_v)) from E[x xᵀ]."""
    right = v if v is not None else kron.right
    m = moment.double()
    s = None if scale is None else scale.double()

    def apply(rows: torch.Tensor) -> torch.Tensor:
        return kron_transform(rows if s is None else rows * s, kron.left.double(),
                              None if right is None else right.double())

    return apply(apply(m).t().contiguous())


@torch.no_grad()
def export_block(layer: DecoderLayer, bp: BlockParams, prefix: str,
                 moments: dict[str, torch.Tensor] | None = None, damp: float = 0.01) -> dict[str, torch.Tensor]:
    """The block's stored tensors: transforms and activation clips rounded to fp16 first (what the
    checkpoint keeps; `bp` is updated in place, so block_forward then computes what is served),
    the weights transformed with those exact matrices, then 4-bit weights with the learned clips:
    RTN, or GPTQ when the inputs' second moments (keyed like FUSED_LINEARS) are given."""
    for mod in (bp.qkv.kron, bp.o.kron, bp.gate_up.kron, bp.down.kron):
        for p in (mod.left, mod.right):
            if p is not None:
                p.copy_(p.half().float())
    bp.v.copy_(bp.v.half().float())
    for gp in (bp.qkv, bp.o, bp.gate_up, bp.down):  # the activation clip as stored (fp16)
        gp.a_clip.copy_(torch.logit(torch.sigmoid(gp.a_clip).half().double()).float())
    w = transformed_weights(layer, bp)
    h, kvd, inter = layer.split[0], layer.split[1], layer.inter
    a, m = prefix + "self_attn.", prefix + "mlp."
    out = {prefix + "input_layernorm.weight": w.input_norm, prefix + "post_attention_layernorm.weight": w.post_norm}

    def put(weight: torch.Tensor, gp: GroupParams, names: list[tuple[str, int]], attr: str) -> None:
        clip = torch.sigmoid(gp.w_clip)
        if moments is None:
            q, s = quantize_weight_sym(weight, 4, clip)
        else:
            h = transformed_moment(moments[attr], gp.kron, bp.v if attr == "o_proj" else None, gp.scale)
            q, s = gptq(weight, h, 4, clip, damp)
        extra = {"trans_left": gp.kron.left.half(), "act_clip": torch.sigmoid(gp.a_clip).reshape(1).half()}
        if gp.kron.right is not None:
            extra["trans_right"] = gp.kron.right.half()
        start = 0
        for name, rows in names:
            out.update({name + k: v for k, v in pack_weight(q[start:start + rows], s[start:start + rows]).items()})
            out.update({name + k: v.clone() for k, v in extra.items()})
            start += rows

    put(w.qkv, bp.qkv, [(a + "q_proj.", h), (a + "k_proj.", kvd), (a + "v_proj.", kvd)], "qkv")
    put(w.o, bp.o, [(a + "o_proj.", w.o.shape[0])], "o_proj")
    put(w.gate_up, bp.gate_up, [(m + "gate_proj.", inter), (m + "up_proj.", inter)], "gate_up")
    put(w.down, bp.down, [(m + "down_proj.", w.down.shape[0])], "down")
    return out


class BlockIO:
    """Forward hooks keeping each decoder block's inputs and fp outputs while calibrate_blocks
    runs it (the training data of that block)."""

    def __init__(self, model: CausalLM):
        self.inputs: dict[int, list[torch.Tensor]] = {}
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.handles = []
        for i, layer in enumerate(model.layers):
            self.handles.append(layer.register_forward_pre_hook(
                lambda _m, args, i=i: self.inputs.setdefault(i, []).append(args[0].detach().clone())))
            self.handles.append(layer.register_forward_hook(
                lambda _m, _a, out, i=i: self.outputs.setdefault(i, []).append(out.detach().clone())))

    def take(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.inputs.pop(i)), torch.cat(self.outputs.pop(i))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed, "calib": str(args.calib),
            "epochs": args.fq_epochs, "lr": args.fq_lr, "batch": args.fq_batch, "kv_bits": args.fq_kv_bits,
            "a_bits": args.a_bits, "version": 1}


def _add_args(p: argparse.ArgumentParser) -> None:
    add_calib_args(p)
    g = p.add_argument_group("flatquant")
    g.add_argument("--fq-epochs", type=int, default=DEFAULT_EPOCHS, help=f"flatquant: epochs per block (default {DEFAULT_EPOCHS})")
    g.add_argument("--fq-lr", type=float, default=DEFAULT_LR, help=f"flatquant: learning rate of transforms (clips: 10x; default {DEFAULT_LR})")
    g.add_argument("--fq-batch", type=int, default=4, help="flatquant: samples per optimisation step (default 4)")
    g.add_argument("--fq-kv-bits", type=int, choices=(4, 16), default=4,
                   help="flatquant: fake-quantize K/V like the int4 KV cache while training (default 4)")
    g.add_argument("--fq-w-quant", choices=("rtn", "gptq"), default="rtn",
                   help="flatquant: weights by RTN with the learned clips (default) or GPTQ on the transformed inputs")
    g.add_argument("--fq-work-dir", default=None,
                   help="flatquant: where finished blocks are saved for resuming (default OUT.flatquant-work)")


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    if args.bits != 4 or getattr(args, "a_bits", 4) != 4:
        raise ConfigError("flatquant writes W4A4: 4-bit weights and activations")
    if args.fq_epochs < 0 or args.fq_batch < 1 or args.fq_lr <= 0:
        raise ConfigError("flatquant needs --fq-epochs >= 0, --fq-batch >= 1 and --fq-lr > 0")
    work = Path(args.fq_work_dir) if args.fq_work_dir else Path(str(out).rstrip("/") + ".flatquant-work")
    work.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    cfg, tensors = load_fp_tensors(src)
    model, samples, info = prepare(src, args)
    for n in (cfg.head_dim,):
        factor(n)  # the q/k Hadamard must exist for this head size
    io = BlockIO(model)
    report: list[dict[str, Any]] = []
    t_start = time.perf_counter()

    def on_block(layer: DecoderLayer, stats: BlockStats) -> None:
        i = stats.index
        x, y = io.take(i)
        path = work / f"block{i:03d}.pt"
        bp = BlockParams(layer, stats, args.seed + 1000 * i)
        saved = torch.load(path, weights_only=True) if path.is_file() else None
        if saved is not None and saved.get("settings") == settings:
            bp.load_state_dict(saved["params"])
            report.append(saved["report"])
        else:
            t0 = time.perf_counter()
            before = block_mse(model, layer, bp, x, y, args.fq_kv_bits, args.fq_batch)
            hist = train_block(model, layer, bp, x, y, args.fq_epochs, args.fq_lr, args.fq_batch, args.fq_kv_bits,
                               f"flatquant train block {i + 1}/{len(model.layers)}")
            rep = {"block": i, "mse_init": before, "mse_epochs": hist, "seconds": round(time.perf_counter() - t0, 1)}
            torch.save({"settings": settings, "params": bp.state_dict(), "report": rep}, path)
            report.append(rep)
        moments = ({n: st.second_moment for n, st in stats.inputs.items()} if args.fq_w_quant == "gptq" else None)
        tensors.update(export_block(layer, bp, f"model.layers.{i}.", moments))
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.pop(f"model.layers.{i}.self_attn.{name}.weight", None)
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors.pop(f"model.layers.{i}.mlp.{name}.weight", None)

    try:
        calibrate_blocks(model, samples, on_block, gram=args.fq_w_quant == "gptq", propagate="original",
                         desc="flatquant")
    finally:
        io.remove()
    qcfg = {"quant_method": "qserve-flatquant", "format": "qserve-w4a4-v1", "w_bits": 4, "a_bits": 4,
            "a_clip": 1.0, "group_size": -1, "qk_rotation": "hadamard", "calibration": info,
            "epochs": args.fq_epochs, "lr": args.fq_lr, "train_kv_bits": args.fq_kv_bits,
            "weight_quant": args.fq_w_quant}
    write_quantized(src, out, cfg, tensors, qcfg)
    (work / "report.json").write_text(json.dumps(report, indent=1))
    return {**info, "epochs": args.fq_epochs, "lr": args.fq_lr, "kv_bits": args.fq_kv_bits, "w_quant": args.fq_w_quant,
            "seconds_calibration": round(time.perf_counter() - t_start, 1),
            "mse_init_mean": sum(r["mse_init"] for r in report) / len(report),
            "mse_final_mean": sum(r["mse_epochs"][-1] if r["mse_epochs"] else r["mse_init"] for r in report) / len(report)}


register_quantizer(Quantizer("flatquant", _add_args, run,
                             "FlatQuant W4A4: learned Kronecker transforms + clipping, calibrated per block"))
