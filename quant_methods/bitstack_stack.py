"""The BitStack stack on disk, and resizing a live model along it.

Checkpoint layout (a normal qserve checkpoint directory, so qserve.model.load_model reads it):
- `model.safetensors`, written here rather than by safetensors' writer because that one sorts
  tensors by dtype and name, and the point of the file is its order: first the non-stack tensors
  (embedding, norms, head, biases, and each stack layer's int32 `<linear>.bitstack.meta`: its
  layer id and out_features), then the blocks in stack order, each one uint8 tensor
  `<linear>.bitstack.block.<i>` (see Block.to_bytes).
  The first N blocks of the stack are therefore one contiguous byte range, and growing from N to
  M blocks is one sequential read of the bytes of blocks N..M-1. It is a valid safetensors file
  (safe_open and qserve.checkpoint read it).
- `bitstack_manifest.json`: `layers` (per stack layer: name, fusion group, shape, and the
  activation-weighted residual energy after 0..K blocks) and `stack` (per block, in stack order:
  layer, index within its layer, absolute file offset, bytes). A block's rank is its position.

Stack order. A stack layer's blocks keep their order. Block 0 of every layer comes first (a layer
without blocks is a zero matrix, not a smaller model), so the smallest model has one block per
linear. The rest are merged greedily by gain per byte: a block's gain is the drop in its layer's
activation-weighted residual energy ||(W - Ŵ)·diag(mean|x|)||², relative to the layer's own energy
||W·diag(mean|x|)||² ("relative": every linear's relative output error counts the same). The merge
is a k-way merge on each layer's next block, so the within-layer order always holds.
"""

from __future__ import annotations

import heapq
import json
import shutil
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qserve.checkpoint import TOKENIZER_FILES, Checkpoint
from qserve.config import ModelConfig, load_config
from qserve.errors import BudgetError, CheckpointError, ConfigError
from qserve.quant_methods.bitstack import (
    FORMAT, METHOD, STORE_DTYPE, Block, BitStackPart, block_nbytes, load_blocks, planned_scratch_bytes,
)
from qserve.sysmem import format_bytes

MANIFEST = "bitstack_manifest.json"
STACK_FILE = "model.safetensors"
ORDERS = ("relative", "output")

_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8",
              torch.int32: "I32", torch.int64: "I64"}


@dataclass
class StackLayer:
    """One linear's decomposition, as the quantizer hands it over."""

    name: str  # checkpoint prefix without the trailing dot, e.g. model.layers.0.self_attn.q_proj
    group: str  # the fused runtime linear it belongs to, e.g. model.layers.0.qkv
    out_features: int
    in_features: int
    errors: list[float]  # activation-weighted residual energy after 0..K blocks
    blocks: list[Block]


def stack_order(errors: Sequence[Sequence[float]], block_bytes: Sequence[int], order: str = "relative") -> list[tuple[int, int]]:
    """(layer, block index) in stack order: every layer's block 0, then a merge by gain per byte."""
    if order not in ORDERS:
        raise ConfigError(f"unknown stack order {order!r}; one of {ORDERS}")

    def gain(layer: int, i: int) -> float:
        e = errors[layer]
        norm = e[0] if order == "relative" and e[0] > 0 else 1.0
        return (e[i] - e[i + 1]) / norm / block_bytes[layer]

    nblocks = [len(e) - 1 for e in errors]
    first = sorted((l for l in range(len(errors)) if nblocks[l] > 0), key=lambda l: -gain(l, 0))
    out = [(l, 0) for l in first]
    heap = [(-gain(l, 1), l, 1) for l in first if nblocks[l] > 1]
    heapq.heapify(heap)
    while heap:
        _, l, i = heapq.heappop(heap)
        out.append((l, i))
        if i + 1 < nblocks[l]:
            heapq.heappush(heap, (-gain(l, i + 1), l, i + 1))
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes | memoryview:
    return t.contiguous().view(torch.uint8).reshape(-1).numpy().data


def write_safetensors_ordered(path: Path, entries: Sequence[tuple[str, torch.Tensor]],
                              metadata: dict[str, str]) -> tuple[int, dict[str, tuple[int, int]]]:
    """A safetensors file with the tensors in exactly this order. Returns the data section's file
    offset and each tensor's absolute (begin, end) file offsets."""
    header: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name, t in entries:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in entries:
            f.write(_tensor_bytes(t))
    return start, {k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
                   for k, v in header.items() if k != "__metadata__"}


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def block_name(layer: str, i: int) -> str:
    return f"{layer}.bitstack.block.{i:02d}"


