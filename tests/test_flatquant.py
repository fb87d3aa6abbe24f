"""FlatQuant: the learnable transforms are output-preserving before quantization, the exported
checkpoint computes what calibration trained, training lowers the block error, blocks resume,
and checkpoints load and generate through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from calib_util import all_logits, calib_args, rel_err, write_text
from conftest import quantize_dir
from engine_util import make_engine, run_many, tokens
from qserve.calib import FUSED_LINEARS, BlockStats, InputStats, load_fp32_model
from qserve.engine_api import SamplingParams
from qserve.errors import ConfigError
from qserve.kvcache import Batch, KVCache
from qserve.model import load_model
from qserve.quant_methods.flatquant import BlockParams, Kron, block_forward, export_block, transformed_moment
from qserve.quant_methods.quarot import DictCheckpoint
from qserve.w4a4 import kron_factors


def fq_args(calib: Path, work: Path, **kw):
    a = calib_args(calib, group_size=-1, samples=8, seq_len=64)
    for k, v in {"a_bits": 4, "fq_epochs": 2, "fq_lr": 5e-3, "fq_batch": 4, "fq_kv_bits": 4, "fq_w_quant": "rtn",
                 "fq_work_dir": str(work), **kw}.items():
        setattr(a, k, v)
    return a


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def _stats(layer, seed: int = 0) -> BlockStats:
    g = torch.Generator().manual_seed(seed)
    stats = BlockStats(0, {n: InputStats.empty(getattr(layer, n).in_features, False) for n in FUSED_LINEARS})
    for n in FUSED_LINEARS:
        stats.inputs[n].add(torch.randn(64, getattr(layer, n).in_features, generator=g).abs() * 3)
    return stats


def _perturb(bp: BlockParams, seed: int) -> None:
    """Move every trainable away from its (orthogonal, unit-scale) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bp.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * (p.abs().mean() + 0.1))


def test_decompose_and_kron_inverse() -> None:
    assert kron_factors(576) == (24, 24) and kron_factors(1536) == (32, 48) and kron_factors(128) == (8, 16)
    kr = Kron(8, 16, seed=0)
    with torch.no_grad():
        kr.left.add_(torch.randn(8, 8) * 0.3)
        kr.right.add_(torch.randn(16, 16) * 0.3)
    x, w = torch.randn(5, 128, dtype=torch.float64), torch.randn(7, 128, dtype=torch.float64)
    kr = kr.double()
    assert torch.allclose(kr(x) @ kr.weight_side(w).t(), x @ w.t(), atol=1e-9)


def test_transformed_moment() -> None:
    """GPTQ's Hessian of the transformed input, from the original input's second moment."""
    g = torch.Generator().manual_seed(0)
    kr = Kron(8, 4, seed=1)
    with torch.no_grad():
        kr.left.add_(torch.randn(8, 8, generator=g) * 0.2)
    s = torch.rand(32, generator=g) + 0.5
    x = torch.randn(500, 32, generator=g)
    with torch.no_grad():
        xt = kr(x * s)
        want = xt.t() @ xt / 500
        got = transformed_moment(x.t() @ x / 500, kr, None, s)
    assert torch.allclose(got.float(), want, rtol=1e-4, atol=1e-5)


def test_unquantized_transformed_block_is_the_original_block(tiny_dir: Path) -> None:
    """Scales folded into norms/up_proj, Kronecker transforms and their inverses, the head-wise
    value transform and the q/k Hadamard: with quantization off the block is unchanged."""
    model = load_fp32_model(tiny_dir, 32)
    layer = model.layers[1]
    bp = BlockParams(layer, _stats(layer), seed=3)
    _perturb(bp, 4)
    x = torch.randn(2, 32, model.cfg.hidden_size)
    cache = KVCache(model.cfg.num_layers, 1, 32, model.cfg.num_kv_heads, model.cfg.head_dim, torch.float32)
    batch = Batch.make([0], [0], 32)
    ref = torch.cat([layer(x[i:i + 1], batch, batch.positions(), model.rope, cache, model.attention) for i in range(2)])
    with torch.no_grad():
        got = block_forward(model, layer, bp, x, kv_bits=16, quant=False)
    assert rel_err(got, ref) < 1e-5


