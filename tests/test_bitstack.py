"""BitStack: decomposition, the stack file and its manifest, the runtime layer, live resizing.

All on the tiny random model (hidden 128, 2 layers, 14 linears), decomposed with 6 blocks of rank 8
from 4 x 32 calibration tokens: ~10 s for the session fixture, ~20 s for the whole file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from calib_util import all_logits, calib_args, write_text

from qserve.checkpoint import Checkpoint
from qserve.errors import BudgetError, ConfigError
from qserve.kvcache import Batch, KVCache
from qserve.model import load_model
from qserve.quant_methods.bitstack import (
    BitStackLinear, block_nbytes, decompose_weight, pack_signs, reconstruct, release_scratch, scratch_bytes,
    unpack_signs,
)
from qserve.quant_methods.bitstack_stack import MANIFEST, BitStackStack, stack_order
from qserve.woq import dequantize_stored, quantize_weight

BLOCKS, RANK = 6, 8


@pytest.fixture(scope="module")
def bs_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qserve.offline import quantizers

    tmp = tmp_path_factory.mktemp("bitstack")
    args = calib_args(write_text(tmp / "calib.txt"), samples=4, seq_len=32)
    args.blocks, args.rank = BLOCKS, RANK
    quantizers()["bitstack"].run(tiny_dir, tmp / "tiny-bitstack", args)
    return tmp / "tiny-bitstack"


@pytest.fixture(scope="module")
def stack(bs_dir: Path) -> BitStackStack:
    return BitStackStack(bs_dir)


def _weighted(err: torch.Tensor, scale: torch.Tensor) -> float:
    return float((err * scale).square().sum())


def test_sign_packing_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (8, 13, 64, 100):
        pos = torch.rand(5, k, generator=g) > 0.5
        packed = pack_signs(pos)
        assert packed.shape == (5, -(-k // 64) * 8) and packed.dtype == torch.uint8
        assert torch.equal(unpack_signs(packed, k), pos.float() * 2 - 1)


def test_error_never_increases_and_beats_rtn_with_all_blocks(tiny_dir: Path, stack: BitStackStack) -> None:
    """Per weight, from the blocks as stored: the activation-weighted error (what the method
    minimises) and the plain Frobenius error fall with every block, and all blocks beat RTN w4."""
    ckpt, src = Checkpoint(stack.dir), Checkpoint(tiny_dir)
    for li, layer in enumerate(stack.layers):
        w = src.get(layer["name"] + ".weight").float()
        n, k = w.shape
        blocks = stack.read_blocks(li, range(BLOCKS))
        errs = [w] + [reconstruct(blocks[:i], n, k) - w for i in range(1, BLOCKS + 1)]
        fro = [float(e.square().sum()) for e in errs]
        assert all(b <= a for a, b in zip(fro, fro[1:])), (layer["name"], fro)
        recorded = layer["errors"]  # activation-weighted, written by the quantizer
        assert all(b <= a for a, b in zip(recorded, recorded[1:])), (layer["name"], recorded)
        rtn = quantize_weight(w, 4, 128)
        assert fro[-1] < float((dequantize_stored(rtn, k, 128) - w).square().sum())
        # the bytes the checkpoint stores for each of this layer's blocks are the manifest's
        for i in range(BLOCKS):
            assert ckpt.get(f"{layer['name']}.bitstack.block.{i:02d}").numel() == block_nbytes(n, k, RANK)


def test_equal_bytes_against_rtn_w4(tiny_dir: Path, stack: BitStackStack) -> None:
    """At RTN w4 g128's bytes per weight, BitStack's error is NOT below RTN's on the tiny model;
    this test states and pins the measured ratio instead.

    At 128-256 wide layers a rank-8 block costs 1.5-3 bits/weight (the bf16 factors dominate), so
    only 1 block fits into RTN w4's bytes, and one sign-times-rank-8 block of a Gaussian weight
    leaves ~30% of its energy. Measured ratio BitStack / RTN: 25-32 per weight.
    """
    src = Checkpoint(tiny_dir)
    ratios = []
    for li, layer in enumerate(stack.layers):
        w = src.get(layer["name"] + ".weight").float()
        n, k = w.shape
        rtn = quantize_weight(w, 4, 128)
        rtn_bytes = sum(t.numel() * t.element_size() for t in rtn.values())
        fit = rtn_bytes // block_nbytes(n, k, RANK)
        assert fit >= 1
        bs_err = float((reconstruct(stack.read_blocks(li, range(fit)), n, k) - w).square().sum())
        ratios.append(bs_err / float((dequantize_stored(rtn, k, 128) - w).square().sum()))
    assert 15 < min(ratios) and max(ratios) < 40, ratios


def test_decompose_folds_scale_exactly() -> None:
    """The inverse activation scale lives in v: reconstructing gives W, not W·diag(s)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 64, generator=g)
    s = torch.rand(64, generator=g) * 3 + 0.1
    blocks, errors = decompose_weight(w, s, 10, 8)
    r = reconstruct(blocks, 48, 64) - w
    assert _weighted(r, s) == pytest.approx(errors[-1], rel=1e-3)
    assert _weighted(r, s) < 0.02 * _weighted(w, s)