def write_stack(src: Path, out: Path, cfg: ModelConfig, layers: Sequence[StackLayer], qcfg: dict[str, Any],
                order: str = "relative") -> dict[str, Any]:
    """Write the checkpoint directory: stack file, manifest, config.json, tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    linear_weights = {f"{l.name}.weight" for l in layers}
    ckpt = Checkpoint(src)
    base = {n: ckpt.get(n) for n in ckpt.names() if n not in linear_weights}
    base = {n: t.to(STORE_DTYPE) if t.is_floating_point() else t for n, t in base.items()}
    base |= {f"{l.name}.bitstack.meta": torch.tensor([i, l.out_features], dtype=torch.int32)
             for i, l in enumerate(layers)}
    entries = sorted(base.items(), key=lambda kv: -kv[1].element_size())  # keeps every tensor aligned
    rank = qcfg["rank"]
    sizes = [block_nbytes(l.out_features, l.in_features, rank) for l in layers]
    stack = stack_order([l.errors for l in layers], sizes, order)
    for li, i in stack:
        entries.append((block_name(layers[li].name, i), layers[li].blocks[i].to_bytes()))
    start, offsets = write_safetensors_ordered(out / STACK_FILE, entries, {"format": "pt", "qserve": FORMAT})
    manifest = {
        "format": FORMAT, "file": STACK_FILE, "rank": rank, "blocks_per_layer": qcfg["blocks"], "order": order,
        "layers": [{"name": l.name, "group": l.group, "out": l.out_features, "in": l.in_features,
                    "errors": l.errors} for l in layers],
        "stack": [{"layer": li, "index": i, "offset": offsets[block_name(layers[li].name, i)][0],
                   "bytes": sizes[li]} for li, i in stack],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=0))
    raw = dict(cfg.raw)
    raw["quantization_config"] = qcfg
    raw["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, out / name)
    return manifest


@dataclass
class ResizeReport:
    """What one BitStackStack.apply did."""

    blocks_before: int | None  # None when the model was not at a prefix of the stack
    blocks: int
    added: int
    dropped: int
    bytes_read: int
    seconds: float


class BitStackStack:
    """A BitStack checkpoint's stack: sizes, budgets, and in-place resizing of a loaded model.

    Not thread-safe against itself; callers serialise resizes (the engine does them between
    steps, under its lock). Block changes on a layer take the BitStack scratch lock, so a forward
    running in another thread sees each layer either before or after its change.
    """

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.cfg = load_config(self.dir)
        if (self.cfg.quant_method or "") != METHOD:
            raise ConfigError(f"{self.dir} is not a BitStack checkpoint (quant_method {self.cfg.quant_method!r})")
        try:
            m = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.dir}: cannot read {MANIFEST}: {e}") from e
        if m.get("format") != FORMAT:
            raise CheckpointError(f"{MANIFEST} has format {m.get('format')!r}, this qserve reads {FORMAT!r}")
        self.rank: int = m["rank"]
        self.layers: list[dict[str, Any]] = m["layers"]
        self.stack: list[tuple[int, int, int, int]] = [(b["layer"], b["index"], b["offset"], b["bytes"])
                                                       for b in m["stack"]]
        self.file = self.dir / m["file"]
        self._start, self._header = _read_header(self.file)
        self._check()
        self._rank_of = {(l, i): r for r, (l, i, _, _) in enumerate(self.stack)}
        if len(self._rank_of) != len(self.stack):
            raise CheckpointError(f"{MANIFEST} lists a block twice")
        self._cum = [0]
        for *_, nb in self.stack:
            self._cum.append(self._cum[-1] + nb)

    def _check(self) -> None:
        """Manifest and file agree: each block's tensor sits at its offset and has its bytes."""
        for li, i, off, nb in self.stack:
            layer = self.layers[li]
            name = block_name(layer["name"], i)
            if name not in self._header:
                raise CheckpointError(f"{self.file.name} lacks stack tensor {name}")
            begin, end = self._header[name]["data_offsets"]
            if begin + self._start != off or end - begin != nb or nb != block_nbytes(layer["out"], layer["in"], self.rank):
                raise CheckpointError(f"{MANIFEST} disagrees with {self.file.name} about {name}")

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def total_blocks(self) -> int:
        return len(self.stack)

    @property
    def min_blocks(self) -> int:
        """Every linear needs its first block."""
        return len(self.layers)

    def blocks_per_layer(self, n: int) -> list[int]:
        """Blocks each stack layer holds when the model holds the first n blocks of the stack."""
        self._check_n(n)
        counts = [0] * len(self.layers)
        for li, *_ in self.stack[:n]:
            counts[li] += 1
        return counts

    def stack_bytes(self, n: int) -> int:
        return self._cum[n]

    def base_bytes(self, dtype: torch.dtype = torch.bfloat16, int8_head: bool = False) -> int:
        """Resident bytes of everything but the blocks (embedding, norms, head, biases) in `dtype`,
        with the output head as the engine builds it (int8_head: qserve serve --head)."""
        from qserve.planner import resident_weight_bytes

        return resident_weight_bytes(self.dir, dtype, int8_head)

    def scratch_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return planned_scratch_bytes([(layer["out"], layer["in"]) for layer in self.layers], dtype)

    def resident_bytes(self, n: int, dtype: torch.dtype = torch.bfloat16, int8_head: bool = False) -> int:
        """Weight bytes a model holding the first n blocks keeps resident: blocks, the rest of the
        weights, and the reconstruction scratch."""
        self._check_n(n)
        return self.base_bytes(dtype, int8_head) + self.stack_bytes(n) + self.scratch_bytes(dtype)

    def blocks_for_budget(self, weight_bytes_budget: int, dtype: torch.dtype = torch.bfloat16,
                          int8_head: bool = False) -> int:
        """The most blocks whose resident bytes fit the budget (BudgetError when even the smallest
        model, one block per linear, does not)."""
        fixed = self.base_bytes(dtype, int8_head) + self.scratch_bytes(dtype)
        smallest = fixed + self._cum[self.min_blocks]
        if weight_bytes_budget < smallest:
            raise BudgetError(f"the smallest BitStack model of {self.dir.name} ({self.min_blocks} blocks) needs "
                              f"{format_bytes(smallest)} of weights; the budget leaves {format_bytes(weight_bytes_budget)}")
        lo, hi = self.min_blocks, self.total_blocks
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fixed + self._cum[mid] <= weight_bytes_budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _check_n(self, n: int) -> None:
        if not self.min_blocks <= n <= self.total_blocks:
            raise ConfigError(f"a BitStack model of {self.dir.name} holds {self.min_blocks}..{self.total_blocks} "
                              f"blocks, not {n}")

    # --- live model -----------------------------------------------------------------------------

    def load_model(self, n: int | None = None, dtype: torch.dtype = torch.bfloat16, max_len: int = 2048,
                   int8_head: bool = False):
        """The model holding the first n blocks (all when None), loaded through qserve.model.
        While it loads, each linear reads all its stored blocks and keeps the first k_i."""
        from qserve.model import load_model

        with load_blocks(self.blocks_per_layer(self.total_blocks if n is None else n)):
            return load_model(self.dir, dtype, max_len, int8_head=int8_head)

    def parts(self, model: torch.nn.Module) -> list[BitStackPart]:
        """The model's stack layers, indexed by layer id (checks the model is this checkpoint's)."""
        found = {p.layer_id: p for p in model.modules() if isinstance(p, BitStackPart)}
        if sorted(found) != list(range(len(self.layers))) or any(
                (found[i].out_features, found[i].in_features) != (l["out"], l["in"]) for i, l in enumerate(self.layers)):
            raise ConfigError(f"the model's BitStack layers do not match the stack of {self.dir.name}")
        return [found[i] for i in range(len(self.layers))]

    def current_blocks(self, model: torch.nn.Module) -> int | None:
        """N when the model holds exactly the first N blocks of the stack, else None."""
        counts = [p.k for p in self.parts(model)]
        n = sum(counts)
        return n if self.min_blocks <= n <= self.total_blocks and self.blocks_per_layer(n) == counts else None

    def resident_model_bytes(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
        """What a loaded model keeps resident: its weights (blocks included) plus the planned scratch."""
        return model.weight_bytes() + self.scratch_bytes(dtype)

    def apply(self, model: torch.nn.Module, n: int) -> ResizeReport:
        """Resize a loaded model in place to the first n blocks: drop blocks past each layer's new
        count, then read the missing ones with one sequential pass over the file (a single
        contiguous range when the model held a prefix of the stack)."""
        t0 = time.perf_counter()
        target = self.blocks_per_layer(n)
        parts = self.parts(model)
        before = self.current_blocks(model)
        dropped = 0
        for p, k in zip(parts, target):
            if p.k > k:
                dropped += p.k - k
                p.truncate(k)
        need = sorted(self._rank_of[(li, i)] for li, p in enumerate(parts) for i in range(p.k, target[li]))
        read = 0
        with open(self.file, "rb") as f:
            for r in need:
                li, i, off, nb = self.stack[r]
                if f.tell() != off:
                    f.seek(off)
                if parts[li].k != i:
                    raise ConfigError(f"stack layer {li}: block {i} is next in the file, the layer holds {parts[li].k}")
                parts[li].extend([self._read_block(f, li)])
                read += nb
        return ResizeReport(before, n, len(need), dropped, read, time.perf_counter() - t0)

    def read_blocks(self, layer_id: int, indices: Iterable[int]) -> list[Block]:
        """Blocks `indices` of one stack layer, read from the file."""
        out = []
        with open(self.file, "rb") as f:
            for i in indices:
                try:
                    _, _, off, _ = self.stack[self._rank_of[(layer_id, i)]]
                except KeyError:
                    raise ConfigError(f"stack layer {layer_id} has no block {i}") from None
                f.seek(off)
                out.append(self._read_block(f, layer_id))
        return out

    def _read_block(self, f, layer_id: int) -> Block:
        """One block from the file position into one fresh buffer."""
        layer = self.layers[layer_id]
        raw = torch.empty(block_nbytes(layer["out"], layer["in"], self.rank), dtype=torch.uint8)
        if f.readinto(raw.numpy()) != raw.numel():
            raise CheckpointError(f"{self.file.name} is truncated inside the stack")
        return Block.from_bytes(raw, layer["out"], layer["in"], self.rank)