def test_exported_block_serves_what_was_trained(tiny_dir: Path) -> None:
    """The stored block (fp16 transforms, int4 codes, learned clips) run by the W4A4 runtime (integer
    GEMM) gives the training forward's output: same codes, same scales, float summation order aside."""
    from qserve.config import parse_config
    from qserve.model import CausalLM

    model = load_fp32_model(tiny_dir, 32)
    layer = model.layers[0]
    bp = BlockParams(layer, _stats(layer), seed=5)
    _perturb(bp, 6)
    stored = export_block(layer, bp, "model.layers.0.")
    ckpt = {k: v for k, v in load_fp32_tensors(tiny_dir).items() if not k.startswith("model.layers.0.") or "norm" in k}
    ckpt = {k: v for k, v in ckpt.items() if not (k.startswith("model.layers.0.") and k.endswith("proj.weight"))}
    ckpt.update(stored)
    raw = json.loads((tiny_dir / "config.json").read_text())
    # layer 1 stays dense: give its weights the W4A4 layout with fp weights
    for k in [k for k in ckpt if k.startswith("model.layers.1.") and k.endswith("proj.weight")]:
        ckpt[k.replace(".weight", ".fp_weight")] = ckpt.pop(k)
    raw["quantization_config"] = {"quant_method": "qserve-flatquant", "w_bits": 4, "a_bits": 4, "a_clip": 1.0,
                                  "qk_rotation": "hadamard"}
    served = CausalLM(parse_config(raw), DictCheckpoint(ckpt), torch.float32, 32)
    x = torch.randn(1, 32, model.cfg.hidden_size)
    cache = KVCache(2, 1, 32, model.cfg.num_kv_heads, model.cfg.head_dim, torch.float32)
    batch = Batch.make([0], [0], 32)
    got = served.layers[0](x, batch, batch.positions(), served.rope, cache, served.attention)
    with torch.no_grad():
        want = block_forward(model, layer, bp, x, kv_bits=16)
        fp = block_forward(model, layer, bp, x, kv_bits=16, quant=False)
    assert rel_err(want - x, fp - x) > 0.05  # quantization is on...
    assert rel_err(got - x, want - x) < 1e-4  # ...and served bit-for-bit as trained (measured 3e-7)


def load_fp32_tensors(d: Path) -> dict[str, torch.Tensor]:
    from qserve.offline import load_fp_tensors

    return {k: v.float() for k, v in load_fp_tensors(d)[1].items()}


@pytest.fixture(scope="module")
def tiny_fq(tiny_tied_dir: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fq")
    out = quantize_dir(tiny_tied_dir, root / "tiny-fq", "flatquant", **vars(fq_args(calib, root / "work")))
    return out, root / "work"


def test_training_lowers_block_error(tiny_fq: tuple[Path, Path]) -> None:
    report = json.loads((tiny_fq[1] / "report.json").read_text())
    assert len(report) == 2
    for r in report:
        assert r["mse_epochs"][-1] < r["mse_init"], r


def test_flatquant_checkpoint_generates(tiny_fq: tuple[Path, Path], tiny_tied_dir: Path) -> None:
    out = tiny_fq[0]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qserve-flatquant" and qc["qk_rotation"] == "hadamard"
    ids = torch.randint(0, 400, (40,), generator=torch.Generator().manual_seed(1))
    ref = all_logits(load_model(tiny_tied_dir, torch.float32, 64), ids)
    assert rel_err(all_logits(load_model(out, torch.float32, 64), ids), ref) < 0.6
    for kv in ("model", "int4"):
        eng = make_engine(out, dtype="bfloat16", kv_format=kv)
        try:
            evs = run_many(eng, [eng.tokenizer("The quick brown fox")["input_ids"]],
                           SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
            assert len(tokens(evs)) == 6
        finally:
            eng.shutdown()


def test_resume_skips_finished_blocks(tiny_fq: tuple[Path, Path], tiny_tied_dir: Path, calib: Path,
                                      tmp_path: Path) -> None:
    """A rerun with the same settings reuses every saved block: same tensors, no training (the
    saved report, with its timing, comes back unchanged). Other settings retrain."""
    from safetensors.torch import load_file

    out, work = tiny_fq
    before = json.loads((work / "report.json").read_text())
    again = quantize_dir(tiny_tied_dir, tmp_path / "again", "flatquant", **vars(fq_args(calib, work)))
    assert json.loads((work / "report.json").read_text()) == before
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # GPTQ weights are an export choice: the trained blocks are reused, the weights differ
    g = quantize_dir(tiny_tied_dir, tmp_path / "gptq", "flatquant", **vars(fq_args(calib, work, fq_w_quant="gptq")))
    assert json.loads((work / "report.json").read_text()) == before
    c = load_file(g / "model.safetensors")
    assert not torch.equal(a["model.layers.0.mlp.down_proj.qweight"], c["model.layers.0.mlp.down_proj.qweight"])
    assert torch.equal(a["model.layers.0.mlp.down_proj.trans_left"], c["model.layers.0.mlp.down_proj.trans_left"])
    quantize_dir(tiny_tied_dir, tmp_path / "other", "flatquant", **vars(fq_args(calib, work, fq_epochs=1)))
    assert [len(r["mse_epochs"]) for r in json.loads((work / "report.json").read_text())] == [1, 1]


def test_flatquant_rejects_bad_options(tiny_dir: Path, calib: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        quantize_dir(tiny_dir, tmp_path / "a", "flatquant", **{**vars(fq_args(calib, tmp_path / "w")), "bits": 8})
    with pytest.raises(ConfigError):
        quantize_dir(tiny_dir, tmp_path / "b", "flatquant", **vars(fq_args(calib, tmp_path / "w", fq_batch=0)))
