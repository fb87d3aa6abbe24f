"""Hadamard matrices and the fast Walsh–Hadamard transform, for rotation-based quantization
(QuaRot-style W4A4/KV4, FlatQuant's initialisation).

A Hadamard matrix H of order n has ±1 entries and H Hᵀ = n I, so H/√n is orthogonal: rotating
activations by it spreads outliers over all channels without changing what a linear computes
(the weight is rotated the same way). Orders used here are n = m · 2^k:
- 2^k by Sylvester's doubling (symmetric), applied with an O(n log n) butterfly;
- m from Paley's constructions over a prime field: Paley I gives order q + 1 for a prime
  q ≡ 3 (mod 4) (12, 20, 24, 32, 44, 48, 60, 72, ...), Paley II gives order 2(q + 1) for a prime
  q ≡ 1 (mod 4) (12, 28, 36, 60, 76, 84, 108, 148, ...). Orders such as 40 = 20·2 come out of the
  Kronecker product with the power of two.
SmolLM2 needs 576 = 36·16, 1536 = 12·128 and head_dim 64 = 2^6. Orders needing a Williamson-type
matrix (e.g. 172 for Llama-2's 11008) are not constructed and raise a ConfigError.

Convention: a transform maps row vectors, `x -> x @ M`; with M = A ⊗ B (row-major Kronecker) and
x viewed as X [m, p] that is `Aᵀ X B`, so the small factor is one batched matmul and the power of
two is the butterfly.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from qserve.errors import ConfigError


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) for the quadratic character χ of the prime field F_q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 (mod 4): H = I + S with S the skew conference matrix."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 (mod 4), from the symmetric conference matrix C:
    H = C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def sylvester(p: int) -> torch.Tensor:
    """Unnormalised Sylvester Hadamard matrix of order p = 2^k (fp64)."""
    if p < 1 or p & (p - 1):
        raise ConfigError(f"Sylvester Hadamard order must be a power of two, got {p}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@lru_cache(maxsize=None)
def small_hadamard(m: int) -> torch.Tensor | None:
    """Unnormalised Hadamard matrix of order m from Paley I/II (or m = 1, 2), or None."""
    if m in (1, 2):
        return sylvester(m)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return _paley1(m - 1)
    if _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return _paley2(m // 2 - 1)
    return None


def factor(n: int) -> tuple[int, int]:
    """n = m · p with p a power of two and m the smallest order we can construct."""
    if n < 1:
        raise ConfigError(f"Hadamard order must be positive, got {n}")
    odd = n
    while odd % 2 == 0:
        odd //= 2
    m = odd
    while m <= n:
        if small_hadamard(m) is not None:
            return m, n // m
        m *= 2
    raise ConfigError(
        f"no Hadamard matrix of order {n} can be built here (n = 2^k·m needs m from Paley I/II); "
        "this model dimension is not supported by rotation-based methods"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthonormal Hadamard matrix of order n (H_m ⊗ H_p / √n): the reference for tests."""
    m, p = factor(n)
    return (torch.kron(small_hadamard(m), sylvester(p)) / n**0.5).to(dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform over the last dim (a power of two): x @ H_p,
    log2(p) butterfly passes of adds and subtracts."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ConfigError(f"fwht needs a power-of-two length, got {p}")
    shape = x.shape
    h = 1
    while h < p:
        y = x.reshape(-1, p // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        x = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return x.reshape(shape)


DENSE_POW2_MAX = 256  # up to this order the 2^k factor is one BLAS matmul (cheaper than the butterfly's passes in torch)


@lru_cache(maxsize=None)
def _factors(n: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(H_mᵀ/√m or None, H_p/√p or None when the butterfly is used) for the transform of order n."""
    m, p = factor(n)
    with torch.inference_mode(False):  # cached across calls: usable by autograd (FlatQuant) too
        small = None if m == 1 else (small_hadamard(m).t() / m**0.5).to(dtype=dtype, device=device).contiguous()
        dense = None if p > DENSE_POW2_MAX else (sylvester(p) / p**0.5).to(dtype=dtype, device=device)
    return small, dense


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None = None, butterfly: bool = False) -> torch.Tensor:
    """Orthonormal x @ (diag(signs) · H_n / √n) over the last dim, computed fast on the [m, p]
    view: the 2^k factor as one p×p matmul (or, for p > DENSE_POW2_MAX or butterfly=True, the
    O(p log p) butterfly) and the small Paley factor as one m×m matmul — p + m multiply-adds per
    value instead of n."""
    n = x.shape[-1]
    m, p = factor(n)
    small, dense = _factors(n, x.dtype, x.device)
    if signs is not None:
        x = x * signs.to(x.dtype)
    if dense is None or butterfly:
        y = fwht(x.reshape(-1, p)) * (1.0 / p**0.5)
    else:  # one 2-D GEMM: a batched matmul would broadcast the matrix per row (e.g. q/k [B, H, T, D])
        y = x.reshape(-1, p) @ dense
    if small is not None:
        y = torch.matmul(small, y.view(-1, m, p))
    return y.reshape(x.shape)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 vector [n] (int8) from a seeded generator: randomises the rotation (QuaRot's diag(s)·H)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def rotation_matrix(n: int, signs: torch.Tensor | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dense orthogonal diag(signs) · H_n / √n: what hadamard_transform multiplies by."""
    h = hadamard_matrix(n, torch.float64)
    if signs is not None:
        h = signs.to(torch.float64)[:, None] * h
    return h.to(dtype)


class QKRotation:
    """Online Hadamard over head_dim applied to queries and keys after RoPE: q·k is unchanged
    (H Hᵀ = I), while keys entering the cache lose their outlier channels, so a 4-bit KV cache
    works. Called by the model when quantization_config["qk_rotation"] == "hadamard"."""

    def __init__(self, head_dim: int):
        self.head_dim = head_dim
        factor(head_dim)  # fail at load, not at the first token

    def __call__(self, qk: torch.Tensor) -> torch.Tensor:
        return hadamard_transform(qk)


def qk_transform(qcfg: dict | None, head_dim: int) -> QKRotation | None:
    """The online q/k transform a checkpoint's quantization_config asks for, or None."""
    kind = (qcfg or {}).get("qk_rotation")
    if kind is None:
        return None
    if kind != "hadamard":
        raise ConfigError(f"unknown qk_rotation {kind!r}; qserve knows 'hadamard'")
    return QKRotation(head_dim)
