"""Quantized KV formats (int8, int4): dequantization bounds, cache round trips through Batch,
exact byte counts, and the engine generating with each format (batched == solo)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_util import make_engine, run_many, tokens
from qserve.config import load_config
from qserve.engine_api import SamplingParams
from qserve.errors import ConfigError
from qserve.kvcache import Batch, get_kv_format
from qserve.kvformats import (
    dequantize_groups, kv_bytes_per_token, kv_cache_bytes, pack_nibbles, quantize_groups, unpack_nibbles,
)


@pytest.mark.parametrize("bits,group,width", [(8, 64, 64), (4, 32, 64), (4, 32, 56), (8, 32, 40)])
def test_group_dequant_error_within_half_a_step(bits: int, group: int, width: int) -> None:
    g = torch.Generator().manual_seed(bits + width)
    x = torch.randn(50, 3, width, generator=g) * torch.rand(50, 3, 1, generator=g) * 4 + 1.5
    codes, meta = quantize_groups(x, bits, group)
    assert codes.max() <= 2**bits - 1 and meta.dtype == torch.float16
    y = dequantize_groups(codes, meta, group, torch.float32)
    step = meta[..., 0].float().repeat_interleave(group, -1)[..., :width]
    err = (y - x).abs()
    # half a quantization step, plus the fp16 rounding of the scale over 2^bits steps and of the min
    slack = step * (2**bits) * 2**-11 + x.abs().amax(-1, keepdim=True) * 2**-10
    assert bool((err <= step / 2 + slack).all())
    assert float(err.max()) > 0  # the test can see an error at all


def test_nibble_packing_round_trips() -> None:
    c = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    p = pack_nibbles(c)
    assert p.shape == (7, 32) and torch.equal(unpack_nibbles(p), c)


@pytest.mark.parametrize("fmt,bits", [("int8", 8), ("int4", 4)])
def test_cache_round_trip_prefill_chunks_and_batched_decode(fmt: str, bits: int) -> None:
    layers, slots, max_len, heads, dim = 2, 3, 40, 2, 64
    cache = get_kv_format(fmt)(layers, slots, max_len, heads, dim, torch.float32)
    g = torch.Generator().manual_seed(1)
    k = torch.randn(slots, heads, max_len, dim, generator=g)
    v = torch.randn(slots, heads, max_len, dim, generator=g)
    # slot 2: a 10-token chunk then a 7-token chunk; slot 0: 12 tokens; then batched decode of both
    for s, p, n in ((2, 0, 10), (2, 10, 7), (0, 0, 12)):
        cache.write(1, Batch.make([s], [p], n), k[s:s + 1, :, p:p + n], v[s:s + 1, :, p:p + n])
    b = Batch.make([0, 2], [12, 17], 1)
    cache.write(1, b, k[[0, 2], :, [12, 17]].unsqueeze(2), v[[0, 2], :, [12, 17]].unsqueeze(2))
    kk, vv = cache.read(1, b)
    assert kk.shape == (2, heads, 18, dim)
    group = 64 if bits == 8 else 32
    for row, (s, n) in enumerate(((0, 13), (2, 18))):
        ref = dequantize_groups(*quantize_groups(k[s, :, :n], bits, group), group, torch.float32)
        assert torch.equal(kk[row, :, :n], ref)  # exactly what quantize-on-write stored
        rel = float((vv[row, :, :n] - v[s, :, :n]).norm() / v[s, :, :n].norm())
        assert rel < (0.01 if bits == 8 else 0.12)
    contiguous = cache.read(1, Batch.make([0, 1], [12, 0], 1))[0]
    assert torch.equal(contiguous[0, :, :13], kk[0, :, :13])


def test_bytes_per_token_and_nbytes_are_exact(tiny_dir: Path) -> None:
    cfg = load_config(tiny_dir)  # 2 layers, 2 KV heads, head_dim 32
    per_head = {"model": 32 * 2, "int8": 32 + 4, "int4": 16 + 4}  # codes + fp16 scale + fp16 min
    for fmt, nb in per_head.items():
        assert kv_bytes_per_token(cfg, fmt) == 2 * 2 * 2 * nb
        cache = get_kv_format(fmt)(cfg.num_layers, 3, 50, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
        assert cache.nbytes() == kv_cache_bytes(cfg, fmt, 50, 3) == 3 * 50 * kv_bytes_per_token(cfg, fmt)
    with pytest.raises(ConfigError):
        kv_bytes_per_token(cfg, "fp3")


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_engine_generates_with_quantized_kv_batched_equals_solo(tiny_dir: Path, fmt: str) -> None:
    solo = make_engine(tiny_dir, dtype="float32", max_num_seqs=1, kv_format=fmt)
    batched = make_engine(tiny_dir, dtype="float32", max_num_seqs=4, prefill_chunk=7, kv_format=fmt)
    try:
        tok = solo.tokenizer
        prompts = [tok("The quick brown fox" + " jumps" * i)["input_ids"] for i in range(4)]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        alone = [tokens(run_many(solo, [p], params)[0]) for p in prompts]
        together = [tokens(evs) for evs in run_many(batched, prompts, params)]
        assert together == alone and all(len(t) == 12 for t in alone)
        assert batched.info().kv_cache_bytes == kv_cache_bytes(load_config(tiny_dir), fmt, batched.max_model_len, 4,
                                                              dtype=torch.float32)
    finally:
        solo.shutdown()
        batched.shutdown()
