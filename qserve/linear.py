"""The quantized-linear seam: every method's runtime half is a `QuantLinear` registered under the
`quant_method` string its checkpoints carry in config.json's `quantization_config`.

A method module does `@register_quant_method("qserve-foo")` on a QuantLinear subclass and
implements `from_stored` (build the layer from the tensors stored under one linear's prefix),
`forward`, and `weight_bytes`. Online transforms that must run before the matmul (a Hadamard
rotation, FlatQuant's Kronecker transform, activation quantization) live inside the method's
forward, so the model code never needs to know about them.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qserve.errors import CheckpointError, ConfigError

_REGISTRY: dict[str, type["QuantLinear"]] = {}

# Modules that register methods when imported; the registry loads them on first lookup so the
# core never imports a method it does not serve.
METHOD_MODULES = (
    "qserve.quant_methods.rtn",
    "qserve.quant_methods.awq",
    "qserve.quant_methods.smoothquant_plus",
    "qserve.quant_methods.bitstack",
    "qserve.quant_methods.quarot",
    "qserve.quant_methods.flatquant",
    "qserve.quant_methods.cskv",
)


class QuantLinear(nn.Module):
    """Runtime half of a quantization method: a drop-in replacement for nn.Linear."""

    quant_method: ClassVar[str] = ""
    # forward is plain torch ops on the module's tensors, with no Python state that changes
    # between calls, so torch.compile may trace it into the decode graph (qserve.compilation)
    compile_safe: ClassVar[bool] = False
    in_features: int
    out_features: int

    @classmethod
    def from_stored(
        cls, stored: dict[str, torch.Tensor], in_features: int, out_features: int,
        qcfg: dict[str, Any], dtype: torch.dtype,
    ) -> "QuantLinear":
        raise NotImplementedError

    @classmethod
    def concat_stored(cls, parts: list[dict[str, torch.Tensor]], qcfg: dict[str, Any]) -> dict[str, torch.Tensor] | None:
        """Stored tensors of several linears sharing an input, fused along out_features, or None
        when the format cannot be fused (the model then runs the parts one after another)."""
        return None

    @classmethod
    def resident_bytes(cls, stored: dict[str, Any], qcfg: dict[str, Any], float_bytes: int) -> int | None:
        """Bytes this layer will hold, from its stored tensors' headers (leaf name -> TensorInfo),
        without loading them: what the planner budgets. None: as stored, floats at the serving dtype."""
        return None

    def weight_bytes(self) -> int:
        """Bytes this layer keeps resident for its weights (what the planner budgets)."""
        return sum(t.numel() * t.element_size() for t in list(self.parameters()) + list(self.buffers()))


def register_quant_method(name: str):
    def deco(cls: type[QuantLinear]) -> type[QuantLinear]:
        cls.quant_method = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_method_modules() -> None:
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def get_quant_method(name: str) -> type[QuantLinear]:
    if name not in _REGISTRY:
        _load_method_modules()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown quant_method {name!r}; this qserve knows {sorted(_REGISTRY)}"
        ) from None


def registered_methods() -> list[str]:
    _load_method_modules()
    return sorted(_REGISTRY)


@torch.library.custom_op("qserve::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) with W in oneDNN's blocked layout (DenseLinear.pack). An op of its own so
    that torch.compile calls it as it is: inductor only lowers oneDNN linears on frozen weights."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T for one row of x, written as a multiply-and-sum that inductor turns into a C++
    reduction, fused with the ops around it, accumulating in fp32 like the library matmuls.

    Why: in a compiled batch-1 step this streams a plain-layout weight faster than calling the
    oneDNN-packed matmul (SmolLM2-135M's 120 bf16 layer weights as one graph: 36 GB/s against
    30 GB/s for the packed calls), and the norms, RoPE and SiLU around it stop being separate
    kernels. It is for one row only: it reads the weight once per row, so a batch calls the
    library matmul."""
    out = (x.float().unsqueeze(-2) * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def in_graph_row(x: torch.Tensor) -> bool:
    """x is one row inside a torch.compile trace: the compiled batch-1 step, which computes a
    linear as an in-graph GEMV (gemv, gemv_tiled) instead of calling a library kernel."""
    return x.numel() == x.shape[-1] and torch.compiler.is_compiling()


TILE = 32  # output rows per tile of DenseLinear.tile's layout: one 32-lane fp32 accumulator in inductor's loop
TILED_BMM_ROWS = 32  # up to this many input rows, tiled_linear multiplies the tiles as they lie


def gemv_tiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T for one row of x, W tiled as [N/TILE, K, TILE] (tile_rows), summed over K; int8 codes
    with a `scale` per output row are dequantized in the same loop (WeightOnlyLinear.tile).

    Why: inductor turns this into a loop that streams each tile's K x TILE block front to back into
    TILE fp32 accumulators: no horizontal sum per output row, and the input is realized once and
    read as one broadcast value per K step. gemv's row-wise loop recomputes the fused input (norm,
    residual) for every output row and ends every row in a horizontal sum. SmolLM2-135M bf16 batch-1
    decode, paired in-process rounds: 1.25x, 1.37x and 1.63x gemv's tok/s; TILE 16: 0.95x, 64: 0.57x."""
    n_tiles, k, tile = weight.shape
    x = torch.ops.prims.inductor_force_stride_order(x, x.stride())
    out = (x.float().reshape(k, 1) * weight.float()).sum(-2).reshape(*x.shape[:-1], n_tiles * tile)
    return _tiled_epilogue(out, scale, bias, x.dtype)


