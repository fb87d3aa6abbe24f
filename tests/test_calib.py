"""Calibration machinery: samples, the block-by-block driver and its statistics (tiny model, ~5 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from calib_util import write_text
from qserve.calib import (
    BlockStats, FUSED_LINEARS, calibrate_blocks, calibration_samples, encode_texts, layer_forward, load_fp32_model,
)
from qserve.errors import ConfigError
from qserve.kvcache import KVCache


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [write_text(tmp_path_factory.mktemp("calib") / "calib.txt").read_text()]


def test_samples_are_seeded_windows_of_the_token_stream(tiny_dir: Path, text: list[str]) -> None:
    a = calibration_samples(tiny_dir, text, 6, 32, seed=0)
    assert a.shape == (6, 32)
    assert torch.equal(a, calibration_samples(tiny_dir, text, 6, 32, seed=0))
    assert not torch.equal(a, calibration_samples(tiny_dir, text, 6, 32, seed=1))
    stream = encode_texts(tiny_dir, text)
    windows = stream[: stream.numel() // 32 * 32].view(-1, 32)
    assert all(any(torch.equal(row, w) for w in windows) for row in a)


def test_too_little_text_is_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(ConfigError, match="fewer than"):
        calibration_samples(tiny_dir, ["just a few words"], 4, 64, 0)


def test_statistics_cover_every_token_of_every_linear_input(tiny_dir: Path, text: list[str]) -> None:
    model = load_fp32_model(tiny_dir, 32)
    samples = calibration_samples(tiny_dir, text, 3, 32, 0)
    seen: list[BlockStats] = []
    calibrate_blocks(model, samples, lambda _layer, st: seen.append(st), gram=True)
    # layer 0's q/k/v input is the normed embedding: check the statistics against it directly
    x = model.layers[0].input_norm(torch.nn.functional.embedding(samples, model.embed)).reshape(-1, model.cfg.hidden_size)
    st = seen[0].inputs["qkv"]
    assert st.count == 96 and set(seen[0].inputs) == set(FUSED_LINEARS)
    assert torch.allclose(st.mean_abs, x.abs().mean(0), rtol=1e-5)
    assert torch.equal(st.abs_max, x.abs().amax(0))
    assert torch.allclose(st.second_moment, x.t() @ x / 96, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("propagate", ["original", "transformed"])
def test_next_block_gets_original_or_transformed_outputs(tiny_dir: Path, text: list[str], propagate: str) -> None:
    model = load_fp32_model(tiny_dir, 32)
    reference = load_fp32_model(tiny_dir, 32)
    samples = calibration_samples(tiny_dir, text, 2, 32, 0)
    seen: list[BlockStats] = []

    def silence_block(layer, st: BlockStats) -> None:
        seen.append(st)
        layer.o_proj.weight.data.zero_()  # the block becomes the identity
        layer.down.weight.data.zero_()

    calibrate_blocks(model, samples, silence_block, propagate=propagate)
    cache = KVCache(model.cfg.num_layers, 1, 32, model.cfg.num_kv_heads, model.cfg.head_dim, torch.float32)
    want = torch.zeros(model.cfg.hidden_size)
    for row in samples:
        h = torch.nn.functional.embedding(row[None], reference.embed)
        if propagate == "original":
            h = layer_forward(reference, reference.layers[0], h, cache)
        want = torch.maximum(want, reference.layers[1].input_norm(h)[0].abs().amax(0))
    assert torch.allclose(seen[1].inputs["qkv"].abs_max, want, rtol=1e-5)
