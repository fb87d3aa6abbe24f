"""Quantized KV cache formats ("int8", "int4") and the byte counts the planner budgets with.

Both formats quantize each cached vector on write, per KV head, in groups along head_dim,
asymmetrically: a group stores `bits`-bit codes plus an fp16 scale and an fp16 minimum
(x ≈ code·scale + min, the KIVI-style float minimum: unlike an integer zero point it never forces
0 into a group's range, which matters for post-RoPE keys that rarely straddle 0). int4 codes are
packed two per byte (even column in the low nibble). `read` dequantizes the live positions of the
batch's rows into the compute dtype, so attention is unchanged. groupquant's layout (int32 words
of 8 nibbles along in_features, integer zero points) is the weights' on-disk format; here tokens
arrive one at a time and a byte-per-2-codes layout writes them without read-modify-write.

`TokenStore` is the storage shared with CSKV's compressed features (qserve.quant_methods.cskv).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from qserve.errors import ConfigError
from qserve.kvcache import Batch, KVCache, get_kv_format, register_kv_format

if TYPE_CHECKING:
    from qserve.checkpoint import Checkpoint
    from qserve.config import ModelConfig

META_BYTES = 4  # fp16 scale + fp16 minimum per group
FLOAT_BITS = 16  # "bits" meaning: store in the compute dtype, unquantized


def quantize_groups(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., W] -> codes uint8 [..., W] in 0..2^bits-1 and meta fp16 [..., G, 2] (scale, min).

    The last group may be ragged. Codes are computed with the fp16-rounded scale and minimum, so
    dequantization reproduces exactly what was rounded."""
    w = x.shape[-1]
    ng = math.ceil(w / group)
    xf = x.float()
    if ng * group != w:  # replicate the last column: padding never widens a group's range
        xf = torch.cat([xf, xf[..., -1:].expand(*xf.shape[:-1], ng * group - w)], -1)
    xg = xf.unflatten(-1, (ng, group))
    qmax = 2**bits - 1
    mn = xg.amin(-1).half()
    scale = ((xg.amax(-1) - mn.float()) / qmax).half()
    div = scale.float().clamp(min=1e-8)
    q = torch.round((xg - mn.float()[..., None]) / div[..., None]).clamp_(0, qmax)
    codes = q.flatten(-2)[..., :w].to(torch.uint8)
    return codes, torch.stack([scale, mn], -1)


