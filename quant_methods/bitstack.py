"""BitStack: size-elastic weights (Wang et al. 2024, "BitStack: any-size compression of LLMs").

Offline (`qserve quantize --method bitstack`): every decoder linear W [out, in] is decomposed on
its activation-scaled residual. With `a` = mean |x| per input channel over the calibration tokens
and `s = a / mean(a)`, start from R = W and repeat `--blocks` times:

    sign(R·diag(s)) -> 1 bit per weight, packed 8 per byte along in_features
    |R·diag(s)| ≈ u vᵀ, a rank-`--rank` SVD with the singular values split evenly (√σ each)
    R <- R - sign(R) ⊙ (u (v/s)ᵀ)

Each iteration is one *block*: `u` [out, r] and `v/s` [in, r] in bf16 plus the packed signs,
stored back to back as one uint8 tensor `<linear>.bitstack.block.<i>`.
The inverse scale is folded into v, exactly (S ⊙ (u vᵀ))·diag(1/s) = S ⊙ (u (v/s)ᵀ)), so the
runtime applies nothing to x. The residual is updated with the stored bf16 values, so block i
corrects the rounding of blocks < i and the runtime reconstruction equals the offline one.
Blocks of all linears are ranked into one global stack (see bitstack_stack.py); loading its first
N blocks gives a model of any size.

Runtime (`qserve-bitstack`): a layer keeps only its packed blocks resident. Each forward
reconstructs the layer's dense weight, Σ_i sign_i ⊙ (u_i v_iᵀ), chunk by chunk of ~1M weights into
one scratch buffer shared by all BitStack layers, and multiplies each chunk as soon as it is
built: no dense weight exists beyond one chunk, never a layer's, never the whole model's.
bench/bitstack_kernels.py measured this against the sign × low-rank matmul
(y = Σ_i u_i ⊙ (S_i (x ⊙ v_i)) summed over the rank, signs unpacked per call the same way): at
one token per call they cost the same (~0.4 ns per weight per block with 2 threads, both
dominated by unpacking the signs and one pass over the weights), from 16 tokens up
reconstruction is 2-30x faster, since its cost does not grow with the tokens. Both are 10-100x
slower than a bf16 matmul with the weight held dense (what "reconstruct once per resize" would
do); that option was rejected because it keeps the bf16 model resident, which defeats the budget.
The scratch (dense chunk, one low-rank product, unpacked signs, their byte indices; 6.5 MiB in
bf16 for any model with layers of 1M+ weights) is counted by `scratch_bytes()`; a layer's
`weight_bytes()` counts its blocks and bias only.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qserve.errors import CheckpointError, ConfigError
from qserve.linear import QuantLinear, register_quant_method
from qserve.offline import Quantizer, register_quantizer

METHOD = "qserve-bitstack"
FORMAT = "qserve-bitstack-v1"
STORE_DTYPE = torch.bfloat16
DEFAULT_BLOCKS = 16
DEFAULT_RANK = 16
SVD_NITER = 4  # power iterations of the randomized SVD: within 2% of the exact SVD's error, 10x faster
MIN_SCALE = 1e-3  # floor of the normalised activation scale, so v/s stays finite for dead channels
CHUNK_ELEMS = 2**20  # weights reconstructed per step of a forward (2 MiB in bf16)


# --- packed signs ---------------------------------------------------------------------------------

def sign_row_bytes(in_features: int) -> int:
    """Bytes per output row of packed signs: in_features bits, padded to 8-byte rows so every tensor
    of a block stays aligned inside the stack file."""
    return -(-in_features // 64) * 8


def pack_signs(positive: torch.Tensor) -> torch.Tensor:
    """[out, in] bool -> [out, sign_row_bytes(in)] uint8; bit j of byte c is column 8c + j (1 = +)."""
    n, k = positive.shape
    bits = F.pad(positive.to(torch.uint8), (0, sign_row_bytes(k) * 8 - k)).view(n, -1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


@functools.cache
def _sign_lut(dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: the ±1 values of the 8 columns a packed byte holds (a normal tensor even when first
    asked for inside the model's inference_mode forward)."""
    with torch.inference_mode(False):
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        return (bits * 2 - 1).to(dtype)