def _tiled_epilogue(out: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """The fp32 sums of a tiled read -> the linear's output: per-row int8 scale, bias, then one
    rounding to `dtype`; shared so the one-row and batch graphs round alike."""
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


ROW_GROUP = 4  # input rows gemm_tiled sums in one pass over a tile


def gemm_tiled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               scale: torch.Tensor | None = None) -> torch.Tensor:
    """gemv_tiled for several rows of x (the compiled batch step), ROW_GROUP rows per pass.

    Why: written as one sum per row of a group, inductor fuses the sums into one loop that reads
    and dequantizes each tile's K x TILE codes once for the group's rows, and with the tile index
    outermost in the output, every group of rows reads a tile while it is still in cache. SmolLM2-
    135M's int8 head (49152 x 576), 2 threads, paired, against `_weight_int8pack_mm`: 2.5 vs 3.2 ms
    at 2 rows, 2.4 vs 3.6 at 4, 4.2 vs 6.0 at 8 (groups outermost: 4.8 at 8). Groups of 8 rows
    were slower at 2 and 4 rows, which pay for the padding. Rows are padded to whole groups with
    zeros, sliced off after."""
    n_tiles, k, tile = weight.shape
    lead, rows = x.shape[:-1], x.reshape(-1, k)
    n = rows.shape[0]
    groups = F.pad(rows, (0, 0, 0, (-n) % ROW_GROUP)).float().view(-1, ROW_GROUP, k)
    groups = torch.ops.prims.inductor_force_stride_order(groups, groups.stride())  # realized once, as in gemv_tiled
    wf = weight.float()[:, None]
    out = torch.stack([(groups[None, :, r, :, None] * wf).sum(-2) for r in range(ROW_GROUP)], 2)  # [tiles, groups, ROW_GROUP, TILE]
    out = out.permute(1, 2, 0, 3).reshape(-1, n_tiles * tile)[:n]
    return _tiled_epilogue(out, scale, bias, x.dtype).reshape(*lead, n_tiles * tile)


def tile_rows(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] weight as [N/TILE, K, TILE]: TILE output rows at a time, each block column-major
    (a copy, same bytes). N must be a multiple of TILE."""
    return weight.view(-1, TILE, weight.shape[1]).transpose(1, 2).contiguous()


def untile(weight: torch.Tensor) -> torch.Tensor:
    """A tiled [N/TILE, K, TILE] weight back in the plain [N, K] layout (a copy)."""
    n_tiles, k, tile = weight.shape
    return weight.transpose(1, 2).reshape(n_tiles * tile, k)


def tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T with W tiled, outside the compiled batch-1 step (prefill chunks, the eager head).

    A few rows multiply the tiles as they lie (one batched matmul over the tiles); more rows are
    faster as one GEMM on W^T gathered for the call from the tiles' 64-byte rows (a copy). SmolLM2
    shapes, 2 threads: at 1 row the batched matmul takes 0.3x the gathered GEMM's time, at 64 rows
    1.2x, at 512 rows 5x."""
    n_tiles, k, tile = weight.shape
    rows = x.reshape(-1, k)
    if rows.shape[0] <= TILED_BMM_ROWS:
        out = torch.matmul(rows, weight).transpose(0, 1).reshape(rows.shape[0], n_tiles * tile)
    else:
        out = rows @ weight.transpose(0, 1).reshape(k, n_tiles * tile)
    out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], n_tiles * tile)


