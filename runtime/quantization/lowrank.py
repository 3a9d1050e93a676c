"""Low-rank error compensation (EoRA): the factors, how they are stored, and what they add.

A compressed linear computes ``x @ Wc.T``; its error on the inputs it sees is ``x @ (W - Wc).T``.
EoRA (Liu et al., 2024) adds a rank-r path ``(x @ A.T) @ B.T`` that minimizes that error in the
eigenspace of the inputs: with the input second moment ``H = E[x x^T] = Q diag(l) Q^T``,

    min over rank-r M of  E || x @ (dW - M).T ||^2  =  || (dW Q diag(sqrt l)) - M Q diag(sqrt l) ||_F^2

so the best M is the rank-r truncated SVD of ``dW Q diag(sqrt l)``, mapped back by
``diag(1/sqrt l) Q^T``. A plain SVD of dW (no activations) would spend the rank on input
directions the layer never sees.

Factors are stored ``int8`` (``a`` int8 [r, K] with its row scales folded into ``b`` before ``b``
is quantized per row: ``b`` int8 [N, r] and ``scale`` [N]) or ``bf16`` (``a``, ``b`` bfloat16,
no scale). ``lowrank_residual`` is what ``lqc::qlinear`` adds when a qlinear carries factors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STORAGE = ("int8", "bf16")


@dataclass
class LowRankFactors:
    a: torch.Tensor  # [r, K]: int8 codes, or bfloat16
    b: torch.Tensor  # [N, r]: int8 codes, or bfloat16
    scale: torch.Tensor | None  # [N] float32 for int8 storage (b's row scales, a's folded in)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.a, self.b, self.scale) if t is not None)

    def product(self) -> torch.Tensor:
        """``B @ A`` [N, K] in float32: the weight correction the stored factors stand for."""
        b = self.b.to(torch.float32) * (self.scale[:, None] if self.scale is not None else 1.0)
        return b @ self.a.to(torch.float32)


def input_basis(hessian: torch.Tensor, rel_floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, sqrt l) of the inputs' second moment ``H = Q diag(l) Q^T`` [K, K], float64. Eigenvalues
    below ``rel_floor`` times the largest (directions the inputs never take, e.g. padding) are
    clamped so 1/sqrt stays finite; on those directions any correction costs nothing."""
    h = hessian.to(torch.float64)
    evals, evecs = torch.linalg.eigh((h + h.T) / 2)
    return evecs, evals.clamp(min=float(evals.max()) * rel_floor).sqrt()


def eora_factors(delta: torch.Tensor, hessian: torch.Tensor, rank: int,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [N, r], A [r, K]) float32 minimizing ``tr((dW - BA) H (dW - BA)^T)`` over rank-r BA.
    ``basis``: ``input_basis(hessian)`` when the caller has it (linears sharing an input)."""
    evecs, root = basis if basis is not None else input_basis(hessian)
    projected = delta.to(torch.float64) @ evecs * root  # dW Q diag(sqrt l)
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = (vh[:r] / root) @ evecs.T
    return b.to(torch.float32), a.to(torch.float32)


def store_factors(b: torch.Tensor, a: torch.Tensor, storage: str) -> LowRankFactors:
    """The factors in ``storage``: ``int8`` (symmetric per row, a's row scales folded into b) or ``bf16``."""
    if storage == "bf16":
        return LowRankFactors(a.to(torch.bfloat16).contiguous(), b.to(torch.bfloat16).contiguous(), None)
    if storage != "int8":
        raise ValueError(f"low-rank factors are stored as {' or '.join(STORAGE)}; got {storage!r}")
    a_scale = (a.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    a_codes = torch.round(a / a_scale[:, None]).clamp(-127, 127).to(torch.int8)
    b = b * a_scale[None, :]  # B A = (B diag(sa)) (A / sa)
    b_scale = (b.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    b_codes = torch.round(b / b_scale[:, None]).clamp(-127, 127).to(torch.int8)
    return LowRankFactors(a_codes.contiguous(), b_codes.contiguous(), b_scale.to(torch.float32))


def lowrank_residual(x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``(x2 @ A.T) @ B.T`` [rows, N] in float32 for stored factors (x2 [rows, K])."""
    y = (x2.to(torch.float32) @ a.to(torch.float32).T) @ b.to(torch.float32).T
    return y * scale if scale is not None else y
