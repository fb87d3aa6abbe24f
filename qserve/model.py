"""A Llama-family decoder (Llama, Mistral, Qwen2) in plain torch, built from a checkpoint.

Linear layers come through the quantized-linear seam (qserve.linear.build_linear), with q/k/v and
gate/up fused at load; KV state lives in qserve.kvcache; attention is a pluggable function.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qserve.attention import AttentionFn, inline_decode_attention, sdpa_attention
from qserve.checkpoint import Checkpoint
from qserve.config import ModelConfig, load_config
from qserve.errors import CheckpointError
from qserve.hadamard import qk_transform
from qserve.kvcache import Batch, KVCache
from qserve.kvformats import kv_layer_module
from qserve.linear import DenseLinear, build_linear, can_pack
from qserve.sysmem import release_free_memory


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one fused op (it accumulates in fp32 for bf16 input); in fp32 it is bit-identical to
        # transformers' weight * (x * rsqrt(mean(x^2) + eps))
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs:  # llama3 frequency-dependent scaling
        factor, lo, hi = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(is_mid, mid, scaled)
    return inv


class Rope(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype):
        super().__init__()
        t = torch.arange(max_len, dtype=torch.int64).float()
        freqs = torch.outer(t, rope_inv_freq(cfg))
        emb = torch.cat([freqs, freqs], -1)
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        # rotate_half(x) * sin == roll(x, D/2) * [-sin_lo, sin_hi]: one op instead of three
        signed = torch.cat([-freqs.sin(), freqs.sin()], -1)
        self.register_buffer("sin_signed", signed.to(dtype), persistent=False)
        self._pos: torch.Tensor | None = None
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [B, H, T, D], pos [B, T]. The tables for `pos` are gathered once per forward pass
        (every layer passes the same pos tensor) instead of once per layer."""
        if pos is not self._pos:
            self._pos = pos
            self._tables = self.tables(pos)
        return apply_rope(x, *self._tables)

    def tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for positions pos [B, T], shaped [B, 1, T, D] for apply_rope."""
        return self.cos[pos].unsqueeze(1), self.sin_signed[pos].unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin


def apply_rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with the same products and sums per element (bitwise the same result), written on
    the two halves of D, for compiled graphs. Why: inductor lowers roll to a scalar gather, and it
    inlines q's RoPE into the attention scores' loop over keys, so roll cost a 32-element gather
    per key per head (SmolLM2-135M bf16, 1000 keys: 73 -> 93 tok/s). Eager keeps apply_rope: one op
    instead of seven."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos[..., :h] + x2 * sin[..., :h], x2 * cos[..., h:] + x1 * sin[..., h:]), -1)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, ckpt: Checkpoint, dtype: torch.dtype):
        super().__init__()
        p = f"model.layers.{idx}."
        qc = cfg.quantization_config
        h, kvd = cfg.num_heads * cfg.head_dim, cfg.kv_dim
        self.idx = idx
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.input_norm = RMSNorm(ckpt.get(p + "input_layernorm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps, dtype)
        self.post_norm = RMSNorm(ckpt.get(p + "post_attention_layernorm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps, dtype)
        a, m = p + "self_attn.", p + "mlp."
        self.qkv = build_linear([ckpt.get_many(a + n + ".") for n in ("q_proj", "k_proj", "v_proj")],
                                cfg.hidden_size, [h, kvd, kvd], qc, dtype)
        self.o_proj = build_linear([ckpt.get_many(a + "o_proj.")], h, [cfg.hidden_size], qc, dtype)
        self.gate_up = build_linear([ckpt.get_many(m + n + ".") for n in ("gate_proj", "up_proj")],
                                    cfg.hidden_size, [cfg.intermediate_size] * 2, qc, dtype)
        self.down = build_linear([ckpt.get_many(m + "down_proj.")], cfg.intermediate_size, [cfg.hidden_size], qc, dtype)
        self.split = (h, kvd, kvd)
        self.inter = cfg.intermediate_size
        self.qk_rot = qk_transform(qc, self.hd)  # None unless the checkpoint rotates q/k after RoPE (W4A4KV4)
        self.kv_module = kv_layer_module(cfg, ckpt, idx, dtype)  # None unless the checkpoint compresses KV (CSKV)

    def forward(self, x: torch.Tensor, batch: Batch, pos: torch.Tensor, rope: Rope, cache: KVCache,
                attn: AttentionFn) -> torch.Tensor:
        hn, q, k, v = self._project(x, lambda qk: rope(qk, pos))
        if self.kv_module is None:
            cache.write(self.idx, batch, k, v)
            kk, vv = cache.read(self.idx, batch)
            mask = batch.mask
        else:  # the module caches compressed inputs and rebuilds K/V itself
            kk, vv, mask = self.kv_module(cache, self.idx, batch, hn, k, v, rope)
        return self._finish(x, attn(q, kk, vv, mask))

    def decode_dense(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     pos: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One decode token per row, on this layer's dense cache [slots, Hkv, L, D]: the same math as
        forward, written with tensor indices only (no Python ints from the batch, no cache object),
        so torch.compile captures one graph that every layer and every step reuses.
        x [B, 1, hidden]; slots, pos [B]; mask [B, 1, 1, kv_len] (kv_len sets the keys read)."""
        _, q, k, v = self._project(x, lambda qk: apply_rope_halves(qk, cos, sin))
        heads = torch.arange(self.nkv)[None, :]
        k_cache.index_put_((slots[:, None], heads, pos[:, None]), k[:, :, 0])
        v_cache.index_put_((slots[:, None], heads, pos[:, None]), v[:, :, 0])
        n = mask.shape[-1]
        return self._finish(x, inline_decode_attention(q, k_cache[slots, :, :n], v_cache[slots, :, :n], mask))

    def _project(self, x: torch.Tensor, rope_fn: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input, then q [B, H, T, D] and k, v [B, Hkv, T, D] with RoPE applied to q and k."""
        b, t, _ = x.shape
        hn = self.input_norm(x)
        qk, v = self.qkv(hn).split((self.split[0] + self.split[1], self.split[2]), dim=-1)
        qk = rope_fn(qk.view(b, t, self.nh + self.nkv, self.hd).transpose(1, 2))  # q and k in one go
        if self.qk_rot is not None:
            qk = self.qk_rot(qk)
        return hn, qk[:, :self.nh], qk[:, self.nh:], v.view(b, t, self.nkv, self.hd).transpose(1, 2)

    def _finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Attention output o [B, H, T, D] -> the layer's output: o_proj, residual, MLP, residual."""
        b, _, t, _ = o.shape
        x = x + self.o_proj(o.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.post_norm(x)).split(self.inter, dim=-1)
        return x + self.down(F.silu(gate) * up)

    @property
    def dense_decode_ok(self) -> bool:
        """decode_dense applies: plain KV, no q/k rotation, every linear declares itself traceable."""
        return self.kv_module is None and self.qk_rot is None and all(
            getattr(m, "compile_safe", False) for m in (self.qkv, self.o_proj, self.gate_up, self.down))


def decode_layers(layers: tuple[DecoderLayer, ...], x: torch.Tensor, k_caches: tuple[torch.Tensor, ...],
                  v_caches: tuple[torch.Tensor, ...], *args: torch.Tensor) -> torch.Tensor:
    """DecoderLayer.decode_dense through consecutive layers: the unit qserve.compilation compiles
    (layers are the same code on different tensors, so one graph serves every group of them)."""
    for layer, k, v in zip(layers, k_caches, v_caches):
        x = layer.decode_dense(x, k, v, *args)
    return x


def decode_head(norm: RMSNorm, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final norm and head on the last position, as fp32 logits: the decode step's last part, which
    qserve.compilation compiles too (a plain-layout head then runs as an in-graph GEMV)."""
    return head(norm(x[:, -1])).float()


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, max_len: int,
                 int8_head: bool = False):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        name, shape = "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
        # Looked up from the checkpoint file itself (Checkpoint.map): a decode step reads a row
        # per sequence, so holding the table in memory would cost vocab x hidden for nothing.
        self.embed = ckpt.map(name, shape)
        self.embed_resident = not ckpt.mappable(name)  # a copy in memory after all (weight_bytes)
        self.layers = nn.ModuleList()
        for i in range(cfg.num_layers):
            self.layers.append(DecoderLayer(cfg, i, ckpt, dtype))
            release_free_memory()  # a layer's load temporaries, so the load peaks near the final size
        self.norm = RMSNorm(ckpt.get("model.norm.weight", (cfg.hidden_size,)), cfg.rms_norm_eps, dtype)
        self.tied_head = not ckpt.names("lm_head.")  # the head is the embedding (so calibration writes it back)
        if self.tied_head and not cfg.tie_word_embeddings:
            raise CheckpointError("checkpoint has no lm_head and the config does not tie embeddings")
        if int8_head and (self.tied_head or "lm_head.weight" in ckpt):
            # The head reads vocab x hidden weights every token (a third of SmolLM2's decode
            # time in bf16); int8 per-channel halves that at ~0.4% relative weight error.
            # Quantized a row chunk at a time, so the load never holds the whole fp table.
            from qserve.woq import WeightOnlyLinear, quantize_rows_int8

            src = name if self.tied_head else "lm_head.weight"
            ckpt.check_shape(src, shape)
            stored = quantize_rows_int8(lambda i, j: ckpt.rows(src, i, j), shape)
            self.lm_head = WeightOnlyLinear(stored, cfg.hidden_size, cfg.vocab_size, 8, -1)
        else:
            # a tied head gets its own copy: it reads all of it every token, in a packed layout
            head = {"weight": ckpt.get(name, shape)} if self.tied_head else ckpt.get_many("lm_head.")
            self.lm_head = build_linear([head], cfg.hidden_size, [cfg.vocab_size], cfg.quantization_config, dtype)
        self.rope = Rope(cfg, max_len, dtype)
        self.attention: AttentionFn = sdpa_attention
        # set by qserve.compilation: the compiled decode_layers, and the consecutive layers each
        # call runs (made once: slicing a ModuleList per call cost ~65 us per token)
        self.compiled_step: Callable[..., torch.Tensor] | None = None
        self.compiled_head: Callable[..., torch.Tensor] = decode_head
        self.step_groups: list[tuple[DecoderLayer, ...]] = []

    @property
    def pad_safe(self) -> bool:
        """Padded positions past a prefill chunk are harmless: plain caches only hold them until
        the next write. A compressed-KV module's ring buffer would lose real entries to them."""
        return all(layer.kv_module is None for layer in self.layers)

    def weight_bytes(self) -> int:
        """Resident bytes of weights (shared storage counted once). The embedding table counts only
        when it is held in memory: a file mapping's pages are reclaimable page cache."""
        seen: set[int] = set()
        total = self.embed.numel() * self.embed.element_size() if self.embed_resident else 0
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            key = id(t) if t.is_mkldnn else t.data_ptr()  # packed weights have no data pointer
            if name.startswith("rope.") or key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding for ids, in the compute dtype (the table keeps its stored dtype)."""
        return F.embedding(ids, self.embed).to(self.dtype)

    def pack_dense_linears(self) -> int:
        """Reorder every unquantized linear's weight for fast small-batch matmuls (DenseLinear.pack).
        Returns how many were packed now (not those packed before); 0 when oneDNN cannot
        (qserve.linear.can_pack)."""
        if not can_pack(self.dtype):
            return 0
        linears = [m for m in self.modules() if isinstance(m, DenseLinear) and not m.packed]
        for m in linears:
            m.pack()
            release_free_memory()  # the plain copy, so packing does not raise the process's peak
        return len(linears)

    def tile_linears(self, head_only: bool = False) -> int:
        """Lay the weights of bf16 and int8 linears (and heads) out in tiles for the compiled
        decode step (DenseLinear.tile, WeightOnlyLinear.tile); only the head with `head_only`.
        Returns how many were tiled now."""
        tiled = 0
        for m in ([self.lm_head] if head_only else self.modules()):
            if m is not self and callable(getattr(m, "tile", None)) and m.tile():
                tiled += 1
                release_free_memory()  # the untiled copy, so tiling does not raise the process's peak
        return tiled

    def untile_linears(self) -> None:
        """Undo tile_linears (for the eager step, which reads the library kernels' layouts)."""
        for m in self.modules():
            if getattr(m, "tiled", False):
                m.untile()

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, batch: Batch, cache: KVCache, all_logits: bool = False,
                logit_index: int = -1) -> torch.Tensor:
        """ids [B, T] -> logits [B, V] at position `logit_index` of each row (the last token by
        default; a padded prefill chunk names its last real token), or [B, T, V] with all_logits."""
        x = self.embed_tokens(ids)
        pos = batch.positions()
        for layer in self.layers:
            x = layer(x, batch, pos, self.rope, cache, self.attention)
        if all_logits:
            return self.lm_head(self.norm(x)).float()
        # the decode step's head (compiled when the step is): it reads a tiled int8 head in place,
        # where an eager call copies the kernel's layout back first (~20 ms for SmolLM2's head).
        # A fresh [B, 1, hidden] copy has the decode step's strides, which the compiled head guards on.
        last = x[:, logit_index, None].clone(memory_format=torch.contiguous_format)
        return self.compiled_head(self.norm, self.lm_head, last)

    def decode(self, ids: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        """One decode step (ids [B, 1] -> logits [B, V]) through the compiled layer step; the same
        result as forward up to the compiler's fusion of bf16 roundings. Only for a dense KVCache
        and a model qserve.compilation accepted.

        The step's inputs are made outside inference mode, as the engine's Batch is: the graphs
        guard on it, and a mix would compile the same graph twice."""
        assert self.compiled_step is not None
        mask = batch.mask if batch.mask is not None else torch.ones(1, 1, 1, batch.kv_len, dtype=torch.bool)
        cos, sin = self.rope.tables(batch.starts[:, None])
        args = (batch.slots, batch.starts, mask, cos, sin)
        torch._dynamo.maybe_mark_dynamic(mask, 3)  # the key length: one graph for every length
        if ids.shape[0] > 1:  # batch size: one graph for every size above 1 (1 gets its own)
            for t in args:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        with torch.inference_mode():
            x = self.embed_tokens(ids)
            if ids.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(x, 0)
            ks, vs, i = cache.k.unbind(), cache.v.unbind(), 0
            for layers in self.step_groups:
                j = i + len(layers)
                x = self.compiled_step(layers, x, ks[i:j], vs[i:j], *args)
                i = j
            if ids.shape[0] > 1:  # the head's batch graph too, or it specialises on the warm-up's size
                torch._dynamo.maybe_mark_dynamic(x, 0)
            return self.compiled_head(self.norm, self.lm_head, x)


def load_model(model_dir: Path, dtype: torch.dtype, max_len: int, int8_head: bool = False) -> CausalLM:
    cfg = load_config(model_dir)
    ckpt = Checkpoint(model_dir)
    model = CausalLM(cfg, ckpt, dtype, max_len, int8_head)
    release_free_memory()  # the head's quantization temporaries
    return model.eval()
