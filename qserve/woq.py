"""W4A16 / W8A16 weight-only linear: the runtime shared by RTN, AWQ and SmoothQuant+.

Stored tensors under a linear's prefix:
- 4 bits: `qweight` int32 [N, ceil(K/8)] (see groupquant for the nibble order), `scales` fp16
  [N, G], `qzeros` uint8 [N, G] (asymmetric; w = (q - z) * s), optional `bias`.
- 8 bits: `qweight` int8 [N, K], `scales` fp16 [N, 1]: symmetric per output channel, which is
  the layout torch's int8 CPU kernel computes with.

At load the codes are converted once into torch's CPU kernel layouts
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`); those kernels want bf16 activations, so
the layer computes in bf16 and returns the caller's dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from qserve.errors import ConfigError
from qserve.groupquant import (
    dequantize_asym, dequantize_sym, num_groups, pack_int4, quantize_asym, quantize_sym, unpack_int4,
)
from qserve.linear import TILE, QuantLinear, gemm_tiled, gemv_tiled, in_graph_row, tile_rows, untile

INT4_GROUP_SIZES = (32, 64, 128, 256)


def check_woq_config(bits: int, group_size: int) -> None:
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if bits == 8 and group_size != -1:
        raise ConfigError("int8 weights are per output channel (group_size -1): torch's int8 kernel")
    if bits not in (3, 4, 8):
        raise ConfigError(f"weight-only bits must be 3, 4 or 8, got {bits}")


_ROW_CHUNK = 4096


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int, clip: torch.Tensor | float | None = None
) -> dict[str, torch.Tensor]:
    """RTN-quantize one [N, K] weight into the stored format (3-bit codes share the 4-bit layout)."""
    check_woq_config(bits, group_size)
    if bits == 8:
        return quantize_rows_int8(lambda i, j: w[i:j], tuple(w.shape))
    q, s, z = quantize_asym(w, bits, group_size, clip)
    s16 = s.to(torch.float16)
    # requantize against the fp16 scale actually stored, so dequant(stored) is the RTN grid
    q = _requantize(w, s16, z, bits, group_size)
    return {"qweight": pack_int4(q), "scales": s16, "qzeros": z}


def quantize_rows_int8(read_rows: Callable[[int, int], torch.Tensor], shape: tuple[int, int]
                       ) -> dict[str, torch.Tensor]:
    """int8 per-row symmetric codes of an [N, K] weight read a row chunk at a time (read_rows(i, j)
    gives rows i..j-1): a vocab-sized head is never whole in memory in fp32, nor, read from a
    checkpoint (Checkpoint.rows), in its stored dtype."""
    q = torch.empty(shape, dtype=torch.int8)
    s = torch.empty(shape[0], 1, dtype=torch.float16)
    for i in range(0, shape[0], _ROW_CHUNK):
        j = min(i + _ROW_CHUNK, shape[0])
        q[i:j], s[i:j] = quantize_sym(read_rows(i, j), 8, -1)
    return {"qweight": q, "scales": s}


def _requantize(w: torch.Tensor, s16: torch.Tensor, z: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    k = w.shape[1]
    s = s16.float().repeat_interleave(group_size, -1)[:, :k]
    zz = z.float().repeat_interleave(group_size, -1)[:, :k]
    return torch.round(w.float() / s + zz).clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize_stored(stored: dict[str, torch.Tensor], in_features: int, group_size: int) -> torch.Tensor:
    """fp32 [N, K] weight that the stored tensors represent (the reference for every kernel)."""
    if stored["qweight"].dtype == torch.int8:
        return dequantize_sym(stored["qweight"], stored["scales"], -1)
    q = unpack_int4(stored["qweight"], in_features)
    return dequantize_asym(q, stored["scales"], stored["qzeros"], group_size)


def prepare_int4(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, in_features: int,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored int4 codes -> (w4, sz): torch's `_weight_int4pack_mm_for_cpu` layout, done once at load.

    A ragged last group (K=576, g=128) is padded to whole groups with code 8 (which the kernel
    maps to exactly zero before adding the group's offset); woq_matmul pads x with zeros to match,
    so the padded columns contribute nothing.
    """
    padded_k = num_groups(in_features, group_size) * group_size
    q = unpack_int4(qweight, in_features).to(torch.int32)
    if padded_k != in_features:
        q = torch.nn.functional.pad(q, (0, padded_k - in_features), value=8)
    w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s = scales.float()
    z = (8.0 - qzeros.float()) * s  # kernel computes (q - 8) * s + z
    return w4, torch.stack([s.t(), z.t()], -1).to(torch.bfloat16).contiguous()