def can_pack(dtype: torch.dtype) -> bool:
    """oneDNN is built in and, for bf16, this CPU has native bf16 dot products."""
    if not torch.backends.mkldnn.is_available() or dtype not in (torch.float32, torch.bfloat16):
        return False
    return dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


class DenseLinear(nn.Module):
    """An unquantized linear in the engine's compute dtype."""

    compile_safe: ClassVar[bool] = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        self.weight = nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(dtype), requires_grad=False)
        self.packed = False
        self.tiled = False

    def tile(self) -> bool:
        """Hold the weight as [N/TILE, K, TILE]: TILE output rows at a time, each block column-major
        (same bytes), for the compiled batch-1 step's gemv_tiled. Why: that step streams it 1.25-1.6x
        faster than plain rows (gemv_tiled). bf16 only: an fp32 step ran 0.84x plain rows with it (same
        engine A/B, two runs). For serving only, like pack. False (left as it is) when N is not a
        multiple of TILE, the weight is not bf16, or it is packed."""
        if self.packed or self.tiled or self.out_features % TILE or self.weight.dtype != torch.bfloat16:
            return False
        self.weight = nn.Parameter(tile_rows(self.weight.data), requires_grad=False)
        self.tiled = True
        return True

    def untile(self) -> None:
        """Back to plain rows (the eager step's layout when the compiled one is not used)."""
        if self.tiled:
            self.weight = nn.Parameter(untile(self.weight.data), requires_grad=False)
            self.tiled = False

    def pack(self) -> None:
        """Hold the weight in oneDNN's blocked layout instead (same bytes). Why: a batch-1 matmul
        streams it 1.5-2.3x faster than the plain layout (SmolLM2-135M's bf16 layers on this CPU,
        two runs: 19.5 -> 29.5 and 17.5 -> 39.9 GB/s), and small-batch decode is that stream. For serving only: the weight
        is then an opaque tensor that calibration code cannot read or modify."""
        self.untile()
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 1)  # laid out for batch 1
        del self.weight
        self.register_buffer("weight", packed)
        self.packed = True  # a plain flag: under torch.compile the weight's is_mkldnn reads False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x, self.weight, self.bias)
        one_row = in_graph_row(x)
        if self.tiled:
            return gemv_tiled(x, self.weight, self.bias) if one_row else tiled_linear(x, self.weight, self.bias)
        if one_row:
            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def weight_bytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


class ConcatLinear(nn.Module):
    """Linears sharing an input whose format cannot be fused: run each, concatenate outputs."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    @property
    def compile_safe(self) -> bool:
        return all(getattr(p, "compile_safe", False) for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def weight_bytes(self) -> int:
        return sum(p.weight_bytes() for p in self.parts)


def build_linear(
    parts: list[dict[str, torch.Tensor]], in_features: int, out_features: list[int],
    qcfg: dict[str, Any] | None, dtype: torch.dtype,
) -> nn.Module:
    """One (possibly fused) linear from the stored tensors of one or more projections.

    A part holding a plain `weight` is dense; any other part belongs to the checkpoint's method.
    """
    total_out = sum(out_features)
    for p, n in zip(parts, out_features):
        if "weight" in p and tuple(p["weight"].shape) != (n, in_features):
            raise CheckpointError(
                f"a linear weight has shape {list(p['weight'].shape)}, the config implies {[n, in_features]}"
            )
    if all("weight" in p for p in parts):
        w = torch.cat([p["weight"] for p in parts], 0)
        biases = [p.get("bias") for p in parts]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(n) for b, n in zip(biases, out_features)]
        )
        return DenseLinear(w, bias, dtype)
    if qcfg is None or any("weight" in p for p in parts):
        raise ConfigError("checkpoint mixes dense and quantized tensors inside one fused projection")
    cls = get_quant_method(qcfg["quant_method"])
    if len(parts) > 1:
        fused = cls.concat_stored(parts, qcfg)
        if fused is None:
            return ConcatLinear(
                [cls.from_stored(p, in_features, n, qcfg, dtype) for p, n in zip(parts, out_features)]
            )
        parts = [fused]
    return cls.from_stored(parts[0], in_features, total_out, qcfg, dtype)
