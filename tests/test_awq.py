"""AWQ: folding invariance, the scale and clip searches, and the checkpoint it writes (tiny model, ~10 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calib_util import all_logits, calib_args, rel_err, write_text
from qserve.calib import BlockStats, calibrate_blocks, calibration_samples, hf_tensors, load_fp32_model
from qserve.checkpoint import Checkpoint, save_checkpoint
from qserve.cli import main
from qserve.config import load_config
from qserve.model import load_model
from qserve.quant_methods import awq
from qserve.smoothing import fake_quant, fold, scale_groups


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("calib") / "calib.txt")


def _add_biases(model, seed: int = 0) -> None:
    """Qwen2-style biases on q/k/v (and gate/up) so folding into v / up rows covers bias rows too."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.layers:
        for lin in (layer.qkv, layer.gate_up):
            lin.bias = torch.nn.Parameter(torch.randn(lin.out_features, generator=g) * 0.1, requires_grad=False)


def test_folding_scales_preserves_fp32_outputs(tiny_dir: Path) -> None:
    model = load_fp32_model(tiny_dir, 64)
    _add_biases(model)
    ids = torch.randint(0, model.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    ref = all_logits(model, ids)
    before = model.layers[0].qkv.weight.clone()
    g = torch.Generator().manual_seed(1)
    for layer in model.layers:
        for grp in scale_groups(layer):
            fold(layer, grp, torch.rand(grp.num_free, generator=g) * 4 + 0.25)
    assert not torch.allclose(model.layers[0].qkv.weight, before)  # the fold really changed weights
    assert rel_err(all_logits(model, ids), ref) < 1e-4


def test_hf_tensors_round_trip_the_fused_model(tiny_dir: Path, tmp_path: Path) -> None:
    model = load_fp32_model(tiny_dir, 32)
    tensors = hf_tensors(model)
    assert set(tensors) == set(Checkpoint(tiny_dir).names())
    save_checkpoint(tmp_path / "copy", tensors, load_config(tiny_dir).raw, source_dir=tiny_dir)
    ids = torch.arange(32)
    assert torch.equal(all_logits(load_fp32_model(tmp_path / "copy", 32), ids), all_logits(model, ids))


def test_gram_output_mse_matches_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(500, 64, generator=g), torch.randn(48, 64, generator=g)
    delta = fake_quant(w, 4, 32) - w
    direct = ((x @ delta.t()) ** 2).mean()
    assert float(awq.output_mse(delta, x.t() @ x / 500)) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize("group_index", [0, 1])  # q/k/v after the norm; o after v (GQA-tied scales)
def test_alpha_search_picks_zero_for_uniform_activations(tiny_dir: Path, group_index: int) -> None:
    layer = load_fp32_model(tiny_dir, 32).layers[0]
    grp = scale_groups(layer)[group_index]
    w = getattr(layer, grp.consumer).weight.data
    signs = torch.randint(0, 2, (400, w.shape[1]), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    alpha, s = awq.search_scale(w, signs.abs().mean(0), signs.t() @ signs / 400, grp, 4, 32)
    assert alpha == 0.0
    assert torch.equal(s, torch.ones(grp.num_free))


def test_alpha_search_protects_salient_channels(tiny_dir: Path) -> None:
    layer = load_fp32_model(tiny_dir, 32).layers[0]
    grp = scale_groups(layer)[0]
    w = layer.qkv.weight.data
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, w.shape[1], generator=g)
    x[:, torch.randperm(w.shape[1], generator=g)[:4]] *= 30
    alpha, s_free = awq.search_scale(w, x.abs().mean(0), x.t() @ x / 2000, grp, 4, 32)
    s = s_free[grp.expand]
    ref = x @ w.t()
    awq_err = ((x / s) @ fake_quant(w * s, 4, 32).t() - ref).pow(2).mean()
    rtn_err = (x @ fake_quant(w, 4, 32).t() - ref).pow(2).mean()
    assert alpha > 0
    assert awq_err < 0.8 * rtn_err


def test_clip_search_lowers_output_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)  # at 3 bits most Gaussian groups gain from a tighter range
    x = torch.randn(1000, 96, generator=g)
    moment = x.t() @ x / 1000
    clip = awq.search_clip(w, moment, 3, 32)
    assert clip.shape == (64, 3) and (clip < 1).any() and clip.min() >= 0.5
    err = lambda c: float(awq.output_mse(fake_quant(w, 3, 32, c) - w, moment))  # noqa: E731
    assert err(clip) < 0.95 * err(None)
    assert torch.equal(awq.search_clip(w, moment, 3, 32, rows=slice(10, None))[:10], torch.ones(10, 3))


