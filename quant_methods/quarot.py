"""QuaRot-style W4A4 (and KV4): randomized Hadamard rotations, then 4-bit weights and activations.

Offline (`qserve quantize --method quarot`), on an fp checkpoint, exact in fp64:
1. fold every RMSNorm scale into the linears reading it (q/k/v, gate/up, lm_head); the norms
   become weightless (stored as ones, which our loader reads);
2. rotate the residual stream by Q = diag(s)·H/√d: embedding E·Q, input projections W·Q, output
   projections (o_proj, down_proj) Qᵀ·W, lm_head W·Q. RMSNorm commutes with an orthogonal Q, so
   the model computes the same function. Tied embeddings are untied (lm_head written out);
3. rotate values per head by a Hadamard H_hd folded into v_proj's rows and o_proj's columns (so
   a 4-bit V cache sees rotated values);
4. give o_proj and down_proj an online randomized Hadamard of their input size (stored as
   `had_signs`, the weight's columns rotated to match), so their inputs are flat too;
5. mark the checkpoint `qk_rotation: hadamard`: the model applies H_hd to queries and keys after
   RoPE (q·k unchanged), so a 4-bit K cache sees rotated keys;
6. quantize weights to 4 bits, symmetric per output channel: GPTQ on the rotated model's
   calibration inputs (default), or RTN with a per-row clip search on the weight error (`--w-quant
   rtn`, data-free). Activations are quantized at run time per token to 4 bits with clip ratio
   `--a-clip` (QuaRot's 0.9). lm_head stays in the compute dtype, as in the paper.
`--rotate none` skips steps 1–5: the naive W4A4 baseline in the same format.

Runtime: qserve.w4a4.W4A4Linear (online transform, int4 activations, integer GEMM).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from qserve.calib import (
    BlockStats, FUSED_LINEARS, add_calib_args, calibrate_blocks, calibration_samples, calibration_texts, unfuse_rows,
)
from qserve.config import ModelConfig, parse_config
from qserve.errors import CheckpointError, ConfigError
from qserve.hadamard import factor, hadamard_transform, random_signs
from qserve.linear import register_quant_method
from qserve.model import CausalLM, DecoderLayer
from qserve.offline import Quantizer, linear_prefixes, load_fp_tensors, register_quantizer, write_quantized
from qserve.w4a4 import W4A4Linear, pack_weight, quantize_weight_sym, search_weight_clip

ONLINE = ("self_attn.o_proj", "mlp.down_proj")  # linears given an online Hadamard
DEFAULT_A_CLIP = 0.9


@register_quant_method("qserve-quarot")
class QuaRotLinear(W4A4Linear):
    """W4A4 layer of QuaRot checkpoints (and of the naive no-rotation baseline)."""


class DictCheckpoint:
    """In-memory stand-in for qserve.checkpoint.Checkpoint, so a transformed model can be built
    and calibrated without writing it to disk."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.tensors if n.startswith(prefix)]

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"transformed checkpoint lacks tensor {name!r}")
        t = self.tensors[name]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        return t

    map = get  # the tensors are in memory already: there is no file to view

    def check_shape(self, name: str, shape: tuple[int, ...] | None) -> None:
        self.get(name, shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]

    def mappable(self, name: str) -> bool:
        return False

    def get_many(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: t for n, t in self.tensors.items() if n.startswith(prefix)}


# --- rotation (exact, fp64) -------------------------------------------------------------------

