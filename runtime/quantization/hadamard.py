"""Hadamard matrices, and ``lqc::hadamard``: multiply the last dimension by an orthogonal
Kronecker-factored Hadamard matrix.

A Hadamard matrix H of order n has entries +-1 and ``H H^T = n I``; ``H / sqrt(n)`` is
orthogonal. QuaRot-style rotation (lqc.passes.reparam.rotate) needs one for every width it rotates.
Orders that are powers of two come from Sylvester's doubling; others as a Kronecker product
``H_m (x) H_{2^k}`` with a small H_m from Paley's constructions (built here from quadratic
residues, not pasted from tables):

- Paley I, for a prime q = 3 (mod 4): order q + 1 (4, 8, 12, 20, 24, 32, 44, 48, ...);
- Paley II, for a prime q = 1 (mod 4): order 2 (q + 1) (12, 28, 36, 60, 76, 84, 108, ...).

SmolLM2's hidden width 576 is ``H_36 (x) H_16``; its FFN width 1536 is ``H_12 (x) H_128``.

``lqc::hadamard(x, left, right)`` computes ``x @ (left (x) right)`` on the last dimension without
forming the Kronecker product: x reshaped to [..., m, p] becomes ``left^T X right``, m p (m + p)
multiply-adds per row instead of (m p)^2.
"""

from __future__ import annotations

import math
from functools import lru_cache

import sympy
import torch

import lqc.ir.lqc_ops  # noqa: F401  (the schema must exist before an implementation registers)


def sylvester(order: int) -> torch.Tensor:
    """H_{2^k} by doubling, float64."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester's construction needs a power of two, got {order}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q."""
    chi = [0] + [int(sympy.legendre_symbol(a, q)) for a in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def paley_1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q = 3 (mod 4)."""
    jac = _jacobsthal(q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return s + torch.eye(q + 1, dtype=torch.float64)


def paley_2(q: int) -> torch.Tensor:
    """Order 2 (q + 1) for a prime q = 1 (mod 4), from the symmetric conference matrix C."""
    jac = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1.0, 1.0, jac
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    minus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, minus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), plus)


@lru_cache(maxsize=None)
def _small_orders(limit: int = 256) -> dict[int, tuple[str, int]]:
    """Non-power-of-two orders Paley gives directly, up to ``limit``: order -> (construction, q)."""
    orders: dict[int, tuple[str, int]] = {}
    for q in sympy.primerange(3, limit):
        if q % 4 == 3 and q + 1 <= limit:
            orders.setdefault(q + 1, ("paley1", q))
        if q % 4 == 1 and 2 * (q + 1) <= limit:
            orders.setdefault(2 * (q + 1), ("paley2", q))
    return {n: how for n, how in sorted(orders.items()) if n & (n - 1)}


def hadamard_factors(n: int) -> tuple[int, int, str] | None:
    """(m, p, description) with n = m * p, p a power of two and H_m known; None when no
    Hadamard matrix of order n is constructible here (n odd, or no known m)."""
    if n >= 1 and not n & (n - 1):
        return 1, n, f"Sylvester H_{n}"
    for m, (how, q) in _small_orders().items():
        p = n // m
        if n % m == 0 and not p & (p - 1):
            return m, p, f"Paley {'I' if how == 'paley1' else 'II'} H_{m} (q={q}) (x) Sylvester H_{p}"
    return None


@lru_cache(maxsize=None)
def _known(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    how, q = _small_orders()[m]
    h = paley_1(q) if how == "paley1" else paley_2(q)
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64)), f"Paley construction of order {m} is not Hadamard"
    return h


def hadamard_pair(n: int) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """Orthogonal (left [m, m], right [p, p], description) with ``left (x) right`` an orthogonal
    Hadamard matrix of order n, float64; None when none is constructible."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    m, p, description = factors
    return _known(m) / math.sqrt(m), sylvester(p) / math.sqrt(p), description


def hadamard_matrix(n: int) -> tuple[torch.Tensor, str] | None:
    """The orthogonal Hadamard matrix ``H_n / sqrt(n)`` (float64) and how it was built, or None."""
    pair = hadamard_pair(n)
    return None if pair is None else (torch.kron(pair[0], pair[1]), pair[2])


@torch.library.impl("lqc::hadamard", "CompositeExplicitAutograd")
def hadamard(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x @ kron(left, right)`` on the last dimension."""
    m, p = left.shape[0], right.shape[0]
    blocks = x.reshape(*x.shape[:-1], m, p).to(right.dtype)
    out = left.T @ blocks @ right if m > 1 else blocks @ right
    return out.reshape(x.shape).to(x.dtype)