def test_awq_block_beats_rtn_on_calibration_data(tiny_dir: Path, calib_text: Path) -> None:
    model = load_fp32_model(tiny_dir, 64)
    samples = calibration_samples(tiny_dir, [calib_text.read_text()], 8, 64, 0)
    errors = []

    def on_block(layer, stats: BlockStats) -> None:
        # rows a later fold rescales (v, up) are left out: their error is measured in another space
        kept = {"qkv": slice(0, layer.split[0] + layer.split[1]), "o_proj": slice(None),
                "gate_up": slice(0, layer.inter), "down": slice(None)}
        moments = {n: stats.inputs[n].second_moment for n in kept}
        orig = {n: getattr(layer, n).weight.data.clone() for n in kept}
        rtn = sum(float(awq.output_mse((fake_quant(w, 4, 32) - w)[kept[n]], moments[n])) for n, w in orig.items())
        _, clips = awq.awq_block(layer, stats, 4, 32)
        err = 0.0
        for n, w in orig.items():
            scaled = getattr(layer, n).weight.data
            s = scaled[0] / w[0]  # the column scales the fold applied (row 0 is never rescaled)
            err += float(awq.output_mse((fake_quant(scaled, 4, 32, clips[n]) / s - w)[kept[n]], moments[n]))
        errors.append((err, rtn))

    calibrate_blocks(model, samples, on_block, gram=True)
    assert len(errors) == model.cfg.num_layers
    for err, rtn in errors:
        assert err < 0.95 * rtn


def test_awq_checkpoint_round_trips_and_serves(tiny_dir: Path, calib_text: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    written = {}
    real_write = awq.write_quantized

    def spy(src, out, cfg, tensors, qcfg):
        written.update({k: v.clone() for k, v in tensors.items()})
        return real_write(src, out, cfg, tensors, qcfg)

    monkeypatch.setattr(awq, "write_quantized", spy)
    out = tmp_path / "awq"
    awq.run(tiny_dir, out, calib_args(calib_text))
    ckpt = Checkpoint(out)
    assert set(ckpt.names()) == set(written)
    for name, t in written.items():
        loaded = ckpt.get(name)
        if t.is_floating_point() and t.dtype != torch.float16:
            t = t.to(loaded.dtype)  # fp tensors (norms, embedding) are stored in bf16
        assert loaded.dtype == t.dtype and torch.equal(loaded, t), name
    qc = load_config(out).quantization_config
    assert qc["quant_method"] == "qserve-awq" and qc["bits"] == 4 and qc["group_size"] == 32
    assert qc["zero_point"] is True and qc["format"] == "qserve-woq-v1"
    model = load_model(out, torch.bfloat16, 64)
    assert isinstance(model.layers[0].qkv, awq.AWQLinear)
    ids = torch.arange(64) % model.cfg.vocab_size
    fp = all_logits(load_model(tiny_dir, torch.float32, 64), ids)
    q = all_logits(model, ids)
    assert torch.isfinite(q).all() and rel_err(q, fp) < 0.2


def test_quantize_cli_rejects_8_bit_awq(tiny_dir: Path, calib_text: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    code = main(["quantize", str(tiny_dir), "--method", "awq", "--bits", "8", "--calib", str(calib_text),
                 "--out", str(tmp_path / "x")])
    assert code == 2
    assert "3- or 4-bit" in capsys.readouterr().err
