"""Find and read Hugging Face checkpoints: local directories or the local hub cache (offline).

Only safetensors are read. Every file's header is validated against the file's size and the
declared shapes before any tensor is loaded, so a truncated or corrupt download fails with a
clear message instead of a crash deep inside a kernel.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qserve.errors import CheckpointError

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
MAX_HEADER_BYTES = 100 * 1024 * 1024


def resolve_model_dir(source: str | os.PathLike[str], cache_dir: str | None = None) -> Path:
    """A local directory, or a hub repo id already present in the local cache (never downloads)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise CheckpointError(f"{path} is not a directory; pass the checkpoint's folder")
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            raise CheckpointError(
                f"model {text!r} is neither a local directory nor in the local Hugging Face cache "
                "(qserve never downloads at serve time; run `qserve pull` first)"
            ) from e
    raise CheckpointError(f"model directory {path} does not exist")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # of the tensor's first byte in the file


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate one file's header without touching tensor data."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path.name}: file is truncated ({size} bytes)")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"cannot read {path}: permission denied (model files must be readable by the "
                              "server's user)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path.name}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name}: safetensors header is not valid JSON") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: safetensors header is not an object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path.name}: malformed header entry for {name!r}") from e
        if dtype not in _DTYPE_BYTES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unknown dtype {dtype}")
        numel = 1
        for d in shape:
            numel *= int(d)
        if end - begin != numel * _DTYPE_BYTES[dtype] or begin < 0:
            raise CheckpointError(f"{path.name}: tensor {name!r} size does not match its shape")
        if end > data_size:
            raise CheckpointError(
                f"{path.name}: file is truncated (tensor {name!r} ends at byte {end}, "
                f"file holds {data_size} data bytes)"
            )
        out[name] = TensorInfo(dtype, shape, path, 8 + n + begin)
    return out


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, following a sharded index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index.name} is malformed: {e}") from e
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards listed in {index.name} are missing: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES]
    if pickles:
        raise CheckpointError(
            f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles))}); qserve loads "
            "safetensors only, since pickle files can run arbitrary code. Convert them first."
        )
    raise CheckpointError(f"{model_dir} has no *.safetensors weight files")


class Checkpoint:
    """Lazy, validated access to the tensors of a checkpoint directory."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.index: dict[str, TensorInfo] = {}
        for path in safetensors_files(self.dir):
            for name, info in read_safetensors_header(path).items():
                if name in self.index:
                    raise CheckpointError(f"tensor {name!r} appears in more than one shard")
                self.index[name] = info

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.index if n.startswith(prefix)]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def check_shape(self, name: str, shape: tuple[int, ...] | None) -> None:
        info = self._info(name)
        if shape is not None and tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {list(info.shape)}, the config implies {list(shape)}"
            )

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.index[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.dir.name} lacks tensor {name!r}") from None

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        info = self._info(name)
        self.check_shape(name, shape)
        with safe_open(info.file, framework="pt") as f:
            return f.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of a tensor, reading only those bytes."""
        with safe_open(self._info(name).file, framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def map(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor as a view of its file (a private copy-on-write mapping), not a copy in memory:
        pages are read when first touched and stay reclaimable page cache. Why: the embedding
        table is only read a row per token. (`get` returns such views too, as safetensors happens
        to; this one is ours to rely on, writable without touching the file, and advised for
        random access.) Falls back to `get` for data torch cannot view in place (not a float
        type, or not aligned to its element size)."""
        if not self.mappable(name):
            return self.get(name, shape)
        info = self._info(name)
        self.check_shape(name, shape)
        with open(info.file, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if hasattr(mapped, "madvise"):  # rows are read at random: fault in their pages, not 64 KiB around each
            mapped.madvise(mmap.MADV_RANDOM)
        count = math.prod(info.shape)
        return torch.frombuffer(mapped, dtype=_TORCH_DTYPES[info.dtype], count=count, offset=info.offset
                                ).view(info.shape)

    def mappable(self, name: str) -> bool:
        """`map` views the file in place (else it falls back to a copy in memory)."""
        info = self._info(name)
        return info.dtype in _TORCH_DTYPES and info.offset % _DTYPE_BYTES[info.dtype] == 0

    def get_many(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, keyed by the rest of its name."""
        return {n[len(prefix):]: self.get(n) for n in self.names(prefix)}

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in {i.file for i in self.index.values()})


def save_checkpoint(
    out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, source_dir: Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> None:
    """Write tensors (sharded with an index when large), config.json, and copy tokenizer files."""
    import shutil

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    def write(shard: dict[str, torch.Tensor], path: Path) -> None:
        # Written beside, then renamed over: a running server maps the old file (Checkpoint.map),
        # and truncating a mapped file kills its reader; an interrupted write leaves no torn file.
        tmp = path.with_name(path.name + ".partial")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates 0600; a container's non-root user must read it
        os.replace(tmp, path)

    if len(shards) == 1:
        write(shards[0], out_dir / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write(shard, out_dir / fname)
            weight_map.update({k: fname for k in shard})
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
        )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if source_dir is not None:
        for name in TOKENIZER_FILES + ("generation_config.json",):
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, out_dir / name)


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "chat_template.json", "vocab.json", "merges.txt",
)
