"""W4A4 runtime shared by QuaRot and FlatQuant: an online transform, per-token 4-bit activations,
4-bit weights, and an integer GEMM.

Stored tensors under one linear's prefix:
- `qweight` int32 [N, ceil(K/8)]: 4-bit symmetric codes q ∈ [-8, 7] stored as q + 8, packed 8 per
  word (qserve.groupquant.pack_int4 order); `scales` fp16 [N, 1] per output channel: w = q · s.
  Or, for rotation-only checkpoints (w_bits 16), `fp_weight` [N, K].
- optional `bias` [N];
- the online transform applied to the input before it is quantized (at most one):
  `had_signs` int8 [K] (x → x · diag(s) · H_K / √K, QuaRot) or `trans_left` [a, a] with optional
  `trans_right` [b, b], a · b = K (x viewed [a, b] → Lᵀ X R, i.e. x · (L ⊗ R), FlatQuant);
- optional `act_clip` [1]: this layer's activation clip ratio (else quantization_config's a_clip).
quantization_config: w_bits (4 | 16), a_bits (4 | 8 | 16), a_clip.

Activations are quantized per token, symmetric: s = clip · max|x| / 7, q = clamp(round(x / s),
-8, 7). The matmul runs on integers (`torch._int_mm`: int8 × int8 → int32, exact for 4-bit
values; on CPU any shape works, CUDA needs M > 16 so short inputs are padded) and the int32
result is scaled by s_token × s_channel. `reference_linear` is the same computation in plain
floating point, for tests.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from qserve.errors import ConfigError
from qserve.groupquant import pack_int4, unpack_int4
from qserve.hadamard import hadamard_transform, rotation_matrix
from qserve.linear import QuantLinear

TRANSFORM_KEYS = ("had_signs", "trans_left", "trans_right", "act_clip")
W_BITS = (4, 16)
ROW_CHUNK = 256  # tokens per pass through transform, quantization, GEMM and scaling
A_BITS = (4, 8, 16)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# --- quantizers -------------------------------------------------------------------------------

def quantize_act(x: torch.Tensor, bits: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric: int8 codes [M, K] in [-2^(b-1), 2^(b-1)-1] and fp32 scales [M, 1]."""
    xf = x.float()
    m = qmax(bits)
    s = (xf.abs().amax(-1, keepdim=True) * clip / m).clamp(min=1e-8)
    q = xf.div(s).round_().clamp_(-m - 1, m)
    return q.to(torch.int8), s