def _rot_in(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """W·Q for an input-side weight [N, K] (each row rotated)."""
    return hadamard_transform(w, signs)


def _rot_out(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Qᵀ·W for an output-side weight [K, N]."""
    return hadamard_transform(w.t(), signs).t()


def _heads(w: torch.Tensor, head_dim: int, rows: bool) -> torch.Tensor:
    """Per-head Hadamard: rows=True gives Hᵀ·W_h for each block of head_dim rows (v_proj),
    rows=False gives W_h·H for each block of head_dim columns (o_proj)."""
    if rows:
        n, k = w.shape
        return hadamard_transform(w.t().reshape(k, n // head_dim, head_dim)).reshape(k, n).t()
    n, k = w.shape
    return hadamard_transform(w.reshape(n, k // head_dim, head_dim)).reshape(n, k)


def check_rotatable(cfg: ModelConfig) -> None:
    for what, n in (("hidden_size", cfg.hidden_size), ("intermediate_size", cfg.intermediate_size),
                    ("head_dim", cfg.head_dim), ("attention width", cfg.num_heads * cfg.head_dim)):
        try:
            factor(n)
        except ConfigError as e:
            raise ConfigError(f"{what} {n}: {e}") from None


def rotate_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], seed: int = 0,
                   online_o: bool = True) -> dict[str, torch.Tensor]:
    """Fold norms and rotate, in fp64. Returns HF-named tensors (fp64) where every decoder linear's
    weight is `<prefix>weight` and o_proj/down_proj carry `<prefix>had_signs` for their online
    transform; the model with those transforms applied computes the original function."""
    check_rotatable(cfg)
    t = {k: v.double() for k, v in tensors.items()}
    d, hd = cfg.hidden_size, cfg.head_dim
    q_signs = random_signs(d, seed)
    emb = t["model.embed_tokens.weight"]
    head = t.get("lm_head.weight", emb).clone()
    t["lm_head.weight"] = _rot_in(head * t["model.norm.weight"], q_signs)
    t["model.norm.weight"] = torch.ones(d, dtype=torch.float64)
    t["model.embed_tokens.weight"] = _rot_in(emb, q_signs)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        for norm, readers in ((p + "input_layernorm.weight", ("q_proj", "k_proj", "v_proj")),
                              (p + "post_attention_layernorm.weight", ("gate_proj", "up_proj"))):
            g = t[norm]
            base = a if "k_proj" in readers else m
            for r in readers:
                t[base + r + ".weight"] = _rot_in(t[base + r + ".weight"] * g, q_signs)
            t[norm] = torch.ones(d, dtype=torch.float64)
        t[a + "v_proj.weight"] = _heads(t[a + "v_proj.weight"], hd, rows=True)
        if a + "v_proj.bias" in t:
            b = t[a + "v_proj.bias"]
            t[a + "v_proj.bias"] = hadamard_transform(b.reshape(-1, hd)).reshape(-1)
        wo = _rot_out(_heads(t[a + "o_proj.weight"], hd, rows=False), q_signs)
        wd = _rot_out(t[m + "down_proj.weight"], q_signs)
        for prefix in (a + "o_proj.", m + "down_proj."):
            if prefix + "bias" in t:
                t[prefix + "bias"] = hadamard_transform(t[prefix + "bias"], q_signs)
        if online_o:
            s_o = random_signs(wo.shape[1], seed + 1 + 2 * i)
            wo = _rot_in(wo, s_o)
            t[a + "o_proj.had_signs"] = s_o
        s_d = random_signs(wd.shape[1], seed + 2 + 2 * i)
        t[a + "o_proj.weight"] = wo
        t[m + "down_proj.weight"] = _rot_in(wd, s_d)
        t[m + "down_proj.had_signs"] = s_d
    return t


def rotated_config(cfg: ModelConfig, qcfg: dict[str, Any]) -> ModelConfig:
    """The config of a rotated checkpoint: untied head, the method's quantization_config."""
    raw = dict(cfg.raw)
    raw["tie_word_embeddings"] = False
    raw["quantization_config"] = qcfg
    return parse_config(raw)


def as_w4a4_stored(tensors: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Rotated fp tensors in the W4A4 layout with fp weights (`fp_weight`), cast to dtype."""
    out = {}
    for k, v in tensors.items():
        out[k] = v if not v.is_floating_point() else v.to(dtype)
    for p in linear_prefixes(cfg):
        out[p + "fp_weight"] = out.pop(p + "weight")
    return out


def base_qcfg(rotate: bool, a_clip: float, seed: int) -> dict[str, Any]:
    q = {"quant_method": "qserve-quarot", "format": "qserve-w4a4-v1", "w_bits": 16, "a_bits": 16,
         "a_clip": a_clip, "group_size": -1, "rotation": "hadamard" if rotate else "none", "seed": seed}
    if rotate:
        q["qk_rotation"] = "hadamard"
    return q


def rotated_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], max_len: int, seed: int = 0,
                  dtype: torch.dtype = torch.float32, online_o: bool = True) -> CausalLM:
    """The rotated, unquantized model (w16a16 W4A4 layers with their online transforms)."""
    rot = as_w4a4_stored(rotate_tensors(cfg, tensors, seed, online_o), cfg, dtype)
    rcfg = rotated_config(cfg, base_qcfg(True, 1.0, seed))
    return CausalLM(rcfg, DictCheckpoint(rot), dtype, max_len).eval()


# --- GPTQ -------------------------------------------------------------------------------------

def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, clip: torch.Tensor,
         damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al., 2022), per-channel symmetric, columns in decreasing-activation order.

    Quantizes columns one at a time and pushes each column's rounding error onto the columns not
    yet quantized, weighted by the inverse Hessian (H = E[x xᵀ]) so the layer's output error, not
    the weight error, is minimised. Scales come from the clipped per-row range chosen up front.
    Returns int8 codes [N, K] and fp16 scales [N, 1]."""
    w = w.double().clone()
    h = hessian.double().clone()
    n, k = w.shape
    _, scale = quantize_weight_sym(w, bits, clip)
    s = scale.double()
    m = 2 ** (bits - 1) - 1
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, hi = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            qc = torch.round(col / s[:, 0]).clamp(-m - 1, m)
            q[:, i1 + j] = qc
            e = (col - qc * s[:, 0]) / hi[j, j]
            w1[:, j:] -= e[:, None] * hi[j, j:][None, :]
            err1[:, j] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = torch.empty_like(q)
    codes[:, perm] = q
    return codes.to(torch.int8), scale


# --- quantizer --------------------------------------------------------------------------------

def _quantize_layer_gptq(layer: DecoderLayer, stats: BlockStats, bits: int, damp: float,
                         out: dict[str, tuple[torch.Tensor, torch.Tensor]], prefix: str) -> None:
    """GPTQ every linear of one rotated block in place (weights replaced by their dequantized
    values, so later blocks see this block's quantization error) and record codes per projection."""
    for attr in FUSED_LINEARS:
        mod = getattr(layer, attr)
        if not isinstance(mod, W4A4Linear) or mod.weight is None:
            raise ConfigError(f"layer {attr} is not an fp W4A4 layer; GPTQ needs the rotated fp model")
        moment = stats.inputs[attr].second_moment.double()
        if mod.had_signs is not None:  # the stats saw the input before the online rotation
            r = hadamard_transform(moment, mod.had_signs.double())
            moment = hadamard_transform(r.t().contiguous(), mod.had_signs.double())
        w = mod.weight.data.float()
        clip = search_weight_clip(w, bits)  # on the weight error, as QuaRot's GPTQ does
        codes, scales = gptq(w, moment, bits, clip, damp)
        mod.weight.data.copy_((codes.float() * scales.float()).to(mod.weight.dtype))
        for name, (c, s) in zip(FUSED_LINEARS[attr], zip(unfuse_rows(layer, attr, codes).values(),
                                                          unfuse_rows(layer, attr, scales).values())):
            out[prefix + name + "."] = (c, s)


def quantize_rtn(tensors: dict[str, torch.Tensor], cfg: ModelConfig, bits: int) -> None:
    """Data-free: each decoder linear's weight -> codes with a per-row clip search on weight MSE."""
    for p in linear_prefixes(cfg):
        w = tensors.pop(p + "weight").float()
        q, s = quantize_weight_sym(w, bits, search_weight_clip(w, bits))
        tensors.update({p + k: v for k, v in pack_weight(q, s).items()})


def _add_args(p: argparse.ArgumentParser) -> None:
    add_calib_args(p)
    g = p.add_argument_group("quarot / w4a4")
    g.add_argument("--rotate", choices=("hadamard", "none"), default="hadamard",
                   help="quarot: residual/head/online Hadamard rotations, or none (naive W4A4 baseline)")
    g.add_argument("--w-quant", choices=("gptq", "rtn"), default="gptq",
                   help="quarot: weight quantizer (gptq uses calibration data; rtn is data-free)")
    g.add_argument("--a-bits", type=int, default=4, help="quarot/flatquant: activation bits (4, 8 or 16)")
    g.add_argument("--a-clip", type=float, default=DEFAULT_A_CLIP,
                   help=f"quarot: activation clip ratio (default {DEFAULT_A_CLIP})")
    g.add_argument("--gptq-damp", type=float, default=0.01, help="quarot: GPTQ dampening (fraction of mean diag)")


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    bits = args.bits
    if bits != 4:
        raise ConfigError(f"quarot writes 4-bit weights (W4A4), got --bits {bits}")
    if getattr(args, "group_size", -1) not in (-1, 128):  # 128 is `qserve quantize`'s generic default
        raise ConfigError("quarot quantizes weights per output channel; leave --group-size unset")
    rotate = args.rotate == "hadamard"
    cfg, tensors = load_fp_tensors(src)
    qcfg = base_qcfg(rotate, args.a_clip, args.seed) | {"w_bits": 4, "a_bits": args.a_bits,
                                                        "weight_quant": args.w_quant}
    from qserve.w4a4 import check_config

    check_config(qcfg)
    info: dict[str, Any] = {"rotate": args.rotate, "w_quant": args.w_quant, "a_clip": args.a_clip}
    if rotate:
        tensors = rotate_tensors(cfg, tensors, args.seed)
    if args.w_quant == "rtn":
        quantize_rtn(tensors, cfg, bits)
    else:
        if not rotate:
            raise ConfigError("--w-quant gptq runs on the rotated model; use --w-quant rtn with --rotate none")
        samples = calibration_samples(src, calibration_texts(args.calib), args.samples, args.seq_len, args.seed)
        calib = {"calib": str(args.calib) if args.calib else "wiki/calib", "samples": args.samples,
                 "seq_len": args.seq_len, "seed": args.seed}
        info |= calib
        qcfg["calibration"] = calib
        rot = as_w4a4_stored(tensors, cfg, torch.float32)
        rcfg = rotated_config(cfg, base_qcfg(True, 1.0, args.seed))
        model = CausalLM(rcfg, DictCheckpoint(rot), torch.float32, args.seq_len).eval()
        codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        calibrate_blocks(model, samples,
                         lambda layer, stats: _quantize_layer_gptq(layer, stats, bits, args.gptq_damp, codes,
                                                                   f"model.layers.{stats.index}."),
                         gram=True, propagate="transformed", desc="quarot gptq")
        for p in linear_prefixes(cfg):
            tensors.pop(p + "weight")
            tensors.update({p + k: v for k, v in pack_weight(*codes[p]).items()})
    tensors = {k: (v.float() if v.dtype == torch.float64 else v) for k, v in tensors.items()}
    out_cfg = rotated_config(cfg, qcfg) if rotate else cfg
    write_quantized(src, out, out_cfg, tensors, qcfg)
    return info


register_quantizer(Quantizer("quarot", _add_args, run,
                             "QuaRot W4A4: Hadamard rotations + 4-bit weights (GPTQ/RTN) and activations"))