def test_manifest_matches_file(stack: BitStackStack) -> None:
    m = json.loads((stack.dir / MANIFEST).read_text())
    raw = stack.file.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    start = 8 + hlen
    prev_end = None
    for entry in m["stack"]:
        layer = m["layers"][entry["layer"]]
        t = header[f"{layer['name']}.bitstack.block.{entry['index']:02d}"]
        begin, end = t["data_offsets"]
        assert t["dtype"] == "U8" and start + begin == entry["offset"]
        assert end - begin == entry["bytes"] == block_nbytes(layer["out"], layer["in"], RANK)
        if prev_end is not None:  # stack order is file order: the first N blocks are one range
            assert entry["offset"] == prev_end
        prev_end = start + end
    assert prev_end == len(raw)
    # a layer's blocks keep their order, every layer's first block comes first
    seen: dict[int, int] = {}
    for r, entry in enumerate(m["stack"]):
        assert entry["index"] == seen.get(entry["layer"], 0)
        seen[entry["layer"]] = entry["index"] + 1
        if r < stack.min_blocks:
            assert entry["index"] == 0
    assert sorted(seen.values()) == [BLOCKS] * len(m["layers"])


def test_stack_order_is_a_merge_by_gain() -> None:
    errors = [[10.0, 4.0, 3.5, 3.45], [1.0, 0.1, 0.02, 0.01]]
    # relative gains: layer 0 0.6, 0.05, 0.005; layer 1 0.9, 0.08, 0.01
    assert stack_order(errors, [1, 1], "relative") == [(1, 0), (0, 0), (1, 1), (0, 1), (1, 2), (0, 2)]
    # absolute gains: layer 0 6, 0.5, 0.05; layer 1 0.9, 0.08, 0.01
    assert stack_order(errors, [1, 1], "output") == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]
    # gain is per byte: a layer twice as costly per block waits
    assert stack_order(errors, [1, 20], "output")[2:4] == [(0, 1), (0, 2)]
    with pytest.raises(ConfigError):
        stack_order(errors, [1, 1], "nope")


