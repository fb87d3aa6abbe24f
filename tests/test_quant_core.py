"""Shared quantization math and the RTN W4A16/W8A16 runtime against fp32 references."""

from __future__ import annotations

import pytest
import torch

from qserve.groupquant import dequantize_asym, pack_int4, quantize_asym, unpack_int4
from qserve.woq import ReferenceWeightOnlyLinear, WeightOnlyLinear, dequantize_stored, quantize_weight


def test_pack_roundtrip_any_width() -> None:
    g = torch.Generator().manual_seed(0)
    for k in (8, 13, 576):
        q = torch.randint(0, 16, (7, k), generator=g, dtype=torch.uint8)
        assert torch.equal(unpack_int4(pack_int4(q), k), q)


@pytest.mark.parametrize("bits,gs,k", [(4, 128, 256), (4, 128, 576), (4, 32, 96), (3, 64, 192)])
def test_asym_error_within_half_step(bits: int, gs: int, k: int) -> None:
    """dequant(quant(w)) is within half a quantization step of w, per group (ragged last group too)."""
    w = torch.randn(16, k, generator=torch.Generator().manual_seed(1)) * 0.1
    q, s, z = quantize_asym(w, bits, gs)
    err = (dequantize_asym(q, s, z, gs) - w).abs()
    step = s.repeat_interleave(gs, -1)[:, :k]
    assert bool((err <= step / 2 + 1e-6).all())
    assert int(q.max()) <= 2**bits - 1


def test_stored_int4_bound_with_fp16_scales() -> None:
    """The stored format (fp16 scales) still keeps each weight within half a step of the grid."""
    w = torch.randn(32, 576, generator=torch.Generator().manual_seed(2)) * 0.05
    st = quantize_weight(w, 4, 128)
    err = (dequantize_stored(st, 576, 128) - w).abs()
    step = st["scales"].float().repeat_interleave(128, -1)[:, :576]
    assert bool((err <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("bits,gs,k", [(4, 128, 256), (4, 128, 576), (4, 32, 96), (8, -1, 192)])
def test_kernel_matches_reference(bits: int, gs: int, k: int) -> None:
    """torch's int4/int8 CPU kernels vs fp32 dequant-then-matmul; bound: bf16 activations and
    bf16 scales give ~2^-8 relative error per product, so 2% of the output's scale."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, k, generator=g) * 0.05
    st = quantize_weight(w, bits, gs)
    layer = WeightOnlyLinear(st, k, 48, bits, gs)
    ref = ReferenceWeightOnlyLinear(st, k, gs)
    x = torch.randn(5, k, generator=g)
    y, yr = layer(x), ref(x)
    assert y.dtype == x.dtype
    assert float((y - yr).abs().max()) <= 0.02 * float(yr.abs().max())


def test_int8_row_chunks_match_whole_matrix() -> None:
    """The int8 head is quantized in row chunks (bounded load memory); chunking must not change it."""
    from qserve.groupquant import quantize_sym

    w = torch.randn(9000, 64, generator=torch.Generator().manual_seed(4))  # > 2 chunks, ragged last
    st = quantize_weight(w, 8, -1)
    q, s = quantize_sym(w, 8, -1)
    assert torch.equal(st["qweight"], q)
    assert torch.equal(st["scales"], s.to(torch.float16))


def test_int4_checkpoint_3x_smaller(tiny_dir, tiny_rtn4_dir) -> None:
    """Linear weights in the int4 checkpoint are at least 3x smaller than fp16."""
    from qserve.checkpoint import Checkpoint
    from qserve.config import load_config
    from qserve.offline import linear_prefixes

    cfg = load_config(tiny_dir)
    fp, q = Checkpoint(tiny_dir), Checkpoint(tiny_rtn4_dir)
    fp16 = sum(2 * torch.Size(fp.shape(p + "weight")).numel() for p in linear_prefixes(cfg))
    int4 = sum(torch.Size(q.shape(n)).numel() * {"I32": 4, "F16": 2, "U8": 1}[q.index[n].dtype]
               for p in linear_prefixes(cfg) for n in q.names(p))
    assert fp16 / int4 >= 3.0, (fp16, int4)


def test_quantize_cli_records_its_peak_rss(tiny_dir, tmp_path) -> None:
    """`qserve quantize` writes its provenance with its own peak RSS in MiB (VmHWM, what a bench
    reports for the offline step): at least the RSS before it ran, at most the peak after."""
    import json

    from qserve.cli import main
    from qserve.sysmem import process_memory

    before = process_memory()
    if not before:
        pytest.skip("no /proc/self/status here")
    out = tmp_path / "rtn"
    assert main(["quantize", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--out", str(out)]) == 0
    prov = json.loads((out / "qserve_quantize.json").read_text())
    assert prov["method"] == "rtn"
    assert before["rss"] / 2**20 - 1 <= prov["peak_rss_mib"] <= process_memory()["peak"] / 2**20 + 1
