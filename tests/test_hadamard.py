"""Hadamard matrices (Sylvester, Paley I/II, Kronecker) and the fast transform against dense math."""

from __future__ import annotations

import pytest
import torch

from qserve.errors import ConfigError
from qserve.hadamard import (
    factor, fwht, hadamard_matrix, hadamard_transform, qk_transform, random_signs, rotation_matrix, small_hadamard,
    sylvester,
)

# every order the supported models need (SmolLM2: 576, 1536, 64; tiny: 128, 256, 32) and the Paley
# constructions on their own (12, 20 Paley I; 28, 36 Paley II; 40 = 20 x 2)
SIZES = (1, 2, 4, 12, 20, 24, 28, 32, 36, 40, 44, 64, 128, 148, 256, 576, 960, 1536)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_orthonormal_with_pm1_entries(n: int) -> None:
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.equal((h * n**0.5).abs().round(), torch.ones(n, n, dtype=torch.float64))


@pytest.mark.parametrize("m", (12, 20, 28, 36, 44, 60))
def test_paley_orders(m: int) -> None:
    h = small_hadamard(m)
    assert h is not None and h.shape == (m, m)
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", SIZES)
def test_fast_transform_equals_dense(n: int) -> None:
    x = torch.randn(5, 3, n, dtype=torch.float64)
    s = random_signs(n, seed=n)
    assert torch.allclose(hadamard_transform(x, s), x @ rotation_matrix(n, s), atol=1e-12)
    assert torch.allclose(hadamard_transform(x), x @ hadamard_matrix(n), atol=1e-12)
    assert torch.allclose(hadamard_transform(x, s, butterfly=True), x @ rotation_matrix(n, s), atol=1e-12)


def test_fwht_is_sylvester_and_transform_preserves_norm() -> None:
    x = torch.randn(7, 64)
    assert torch.allclose(fwht(x), x @ sylvester(64).float(), atol=1e-4)
    y = hadamard_transform(x, random_signs(64, 1))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    with pytest.raises(ConfigError):
        fwht(torch.randn(3, 12))


def test_factor_and_unsupported_orders() -> None:
    assert factor(576) == (36, 16)
    assert factor(1536) == (12, 128)
    assert factor(64) == (1, 64)
    for n in (9, 172, 6):  # 172 needs a Williamson-type matrix, 6 and 9 have no Hadamard at all
        with pytest.raises(ConfigError):
            factor(n)


def test_random_signs_are_seeded_pm1() -> None:
    s = random_signs(100, 3)
    assert torch.equal(s, random_signs(100, 3)) and not torch.equal(s, random_signs(100, 4))
    assert set(s.tolist()) == {-1, 1}


def test_qk_transform_from_config() -> None:
    assert qk_transform(None, 64) is None
    assert qk_transform({"quant_method": "qserve-rtn"}, 64) is None
    rot = qk_transform({"qk_rotation": "hadamard"}, 64)
    q, k = torch.randn(2, 3, 5, 64), torch.randn(2, 3, 7, 64)
    assert torch.allclose(rot(q) @ rot(k).transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-4)
    with pytest.raises(ConfigError):
        qk_transform({"qk_rotation": "random"}, 64)
    with pytest.raises(ConfigError):
        qk_transform({"qk_rotation": "hadamard"}, 72 + 100)  # 172 is not constructible