def test_loads_through_model_and_generates(bs_dir: Path, tiny_dir: Path) -> None:
    cfg = json.loads((bs_dir / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qserve-bitstack"
    model = load_model(bs_dir, torch.float32, 64)
    assert isinstance(model.layers[0].qkv, BitStackLinear) and len(model.layers[0].qkv.parts) == 3
    ref = load_model(tiny_dir, torch.float32, 64)
    ids = torch.arange(3, 40)
    want = all_logits(ref, ids)
    err = float((all_logits(model, ids) - want).norm() / want.norm())
    # 6 rank-8 blocks of Gaussian weights: measured 0.11 relative logit error (16 rank-16 blocks: 0.005)
    assert err < 0.2
    BitStackStack(bs_dir).apply(model, BitStackStack(bs_dir).min_blocks)
    assert float((all_logits(model, ids) - want).norm() / want.norm()) > 2 * err
    c = model.cfg
    cache = KVCache(c.num_layers, 1, 64, c.num_kv_heads, c.head_dim, model.dtype)
    toks = [5, 9, 11]
    logits = model(torch.tensor([toks]), Batch.make([0], [0], 3), cache)
    for _ in range(8):
        toks.append(int(logits[0].argmax()))
        logits = model(torch.tensor([[toks[-1]]]), Batch.make([0], [len(toks) - 1], 1), cache)
    assert len(toks) == 11


def test_bf16_runtime_matches_fp32_reference(stack: BitStackStack) -> None:
    """The bf16 reconstruct-into-scratch path against the fp32 reconstruction (tolerance: bf16
    rounding of the weight and the activations, ~1% of the output norm)."""
    model = stack.load_model(None, torch.bfloat16, 32)
    layer = model.layers[1].gate_up
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    w = torch.cat([reconstruct(p.blocks(), p.out_features, p.in_features) for p in layer.parts])
    want = x @ w.t()
    got = layer(x.to(torch.bfloat16)).float()
    assert float((got - want).norm() / want.norm()) < 2e-2


def test_resize_down_then_up_restores_outputs(stack: BitStackStack) -> None:
    model = stack.load_model(None, torch.float32, 64)
    ids = torch.arange(2, 30)
    full = all_logits(model, ids)
    total = stack.total_blocks
    assert stack.current_blocks(model) == total
    small = stack.min_blocks + 3
    rep = stack.apply(model, small)
    assert (rep.blocks_before, rep.added, rep.dropped, rep.bytes_read) == (total, 0, total - small, 0)
    assert stack.current_blocks(model) == small
    assert model.weight_bytes() == stack.resident_bytes(small, torch.float32) - stack.scratch_bytes(torch.float32)
    shrunk = all_logits(model, ids)
    assert not torch.equal(shrunk, full)
    mid = total // 2
    rep = stack.apply(model, mid)
    assert rep.added == mid - small and rep.bytes_read == stack.stack_bytes(mid) - stack.stack_bytes(small)
    rep = stack.apply(model, total)
    assert torch.equal(all_logits(model, ids), full)
    # a model loaded directly at N equals one resized to N
    direct = stack.load_model(mid, torch.float32, 64)
    stack.apply(model, mid)
    assert torch.equal(all_logits(direct, ids), all_logits(model, ids))


def test_layer_set_blocks(stack: BitStackStack) -> None:
    model = stack.load_model(None, torch.float32, 32)
    layer = model.layers[0].o_proj
    x = torch.randn(3, layer.in_features)
    before = layer(x)
    layer.set_blocks(2)
    assert layer.blocks_loaded() == [2]
    with pytest.raises(ConfigError):
        layer.set_blocks(4)  # adding needs the stack
    layer.set_blocks(BLOCKS, stack)
    assert torch.equal(layer(x), before)


def test_budget_and_resident_bytes(stack: BitStackStack) -> None:
    dt = torch.bfloat16
    lo, hi = stack.resident_bytes(stack.min_blocks, dt), stack.resident_bytes(stack.total_blocks, dt)
    assert stack.blocks_for_budget(hi, dt) == stack.total_blocks
    assert stack.blocks_for_budget(lo, dt) == stack.min_blocks
    mid_budget = (lo + hi) // 2
    n = stack.blocks_for_budget(mid_budget, dt)
    assert stack.resident_bytes(n, dt) <= mid_budget < stack.resident_bytes(n + 1, dt)
    with pytest.raises(BudgetError, match="smallest BitStack model"):
        stack.blocks_for_budget(lo - 1, dt)
    # what a loaded model really holds, after a forward allocated the scratch
    release_scratch()
    model = stack.load_model(n, dt, 32)
    all_logits(model, torch.arange(1, 9))
    assert model.weight_bytes() + scratch_bytes() == stack.resident_bytes(n, dt)