def unpack_signs(packed: torch.Tensor, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of pack_signs as a ±1 matrix [out, in] (reference path, allocates)."""
    return _sign_lut(dtype)[packed.long()].view(packed.shape[0], -1)[:, :in_features]


# --- blocks ---------------------------------------------------------------------------------------

@dataclass
class Block:
    """One residual block of one linear: sign ⊙ (u vᵀ), ~1 bit per weight plus the rank-r factors.

    Stored and held as one byte buffer: u, then v, then the packed signs (`to_bytes`); `from_bytes`
    gives views into such a buffer, so a block is one allocation and one safetensors tensor.
    """

    u: torch.Tensor  # [out, r] bf16
    v: torch.Tensor  # [in, r] bf16, activation scale folded in
    signs: torch.Tensor  # [out, sign_row_bytes(in)] uint8
    raw: torch.Tensor | None = None  # the uint8 buffer u, v and signs view, when they come from one

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.v, self.signs))

    def to_bytes(self) -> torch.Tensor:
        if self.raw is not None:
            return self.raw
        return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in (self.u, self.v, self.signs)])

    @classmethod
    def from_bytes(cls, raw: torch.Tensor, out_features: int, in_features: int, rank: int) -> "Block":
        n, k, r = out_features, in_features, rank
        if raw.dtype != torch.uint8 or raw.numel() != block_nbytes(n, k, r):
            raise CheckpointError(f"a bitstack block of a {n}x{k} rank-{r} linear must be {block_nbytes(n, k, r)} "
                                  f"bytes of uint8, got {raw.numel()} of {raw.dtype}")
        nu, nv = 2 * n * r, 2 * k * r
        return cls(raw[:nu].view(STORE_DTYPE).view(n, r), raw[nu:nu + nv].view(STORE_DTYPE).view(k, r),
                   raw[nu + nv:].view(n, sign_row_bytes(k)), raw)


def block_nbytes(out_features: int, in_features: int, rank: int) -> int:
    """Stored (= resident) bytes of one block: the factors in bf16 and the packed signs."""
    return 2 * (out_features + in_features) * rank + out_features * sign_row_bytes(in_features)


def reconstruct_into(out: torch.Tensor, blocks: Sequence[Block], tmp: torch.Tensor, signs: torch.Tensor,
                     index: torch.Tensor, row0: int = 0) -> torch.Tensor:
    """out [n, K] <- rows row0..row0+n of Σ_i sign_i ⊙ (u_i v_iᵀ), in out.dtype, allocating nothing.

    `tmp` [n, K] holds one low-rank product, `signs` [n * row_bytes, 8] one block's unpacked signs
    and `index` [n * row_bytes] int32 its bytes (index_select wants integer indices).
    """
    n, k = out.shape
    if not blocks:
        return out.zero_()
    lut = _sign_lut(out.dtype)
    s = signs.view(n, -1)[:, :k]
    for i, b in enumerate(blocks):
        torch.mm(b.u[row0:row0 + n].to(out.dtype), b.v.to(out.dtype).t(), out=tmp)
        index.copy_(b.signs[row0:row0 + n].view(-1))
        torch.index_select(lut, 0, index, out=signs)
        if i == 0:
            torch.mul(tmp, s, out=out)
        else:
            out.addcmul_(tmp, s)
    return out


def reconstruct(blocks: Sequence[Block], out_features: int, in_features: int,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight the blocks represent (allocates; for tests and offline checks)."""
    rb = sign_row_bytes(in_features)
    return reconstruct_into(
        torch.empty(out_features, in_features, dtype=dtype), blocks,
        torch.empty(out_features, in_features, dtype=dtype), torch.empty(out_features * rb, 8, dtype=dtype),
        torch.empty(out_features * rb, dtype=torch.int32),
    )


# --- the shared scratch ---------------------------------------------------------------------------

class _ScratchPool:
    """Grow-only buffers every BitStack layer reconstructs into, one set per dtype.

    Global rather than per thread: engines forward from worker threads while models load in
    another, and per-thread buffers would leave one copy behind per thread. The lock serialises
    the reconstruct + matmul of BitStack layers (the CPU is saturated by either anyway) and guards
    block changes against a forward running in another thread.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat view of `numel` elements of the named buffer (call with the lock held)."""
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            self._bufs.pop((name, dtype), None)
            with torch.inference_mode(False):  # usable both inside and outside inference_mode
                buf = self._bufs[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        with self.lock:
            self._bufs.clear()


_POOL = _ScratchPool()


def scratch_bytes() -> int:
    """Bytes of the reconstruction scratch allocated so far (by forwards of any BitStack model)."""
    return _POOL.nbytes()


def release_scratch() -> None:
    """Free the scratch (the next forward allocates it again), e.g. after dropping a model."""
    _POOL.clear()


def chunk_rows(out_features: int, in_features: int) -> int:
    """Rows reconstructed at a time: about CHUNK_ELEMS weights, so the scratch stays the same size
    whatever the model (and one chunk's weights stay in cache for the matmul that reads them)."""
    return max(1, min(out_features, CHUNK_ELEMS // in_features))


def planned_scratch_bytes(shapes: Iterable[tuple[int, int]], dtype: torch.dtype) -> int:
    """Scratch bytes BitStackLinear.forward allocates for linears of these (out, in) shapes: per
    chunk the dense rows, one low-rank product, the unpacked signs (dtype) and their int32 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    dense = sign = 0
    for n, k in shapes:
        c = chunk_rows(n, k)
        dense, sign = max(dense, c * k), max(sign, c * sign_row_bytes(k))
    return size * (2 * dense + 8 * sign) + 4 * sign


# --- runtime --------------------------------------------------------------------------------------

# Blocks to keep per stack layer while a model loads (set by BitStackStack.load_model): None keeps
# every stored block.
_LOAD_BLOCKS: contextvars.ContextVar[Sequence[int] | None] = contextvars.ContextVar("bitstack_load_blocks",
                                                                                   default=None)


@contextlib.contextmanager
def load_blocks(per_layer: Sequence[int]) -> Iterator[None]:
    """Within this context, BitStack layers built by from_stored keep only per_layer[id] blocks."""
    token = _LOAD_BLOCKS.set(per_layer)
    try:
        yield
    finally:
        _LOAD_BLOCKS.reset(token)


class BitStackPart(nn.Module):
    """The blocks of one stack layer (one checkpoint linear), loaded in order: blocks 0..k-1, each
    held as one uint8 buffer `b<i>`."""

    def __init__(self, layer_id: int, out_features: int, in_features: int, rank: int, blocks: Sequence[Block]):
        super().__init__()
        self.layer_id, self.rank = layer_id, rank
        self.out_features, self.in_features = out_features, in_features
        self.k = 0
        self.extend(blocks)

    def blocks(self) -> list[Block]:
        return [Block.from_bytes(getattr(self, f"b{i}"), self.out_features, self.in_features, self.rank)
                for i in range(self.k)]

    def extend(self, blocks: Sequence[Block]) -> None:
        """Append blocks k, k+1, ... (under the scratch lock: never while a forward reads them)."""
        raws = [b.to_bytes() for b in blocks]
        for raw in raws:  # validates the size
            Block.from_bytes(raw, self.out_features, self.in_features, self.rank)
        with _POOL.lock:
            for raw in raws:
                self.register_buffer(f"b{self.k}", raw)
                self.k += 1

    def truncate(self, k: int) -> None:
        """Keep blocks 0..k-1; the dropped blocks' memory is freed when nothing else holds them."""
        with _POOL.lock:
            while self.k > k:
                self.k -= 1
                delattr(self, f"b{self.k}")

    def nbytes(self) -> int:
        return self.k * block_nbytes(self.out_features, self.in_features, self.rank)


def _stored_part(stored: dict[str, torch.Tensor], in_features: int, rank: int) -> BitStackPart:
    if "bitstack.meta" not in stored:
        raise CheckpointError("a qserve-bitstack linear lacks its bitstack.meta tensor")
    layer_id, out_features = (int(x) for x in stored["bitstack.meta"].reshape(-1)[:2])
    n = len([k for k in stored if k.startswith("bitstack.block.")])
    keep = _LOAD_BLOCKS.get()
    if keep is not None:
        n = min(n, keep[layer_id])
    try:
        blocks = [Block.from_bytes(stored[f"bitstack.block.{i:02d}"], out_features, in_features, rank)
                  for i in range(n)]
    except KeyError as e:
        raise CheckpointError(f"stack layer {layer_id} lacks tensor {e}; its blocks must be numbered 0..k-1") from None
    return BitStackPart(layer_id, out_features, in_features, rank, blocks)


@register_quant_method(METHOD)
class BitStackLinear(QuantLinear):
    """One (possibly fused) linear whose weight is the sum of its parts' loaded blocks."""

    def __init__(self, parts: Sequence[BitStackPart], bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)
        self.dtype = dtype
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    @classmethod
    def from_stored(cls, stored, in_features, out_features, qcfg: dict[str, Any], dtype):
        if qcfg.get("format") != FORMAT:
            raise ConfigError(f"bitstack checkpoint format {qcfg.get('format')!r}, this qserve reads {FORMAT!r}")
        if any(k.startswith("p0.") for k in stored):
            groups = []
            while any(k.startswith(f"p{len(groups)}.") for k in stored):
                pre = f"p{len(groups)}."
                groups.append({k[len(pre):]: v for k, v in stored.items() if k.startswith(pre)})
        else:
            groups = [stored]
        parts = [_stored_part(g, in_features, int(qcfg["rank"])) for g in groups]
        if sum(p.out_features for p in parts) != out_features:
            raise CheckpointError(f"bitstack blocks have {sum(p.out_features for p in parts)} rows, "
                                  f"the config implies {out_features}")
        biases = [g.get("bias") for g in groups]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b if b is not None else torch.zeros(p.out_features) for b, p in zip(biases, parts)])
        return cls(parts, bias, dtype)

    @classmethod
    def concat_stored(cls, parts, qcfg):
        """Fuse by prefixing each projection's tensors with p<j>.: every part keeps its own blocks
        (its own place in the stack); the layer concatenates the parts' outputs."""
        return {f"p{j}.{k}": v for j, p in enumerate(parts) for k, v in p.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt, k = self.dtype, self.in_features
        rb = sign_row_bytes(k)
        xx = x.to(dt)
        ys = []
        with _POOL.lock:
            for p in self.parts:
                blocks, rows = p.blocks(), chunk_rows(p.out_features, k)
                for r0 in range(0, p.out_features, rows):
                    n = min(rows, p.out_features - r0)
                    w = _POOL.take("w", n * k, dt).view(n, k)
                    reconstruct_into(w, blocks, _POOL.take("t", n * k, dt).view(n, k),
                                     _POOL.take("s", n * rb * 8, dt).view(-1, 8), _POOL.take("i", n * rb, torch.int32), r0)
                    ys.append(F.linear(xx, w))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, -1)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def weight_bytes(self) -> int:
        """Resident bytes of the loaded blocks and the bias (the shared scratch: scratch_bytes())."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return sum(p.nbytes() for p in self.parts) + bias

    def blocks_loaded(self) -> list[int]:
        return [p.k for p in self.parts]

    def set_blocks(self, k: int | Sequence[int], stack: Any = None) -> None:
        """Keep the first k blocks of every part (or k[j] of part j). Dropping needs nothing;
        adding blocks reads them from `stack` (a BitStackStack of this model's checkpoint)."""
        ks = [k] * len(self.parts) if isinstance(k, int) else list(k)
        if len(ks) != len(self.parts) or min(ks) < 0:
            raise ConfigError(f"set_blocks needs one count >= 0 per part ({len(self.parts)})")
        for p, n in zip(self.parts, ks):
            if n > p.k:
                if stack is None:
                    raise ConfigError("adding blocks needs the stack they are read from")
                p.extend(stack.read_blocks(p.layer_id, range(p.k, n)))
            else:
                p.truncate(n)


# --- offline decomposition -----------------------------------------------------------------------

def activation_scale(mean_abs: torch.Tensor) -> torch.Tensor:
    """Per-input-channel scale s from mean |x|: normalised to mean 1, floored at MIN_SCALE."""
    a = mean_abs.float()
    return (a / a.mean().clamp(min=1e-12)).clamp(min=MIN_SCALE)


def decompose_weight(w: torch.Tensor, scale: torch.Tensor, num_blocks: int, rank: int,
                     niter: int = SVD_NITER) -> tuple[list[Block], list[float]]:
    """BitStack blocks of one weight [out, in] under input-channel scale s [in].

    Returns the blocks and the scaled residual energies ||(W - Ŵ_i)·diag(s)||² after i = 0..K
    blocks (i = 0: the weight itself), the activation-weighted error the stack order ranks by.
    """
    n, k = w.shape
    s = scale.float()
    r = w.float().clone()
    q = min(rank + 8, n, k)
    errors = [float((r * s).square().sum())]
    blocks = []
    for _ in range(num_blocks):
        rs = r * s
        positive = rs >= 0
        u_, sv, v_ = torch.svd_lowrank(rs.abs(), q=q, niter=niter)
        m = min(rank, sv.numel())
        root = sv[:m].sqrt()
        u = torch.zeros(n, rank, dtype=STORE_DTYPE)
        v = torch.zeros(k, rank, dtype=STORE_DTYPE)
        u[:, :m] = (u_[:, :m] * root).to(STORE_DTYPE)
        v[:, :m] = (v_[:, :m] * root / s[:, None]).to(STORE_DTYPE)
        r -= torch.where(positive, 1.0, -1.0) * (u.float() @ v.float().t())
        blocks.append(Block(u, v, pack_signs(positive)))
        errors.append(float((r * s).square().sum()))
    return blocks, errors


# --- quantizer -------------------------------------------------------------------------------------

def _add_args(p: argparse.ArgumentParser) -> None:
    from qserve.calib import add_calib_args

    add_calib_args(p)
    g = p.add_argument_group("bitstack")
    g.add_argument("--blocks", type=int, default=DEFAULT_BLOCKS,
                   help=f"bitstack: residual blocks per linear, ~1 bit/weight each (default {DEFAULT_BLOCKS})")
    g.add_argument("--rank", type=int, default=DEFAULT_RANK,
                   help=f"bitstack: rank of each block's magnitude approximation (default {DEFAULT_RANK})")


def run(src: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import time

    from qserve.calib import FUSED_LINEARS, BlockStats, calibrate_blocks, prepare, unfuse_rows
    from qserve.model import DecoderLayer
    from qserve.quant_methods.bitstack_stack import StackLayer, write_stack

    num_blocks, rank = getattr(args, "blocks", DEFAULT_BLOCKS), getattr(args, "rank", DEFAULT_RANK)
    if num_blocks < 1 or rank < 1:
        raise ConfigError(f"--blocks and --rank must be at least 1, got {num_blocks} and {rank}")
    torch.manual_seed(args.seed)  # the randomized SVD draws from the global generator
    model, samples, info = prepare(src, args)
    layers: list[StackLayer] = []
    seconds = [0.0]  # decomposition time, apart from the calibration forwards

    def on_block(layer: DecoderLayer, stats: BlockStats) -> None:
        t0 = time.perf_counter()
        for attr in FUSED_LINEARS:
            a = stats.inputs[attr].mean_abs
            s = activation_scale(a)
            weight = getattr(layer, attr).weight.detach()
            group = f"model.layers.{layer.idx}.{attr}"
            for name, w in unfuse_rows(layer, attr, weight).items():
                blocks, err = decompose_weight(w, s, num_blocks, rank)
                # errors in units of the real activations: ||R diag(a)||² = ||R diag(s)||² mean(a)²
                unit = float(a.mean()) ** 2
                layers.append(StackLayer(f"model.layers.{layer.idx}.{name}", group, w.shape[0], w.shape[1],
                                         [e * unit for e in err], blocks))
        seconds[0] += time.perf_counter() - t0

    calibrate_blocks(model, samples, on_block, propagate="original", desc="bitstack")
    cfg = model.cfg
    del model
    qcfg = {"quant_method": METHOD, "format": FORMAT, "blocks": num_blocks, "rank": rank, "calibration": info}
    manifest = write_stack(src, out, cfg, layers, qcfg)
    return {"blocks": num_blocks, "rank": rank, **info, "decompose_seconds": round(seconds[0], 1),
            "stack_blocks": len(manifest["stack"]), "min_blocks": len(layers)}


register_quantizer(Quantizer("bitstack", _add_args, run,
                             "BitStack size-elastic weights: stacked ~1-bit residual blocks (calibrated)"))