def fake_quant_act(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """What quantize_act's codes represent, as floats (x's dtype)."""
    q, s = quantize_act(x, bits, clip)
    return (q.float() * s).to(x.dtype)


def quantize_weight_sym(w: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel symmetric: int8 codes [N, K] and the fp16 scales [N, 1] actually stored
    (codes are rounded against the fp16 scale, so dequantizing the stored pair is exact)."""
    wf = w.float()
    clip_t = torch.as_tensor(clip, dtype=torch.float32).reshape(-1, 1) if not isinstance(clip, float) else clip
    m = qmax(bits)
    s = (wf.abs().amax(1, keepdim=True) * clip_t / m).clamp(min=1e-8).to(torch.float16)
    q = torch.round(wf / s.float()).clamp_(-m - 1, m)
    return q.to(torch.int8), s


def fake_quant_weight(w: torch.Tensor, bits: int, clip: torch.Tensor | float = 1.0) -> torch.Tensor:
    q, s = quantize_weight_sym(w, bits, clip)
    return q.float() * s.float()


def search_weight_clip(w: torch.Tensor, bits: int, moment: torch.Tensor | None = None,
                       ratios: tuple[float, ...] = tuple(1 - i / 40 for i in range(21))) -> torch.Tensor:
    """Per-row clip ratio [N] minimising the row's quantization error: the output MSE
    d · E[x xᵀ] · dᵀ when the input's second moment is known, else the weight MSE."""
    wf = w.float()
    best_err = torch.full((w.shape[0],), float("inf"))
    best = torch.ones(w.shape[0])
    for r in ratios:
        d = fake_quant_weight(wf, bits, torch.full((w.shape[0],), r)) - wf
        err = ((d @ moment) * d).sum(1) if moment is not None else (d * d).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def pack_weight(q: torch.Tensor, s: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 codes in [-8, 7] and fp16 scales -> stored tensors."""
    return {"qweight": pack_int4((q.to(torch.int16) + 8).to(torch.uint8)), "scales": s.to(torch.float16)}


def stored_weight(stored: dict[str, torch.Tensor], in_features: int) -> torch.Tensor:
    """fp32 [N, K] weight the stored tensors represent."""
    if "fp_weight" in stored:
        return stored["fp_weight"].float()
    q = unpack_int4(stored["qweight"], in_features).to(torch.int16) - 8
    return q.float() * stored["scales"].float()


# --- online transforms ------------------------------------------------------------------------

def kron_factors(n: int) -> tuple[int, int]:
    """n = a·b with a the largest divisor not above √n (576 -> 24·24, 1536 -> 32·48): the factor
    sizes of a Kronecker transform, so its two matmuls cost a + b MACs per value instead of n."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def kron_transform(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None) -> torch.Tensor:
    """x [..., a·b] -> x · (left ⊗ right): view x as X [a, b], return Lᵀ X R (two small matmuls)."""
    a = left.shape[0]
    xs = x.reshape(*x.shape[:-1], a, x.shape[-1] // a)
    if right is not None:
        xs = torch.matmul(xs, right.to(x.dtype))
    return torch.matmul(left.t().to(x.dtype), xs).reshape(x.shape)


def transform_matrix(stored: dict[str, torch.Tensor], k: int) -> torch.Tensor | None:
    """Dense fp64 [K, K] matrix of the layer's online transform (None for none): for references."""
    if "had_signs" in stored:
        return rotation_matrix(k, stored["had_signs"])
    if "trans_left" in stored:
        left = stored["trans_left"].double().contiguous()
        right = stored.get("trans_right")
        right = torch.eye(k // left.shape[0], dtype=torch.float64) if right is None else right.double().contiguous()
        return torch.kron(left, right)
    return None


def check_config(qcfg: dict[str, Any]) -> tuple[int, int, float]:
    w_bits, a_bits = int(qcfg.get("w_bits", 4)), int(qcfg.get("a_bits", 4))
    a_clip = float(qcfg.get("a_clip", 1.0))
    if w_bits not in W_BITS or a_bits not in A_BITS:
        raise ConfigError(f"W4A4 layers support w_bits {W_BITS} and a_bits {A_BITS}, got {w_bits}/{a_bits}")
    if not 0 < a_clip <= 1:
        raise ConfigError(f"a_clip must be in (0, 1], got {a_clip}")
    return w_bits, a_bits, a_clip


def int_matmul(xq: torch.Tensor, wq_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [K, N] -> int32 [M, N]. CUDA's kernel wants M > 16: pad and slice."""
    m = xq.shape[0]
    if xq.is_cuda and m <= 16:
        return torch._int_mm(F.pad(xq, (0, 0, 0, 17 - m)), wq_t)[:m]
    return torch._int_mm(xq, wq_t)


class W4A4Linear(QuantLinear):
    """Online transform -> per-token activation quantization -> integer GEMM -> scales."""

    def __init__(self, stored: dict[str, torch.Tensor], in_features: int, out_features: int,
                 qcfg: dict[str, Any], dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.a_bits, clip = check_config(qcfg)
        self.a_clip = float(stored["act_clip"].float().reshape(-1)[0]) if "act_clip" in stored else clip
        self.dtype = dtype
        # online transforms run in fp32: a bf16 butterfly would round at every stage
        signs = stored.get("had_signs")
        self.register_buffer("had_signs", None if signs is None else signs.float())
        left, right = stored.get("trans_left"), stored.get("trans_right")
        self.register_buffer("trans_left", None if left is None else left.float())
        self.register_buffer("trans_right", None if right is None else right.float())
        bias = stored.get("bias")
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        if "fp_weight" in stored or self.w_bits == 16 or self.a_bits == 16:
            # no integer path: keep the (dequantized) weight in the compute dtype
            self.register_buffer("weight", stored_weight(stored, in_features).to(dtype))
            self.qweight = self.w_scale = None
        else:
            q = unpack_int4(stored["qweight"], in_features).to(torch.int16) - 8
            self.weight = None
            self.register_buffer("qweight", q.to(torch.int8).contiguous())  # [N, K]; the GEMM reads its transpose
            self.register_buffer("w_scale", stored["scales"].float().reshape(1, -1))

    @classmethod
    def from_stored(cls, stored, in_features, out_features, qcfg, dtype):
        if "qweight" in stored:
            want = (out_features, (in_features + 7) // 8)
            if tuple(stored["qweight"].shape) != want or tuple(stored["scales"].shape) != (out_features, 1):
                raise ConfigError(f"W4A4 qweight/scales have shapes {list(stored['qweight'].shape)}/"
                                  f"{list(stored['scales'].shape)}, expected {list(want)}/[{out_features}, 1]")
        elif "fp_weight" not in stored:
            raise ConfigError("a W4A4 linear needs qweight+scales or fp_weight")
        if "had_signs" in stored and stored["had_signs"].shape != (in_features,):
            raise ConfigError(f"had_signs has shape {list(stored['had_signs'].shape)}, expected [{in_features}]")
        if "trans_left" in stored:
            a = stored["trans_left"].shape[0]
            b = stored["trans_right"].shape[0] if "trans_right" in stored else in_features // max(a, 1)
            if a * b != in_features:
                raise ConfigError(f"transform factors {a} x {b} do not match in_features {in_features}")
        return cls(stored, in_features, out_features, qcfg, dtype)

    @classmethod
    def resident_bytes(cls, stored, qcfg, float_bytes):
        """As __init__ keeps them: int8 codes unpacked to [N, K] for torch._int_mm and fp32 row
        scales, or a dequantized weight at the serving dtype; fp32 transforms; bias at serving dtype."""
        total = sum(math.prod(stored[k].shape) * 4 for k in ("had_signs", "trans_left", "trans_right") if k in stored)
        if "bias" in stored:
            total += math.prod(stored["bias"].shape) * float_bytes
        w_bits, a_bits, _ = check_config(qcfg)
        if "fp_weight" in stored:
            return total + math.prod(stored["fp_weight"].shape) * float_bytes
        n, words = stored["qweight"].shape  # K rounded up to 8: at most 7 bytes per row over
        if w_bits == 16 or a_bits == 16:
            return total + n * words * 8 * float_bytes
        return total + n * words * 8 + 4 * n

    @classmethod
    def concat_stored(cls, parts, qcfg):
        """q/k/v (or gate/up) share their input, hence its transform and activation clip."""
        out = {}
        for key in TRANSFORM_KEYS:
            present = [p.get(key) for p in parts]
            if any(t is None for t in present) != all(t is None for t in present):
                raise ConfigError(f"fused projections disagree on {key}")
            if present[0] is not None:
                if not all(torch.equal(present[0], t) for t in present[1:]):
                    return None  # different transforms: run the parts separately
                out[key] = present[0]
        for key in ("qweight", "scales", "fp_weight"):
            if all(key in p for p in parts):
                out[key] = torch.cat([p[key] for p in parts], 0)
        if any("bias" in p for p in parts):
            n = [p["qweight" if "qweight" in p else "fp_weight"].shape[0] for p in parts]
            out["bias"] = torch.cat([p.get("bias", torch.zeros(r)) for p, r in zip(parts, n)])
        return out

    def online(self, x: torch.Tensor) -> torch.Tensor:
        """The input transform, in fp32 (x unchanged when the layer has none)."""
        if self.had_signs is not None:
            return hadamard_transform(x.float(), self.had_signs)
        if self.trans_left is not None:
            return kron_transform(x.float(), self.trans_left, self.trans_right)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= ROW_CHUNK or x2.is_cuda:
            y = self._rows(x2)
        else:  # long CPU prefills in row chunks: the fp32 temporaries stay cache-sized
            y = torch.empty(x2.shape[0], self.out_features, dtype=self.dtype, device=x.device)
            for i in range(0, x2.shape[0], ROW_CHUNK):
                y[i:i + ROW_CHUNK] = self._rows(x2[i:i + ROW_CHUNK])
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = self.online(x)
        if self.weight is not None:
            if self.a_bits < 16:
                x = fake_quant_act(x, self.a_bits, self.a_clip)
            y = F.linear(x.to(self.dtype), self.weight)
        else:
            xq, xs = quantize_act(x, self.a_bits, self.a_clip)
            # convert once, then scale in place (a mixed int32 x fp32 multiply is ~10x slower on CPU)
            y = int_matmul(xq, self.qweight.t()).float().mul_(xs).mul_(self.w_scale).to(self.dtype)
        return y if self.bias is None else y + self.bias

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())


def reference_linear(stored: dict[str, torch.Tensor], x: torch.Tensor, qcfg: dict[str, Any]) -> torch.Tensor:
    """fp64 fake-quant reference of W4A4Linear: dense transform, fake-quantized activations,
    dequantized weight, float matmul."""
    k = x.shape[-1]
    w_bits, a_bits, clip = check_config(qcfg)
    if "act_clip" in stored:
        clip = float(stored["act_clip"].float().reshape(-1)[0])
    t = transform_matrix(stored, k)
    xd = x.double() if t is None else x.double() @ t
    if a_bits < 16:
        q, s = quantize_act(xd, a_bits, clip)
        xd = q.double() * s.double()
    y = xd @ stored_weight(stored, k).double().t()
    if "bias" in stored:
        y = y + stored["bias"].double()
    return y
