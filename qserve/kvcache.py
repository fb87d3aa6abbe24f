"""The engine's KV cache: one preallocated tensor per K and V, indexed [layer, slot, head, pos, dim].

Each running sequence owns a slot; nothing is allocated per token. This class is the seam for
other KV formats (int8/int4, CSKV's compressed features): a format implements `write` (quantize
on write) and `read` (hand attention dense K/V for the live positions) and `bytes_per_token`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Where the rows of one forward pass live in the cache.

    Every row has the same number of new tokens T (a prefill chunk of one sequence, or one
    token per sequence in batched decode). `starts[b]` is the position of row b's first new token.
    """

    slots: torch.Tensor  # [B] long
    starts: torch.Tensor  # [B] long
    num_new: int
    kv_len: int  # max(starts) + num_new: the key length attention must see
    contiguous_slots: bool = False  # slots == arange(slots[0], slots[0]+B): cache reads are views
    mask: torch.Tensor | None = None  # [B, 1, T, kv_len] bool, None when plain causal suffices
    slot_list: tuple[int, ...] = ()
    start_list: tuple[int, ...] = ()

    @classmethod
    def make(cls, slots: list[int], starts: list[int], num_new: int, bucket: int = 1,
             max_len: int | None = None) -> "Batch":
        """`bucket` rounds the key length up (masked), so attention sees few distinct shapes:
        oneDNN builds and caches a kernel per matmul shape, and a decode loop whose key length
        grows by one each step would build one per step (slow, and ~1 MB of RSS each)."""
        s = torch.tensor(slots, dtype=torch.long)
        p = torch.tensor(starts, dtype=torch.long)
        needed = max(starts) + num_new
        kv_len = -(-needed // bucket) * bucket
        if max_len is not None:
            kv_len = min(kv_len, max_len)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        if len(slots) == 1 and kv_len == needed and (starts[0] == 0 or num_new == 1):
            mask = None  # causal over a fresh chunk, or one query seeing every cached key
        else:
            q_pos = p[:, None] + torch.arange(num_new)[None, :]  # [B, T]
            mask = (torch.arange(kv_len)[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)
        return cls(s, p, num_new, kv_len, contiguous, mask, tuple(slots), tuple(starts))

    def positions(self) -> torch.Tensor:
        return self.starts[:, None] + torch.arange(self.num_new)[None, :]


class KVCache:
    """Dense KV cache in the engine's compute dtype."""

    kv_format = "model"

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        shape = (num_layers, num_slots, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.num_slots = num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [B, Hkv, T, D] for the batch's new positions."""
        if batch.num_new == 1 and k.shape[0] == 1:
            s, p = batch.slot_list[0], batch.start_list[0]
            self.k[layer, s, :, p] = k[0, :, 0]
            self.v[layer, s, :, p] = v[0, :, 0]
            return
        if batch.num_new == 1:
            self.k[layer, batch.slots, :, batch.starts] = k[:, :, 0]
            self.v[layer, batch.slots, :, batch.starts] = v[:, :, 0]
            return
        for b, (s, p) in enumerate(zip(batch.slot_list, batch.start_list)):
            self.k[layer, s, :, p:p + batch.num_new] = k[b]
            self.v[layer, s, :, p:p + batch.num_new] = v[b]

    def read(self, layer: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense [B, Hkv, kv_len, D] keys and values for the batch's sequences."""
        n = batch.kv_len
        if batch.contiguous_slots:
            s0 = batch.slot_list[0]
            sl = slice(s0, s0 + len(batch.slot_list))
            return self.k[layer, sl, :, :n], self.v[layer, sl, :, :n]
        return self.k[layer, batch.slots, :, :n], self.v[layer, batch.slots, :, :n]


_FORMATS: dict[str, type[KVCache]] = {"model": KVCache}
# Modules that register more formats when imported (int8/int4, CSKV); loaded on first miss.
FORMAT_MODULES = ("qserve.kvformats", "qserve.quant_methods.cskv")


def register_kv_format(name: str):
    """Register a KVCache subclass (same constructor, write/read/bytes_per_token contract)."""

    def deco(cls: type[KVCache]) -> type[KVCache]:
        cls.kv_format = name
        _FORMATS[name] = cls
        return cls

    return deco


def get_kv_format(name: str) -> type[KVCache]:
    from qserve.errors import ConfigError

    if name not in _FORMATS:
        import importlib

        for mod in FORMAT_MODULES:
            importlib.import_module(mod)
    if name not in _FORMATS:
        raise ConfigError(f"unknown KV cache format {name!r}; known: {sorted(_FORMATS)}")
    return _FORMATS[name]
