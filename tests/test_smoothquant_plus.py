"""SmoothQuant+: the smoothing formula, the model-wide alpha search, and its checkpoint (tiny model, ~10 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calib_util import all_logits, calib_args, rel_err, write_text
from qserve.calib import calibration_samples, load_fp32_model
from qserve.checkpoint import Checkpoint
from qserve.config import load_config
from qserve.model import load_model
from qserve.quant_methods import smoothquant_plus as sqp
from qserve.smoothing import scale_groups


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def _absmax(layer, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(getattr(layer, n).in_features, generator=g) * 10 + 0.1
            for n in ("qkv", "o_proj", "gate_up", "down")}


def test_smoothing_scales_follow_the_formula_with_gqa_ties(tiny_dir: Path) -> None:
    layer = load_fp32_model(tiny_dir, 32).layers[0]
    o_group = scale_groups(layer)[1]
    x = _absmax(layer, 0)["o_proj"]
    w = layer.o_proj.weight.data
    s = sqp.smoothing_scales(o_group, x, w, 0.3)
    # free channel c of v feeds o's input channels of every query head sharing its kv head
    hd, rep = layer.hd, layer.nh // layer.nkv

    def cols(c: int) -> list[int]:
        return [(c // hd * rep + r) * hd + c % hd for r in range(rep)]

    want = torch.stack([x[cols(c)].max() ** 0.3 / w[:, cols(c)].abs().max() ** 0.7 for c in range(o_group.num_free)])
    ratio = s / want  # the normalisation is one constant factor
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-4)


def test_smoothing_preserves_fp32_outputs(tiny_dir: Path) -> None:
    model = load_fp32_model(tiny_dir, 64)
    ids = torch.randint(0, model.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    ref = all_logits(model, ids)
    for i, layer in enumerate(model.layers):
        sqp.smooth_layer(layer, _absmax(layer, i), 0.5)
    assert rel_err(all_logits(model, ids), ref) < 1e-4


def test_alpha_search_keeps_the_least_loss_and_restores_weights(tiny_dir: Path, calib_text: Path) -> None:
    model = load_fp32_model(tiny_dir, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = [_absmax(layer, i) for i, layer in enumerate(model.layers)]
    ids = calibration_samples(tiny_dir, [calib_text.read_text()], 2, 64, 0)
    alpha, losses = sqp.search_alpha(model, stats, ids, 4, 32)
    assert set(losses) == {"rtn"} | {f"{a:.1f}" for a in sqp.ALPHAS}
    assert losses[f"{alpha:.1f}"] == min(v for k, v in losses.items() if k != "rtn")
    assert len(set(losses.values())) > 1  # smoothing changed what the quantizer saw
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_smoothquant_plus_checkpoint_loads_and_serves(tiny_dir: Path, calib_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "sqp"
    info = sqp.run(tiny_dir, out, calib_args(calib_text, bits=3))
    qc = load_config(out).quantization_config
    assert qc["quant_method"] == "qserve-smoothquant-plus" and qc["bits"] == 3 and qc["alpha"] == info["alpha"]
    assert info["calibration_loss"][f"{info['alpha']:.1f}"] == min(
        v for k, v in info["calibration_loss"].items() if k != "rtn")
    names = Checkpoint(out).names()
    assert "model.layers.0.self_attn.q_proj.qweight" in names and "model.layers.0.self_attn.q_proj.weight" not in names
    model = load_model(out, torch.bfloat16, 64)
    assert isinstance(model.layers[1].down, sqp.SmoothQuantPlusLinear)
    ids = torch.arange(64) % model.cfg.vocab_size
    q = all_logits(model, ids)
    assert torch.isfinite(q).all() and rel_err(q, all_logits(load_model(tiny_dir, torch.float32, 64), ids)) < 0.5