def prepare_int8(qweight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored int8 codes -> (w8, s8) for `_weight_int8pack_mm`. The codes get a fresh allocation:
    the kernel faults on the unaligned views safetensors can return."""
    return qweight.clone(memory_format=torch.contiguous_format), scales.reshape(-1).to(torch.bfloat16)


def woq_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, group_size: int,
               out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) from prepare_int4 / prepare_int8 buffers (int8 when weight is int8).

    Computes in bf16 (the kernels' fast path) and returns x's dtype. Shared by WeightOnlyLinear
    and the vLLM plugin, so both run exactly the same ops.
    """
    shape = x.shape
    xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)
    if weight.dtype == torch.int8:
        y = torch.ops.aten._weight_int8pack_mm(xb, weight, scale)
    else:
        padded_k = weight.shape[1] * 2  # the CPU int4 pack holds two codes per byte
        if padded_k != shape[-1]:
            xb = torch.nn.functional.pad(xb, (0, padded_k - shape[-1]))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, weight, group_size, scale)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], out_features).to(x.dtype)


class WeightOnlyLinear(QuantLinear):
    """Computes x @ W^T with W kept as int4/int8 codes in torch's CPU kernel layout."""

    compile_safe = True

    def __init__(self, stored: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        bias = stored.get("bias")
        self.register_buffer("bias", None if bias is None else bias.to(torch.bfloat16))
        if stored["qweight"].dtype == torch.int8:
            w, s = prepare_int8(stored["qweight"], stored["scales"])
        else:
            w, s = prepare_int4(stored["qweight"], stored["scales"], stored["qzeros"], in_features, group_size)
        self.register_buffer("weight_packed", w)
        self.register_buffer("weight_scale", s)
        self.tiled = False

    def tile(self) -> bool:
        """int8 (an int8 head, RTN w8 layers): hold the codes tiled (qserve.linear.tile_rows) for the
        compiled step, which then dequantizes them inside its own loops (gemv_tiled at one row,
        gemm_tiled in the batch graph) instead of calling `_weight_int8pack_mm`. Why: SmolLM2-135M's
        int8 head (49152 x 576), 2 threads, paired: 1.03 vs 1.88 ms a call at one row (28 vs 15
        GB/s), 4.1 vs 6.0 ms at 8 rows; engine A/Bs, batch-1 decode, tiled / not: int4 g32 (its
        int8 head) 1.11x, RTN w8 1.45x. False (left as it is) for int4, or N not a multiple of TILE."""
        if self.tiled or self.weight_packed.dtype != torch.int8 or self.out_features % TILE:
            return False
        self.weight_packed = tile_rows(self.weight_packed)
        self.tiled = True
        return True

    def untile(self) -> None:
        """Back to `_weight_int8pack_mm`'s layout (the eager step's)."""
        if self.tiled:
            self.weight_packed = untile(self.weight_packed)
            self.tiled = False

    @classmethod
    def from_stored(cls, stored, in_features, out_features, qcfg: dict[str, Any], dtype):
        bits, gs = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
        check_woq_config(bits, gs)
        shape = stored["qweight"].shape
        want = (out_features, in_features) if bits == 8 else (out_features, (in_features + 7) // 8)
        if tuple(shape) != want:
            raise ConfigError(f"qweight has shape {list(shape)}, expected {list(want)}")
        return cls(stored, in_features, out_features, bits, gs)

    @classmethod
    def resident_bytes(cls, stored, qcfg, float_bytes):
        """int8: codes + a bf16 scale per row; int4: codes padded to whole groups, 2 per byte, and a
        bf16 (scale, offset) pair per group and row (prepare_int4's layout); bias in bf16."""
        q = stored["qweight"]
        n = q.shape[0]
        bias = 2 * n if "bias" in stored else 0
        if q.dtype == "I8":
            return n * q.shape[1] + 2 * n + bias
        groups = stored["scales"].shape[1]
        return n * groups * int(qcfg.get("group_size", 128)) // 2 + 4 * n * groups + bias

    @classmethod
    def concat_stored(cls, parts, qcfg):
        return {k: torch.cat([p[k] for p in parts], 0) for k in parts[0]
                if all(k in p for p in parts)} | (
            {} if all("bias" not in p for p in parts) else
            {"bias": torch.cat([p.get("bias", torch.zeros(p["qweight"].shape[0])) for p in parts])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tiled:
            return woq_matmul(x, self.weight_packed, self.weight_scale, self.group_size, self.out_features, self.bias)
        if in_graph_row(x):
            return gemv_tiled(x.to(torch.bfloat16), self.weight_packed, self.bias, self.weight_scale).to(x.dtype)
        if torch.compiler.is_compiling():  # the compiled batch step
            return gemm_tiled(x.to(torch.bfloat16), self.weight_packed, self.bias, self.weight_scale).to(x.dtype)
        # eager (a prefill chunk of a tiled w8 layer): the kernel's layout back, for this call
        return woq_matmul(x, untile(self.weight_packed), self.weight_scale, self.group_size, self.out_features, self.bias)


class ReferenceWeightOnlyLinear(nn.Module):
    """Pure-torch fp32 reference of WeightOnlyLinear (dequantize, then matmul) for tests."""

    def __init__(self, stored: dict[str, torch.Tensor], in_features: int, group_size: int):
        super().__init__()
        self.weight = dequantize_stored(stored, in_features, group_size)
        self.bias = stored.get("bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.float(), self.weight, None if self.bias is None else self.bias.float())