def dequantize_groups(codes: torch.Tensor, meta: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_groups, returned in `dtype` (the arithmetic runs in fp32)."""
    w = codes.shape[-1]
    s = meta[..., 0].float().repeat_interleave(group, -1)[..., :w]
    m = meta[..., 1].float().repeat_interleave(group, -1)[..., :w]
    return (codes.float() * s + m).to(dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., W] codes in 0..15 (W even) -> [..., W/2] uint8, even columns in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)


def code_bytes(width: int, bits: int) -> int:
    return math.ceil(width * bits / 8)


def group_count(width: int, group: int) -> int:
    return math.ceil(width / group)


def token_bytes(width: int, bits: int, group: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one stored vector of `width` values takes (codes + per-group scale and minimum)."""
    if bits == FLOAT_BITS:
        return width * torch.empty((), dtype=dtype).element_size()
    return code_bytes(width, bits) + group_count(width, group) * META_BYTES


class TokenStore:
    """Per-slot, per-position storage of vectors [num_slots, *mid, max_len, width], quantized
    (bits 8 or 4, groups of `group` along width) or kept in `dtype` (bits 16)."""

    def __init__(self, num_slots: int, mid: tuple[int, ...], max_len: int, width: int, bits: int,
                 group: int, dtype: torch.dtype):
        if bits not in (4, 8, FLOAT_BITS):
            raise ConfigError(f"stored KV bits must be 4, 8 or 16, got {bits}")
        if bits == 4 and width % 2:
            raise ConfigError(f"int4 storage packs two codes per byte; width {width} is odd")
        self.bits, self.group, self.width, self.dtype = bits, group, width, dtype
        self.mid = len(mid)
        lead = (num_slots, *mid, max_len)
        if bits == FLOAT_BITS:
            self.data = torch.zeros(*lead, width, dtype=dtype)
            self.meta = None
        else:
            self.data = torch.zeros(*lead, code_bytes(width, bits), dtype=torch.uint8)
            self.meta = torch.zeros(*lead, group_count(width, group), 2, dtype=torch.float16)

    def nbytes(self) -> int:
        meta = 0 if self.meta is None else self.meta.numel() * self.meta.element_size()
        return self.data.numel() * self.data.element_size() + meta

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.meta is None:
            return x.to(self.dtype), None
        codes, meta = quantize_groups(x, self.bits, self.group)
        return (pack_nibbles(codes) if self.bits == 4 else codes), meta

    def _decode(self, data: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        if meta is None:
            return data
        codes = unpack_nibbles(data) if self.bits == 4 else data
        return dequantize_groups(codes, meta, self.group, self.dtype)

    def write(self, batch: Batch, x: torch.Tensor) -> None:
        """x [B, *mid, T, width]: the batch's new positions."""
        data, meta = self._encode(x)
        mid = (slice(None),) * self.mid
        targets = [(self.data, data)] + ([] if meta is None else [(self.meta, meta)])
        if batch.num_new == 1:
            for store, val in targets:
                store[(batch.slots, *mid, batch.starts)] = val[(slice(None), *mid, 0)]
            return
        for b, (s, p) in enumerate(zip(batch.slot_list, batch.start_list)):
            for store, val in targets:
                store[(s, *mid, slice(p, p + batch.num_new))] = val[b]

    def read(self, batch: Batch, n: int) -> torch.Tensor:
        """[B, *mid, n, width] in the compute dtype: positions 0..n-1 of the batch's slots."""
        mid = (slice(None),) * self.mid
        if batch.contiguous_slots:
            s0 = batch.slot_list[0]
            idx: tuple[Any, ...] = (slice(s0, s0 + len(batch.slot_list)), *mid, slice(0, n))
        else:
            idx = (batch.slots, *mid, slice(0, n))
        return self._decode(self.data[idx], None if self.meta is None else self.meta[idx])


class QuantKVCache(KVCache):
    """K and V of every layer in TokenStores of `BITS`-bit codes, groups of GROUP along head_dim."""

    BITS = 8
    GROUP = 64

    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        self.max_len, self.num_slots = max_len, num_slots
        g = self.group_for(head_dim)
        self.stores = [[TokenStore(num_slots, (kv_heads,), max_len, head_dim, self.BITS, g, dtype)
                        for _ in range(2)] for _ in range(num_layers)]

    @classmethod
    def group_for(cls, head_dim: int) -> int:
        """GROUP, or the whole head when GROUP does not divide head_dim."""
        return cls.GROUP if head_dim % cls.GROUP == 0 else head_dim

    @classmethod
    def bytes_per_token(cls, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * token_bytes(head_dim, cls.BITS, cls.group_for(head_dim), dtype)

    def nbytes(self) -> int:
        return sum(s.nbytes() for layer in self.stores for s in layer)

    def write(self, layer: int, batch: Batch, k: torch.Tensor, v: torch.Tensor) -> None:
        ks, vs = self.stores[layer]
        ks.write(batch, k)
        vs.write(batch, v)

    def read(self, layer: int, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ks, vs = self.stores[layer]
        return ks.read(batch, batch.kv_len), vs.read(batch, batch.kv_len)


@register_kv_format("int8")
class Int8KVCache(QuantKVCache):
    """int8 codes, one group per head (64 wide on SmolLM2): 68 bytes per head-vector vs 128 bf16."""

    BITS, GROUP = 8, 64


@register_kv_format("int4")
class Int4KVCache(QuantKVCache):
    """int4 codes packed 2/byte, groups of 32: 40 bytes per 64-wide head-vector vs 128 bf16."""

    BITS, GROUP = 4, 32


# --- the planner's view -----------------------------------------------------------------------

def kv_compression(cfg: "ModelConfig") -> dict[str, Any] | None:
    """The checkpoint's `kv_compression` config.json entry (CSKV), or None."""
    return cfg.raw.get("kv_compression")


def kv_bytes_per_token(cfg: "ModelConfig", kv_format: str, cskv_ratio: float | None = None,
                       feature_bits: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """KV bytes one token adds to one sequence, over all layers, for a KV format.

    kv_format: "model" (the compute `dtype`), "int8", "int4", or "cskv". For "cskv" the ranks,
    feature bits and window come from a CSKV checkpoint's config; for a plain config pass
    `cskv_ratio` (and `feature_bits`, default 16) to count a checkpoint not made yet. CSKV's
    full-precision window is a per-sequence constant: see `kv_window_bytes`.
    """
    if kv_format != "cskv":
        return get_kv_format(kv_format).bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    from qserve.quant_methods.cskv import cskv_layout

    lay = cskv_layout(cfg, cskv_ratio, feature_bits)
    return sum(token_bytes(r, lay.feature_bits, lay.group, dtype) for r in lay.ranks) * cfg.num_layers


def kv_window_bytes(cfg: "ModelConfig", kv_format: str, window: int | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes per sequence that do not grow with its length: CSKV's full-precision recent window
    (K and V of `window` tokens in every layer); 0 for the other formats."""
    if kv_format != "cskv":
        return 0
    from qserve.quant_methods.cskv import cskv_layout

    lay = cskv_layout(cfg, None, None, window, allow_plain=True)
    return 2 * cfg.num_layers * lay.window * cfg.kv_dim * torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(cfg: "ModelConfig", kv_format: str, max_len: int, num_seqs: int,
                   cskv_ratio: float | None = None, feature_bits: int | None = None,
                   window: int | None = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """What a cache for `num_seqs` sequences of up to `max_len` tokens allocates (== nbytes())."""
    per_seq = max_len * kv_bytes_per_token(cfg, kv_format, cskv_ratio, feature_bits, dtype)
    return num_seqs * (per_seq + kv_window_bytes(cfg, kv_format, window, dtype))


# --- the model's hooks ------------------------------------------------------------------------

def kv_layer_module(cfg: "ModelConfig", ckpt: "Checkpoint", idx: int, dtype: torch.dtype) -> torch.nn.Module | None:
    """The module that projects, caches and rebuilds a layer's K/V itself when the checkpoint
    compresses its KV cache (CSKV); None for ordinary checkpoints."""
    kc = kv_compression(cfg)
    if kc is None:
        return None
    if kc.get("method") != "cskv":
        raise ConfigError(f"unknown kv_compression method {kc.get('method')!r} in config.json; qserve knows 'cskv'")
    from qserve.quant_methods.cskv import CSKVProjector

    return CSKVProjector.from_checkpoint(cfg, ckpt, idx, dtype)


def make_kv_cache(model: torch.nn.Module, kv_format: str, num_slots: int, max_len: int) -> KVCache:
    """The engine's cache for a loaded CausalLM. "auto" is "cskv" for a CSKV checkpoint, else
    "model"; a CSKV checkpoint run with another format behaves as the uncompressed model."""
    cfg = model.cfg
    if kv_format == "auto":
        kv_format = "cskv" if kv_compression(cfg) else "model"
    cache = get_kv_format(kv_format)(cfg.num_layers, num_slots, max_len, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    bind = getattr(cache, "bind", None)
    if bind is not None:
        bind(model)
    return cache
