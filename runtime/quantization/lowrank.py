"""Low-rank error compensation (EoRA): the factors, how they are stored, and what they add.

A compressed linear computes ``x @ Wc.T``; its error on the inputs it sees is ``x @ (W - Wc).T``.
EoRA (Liu et al., 2024) adds a rank-r path ``(x @ A.T) @ B.T`` that minimizes that error in the
eigenspace of the inputs: with the input second moment ``H = E[x x^T] = L L^T``,

    min over rank-r M of  E || x @ (dW - M).T ||^2  =  || dW L - M L ||_F^2

so the best M is the rank-r truncated SVD of ``dW L``, mapped back by ``L^-1`` (EoRA writes L as
``Q diag(sqrt l)`` from H's eigendecomposition; any square root gives the same M). A plain SVD
of dW (no activations) would spend the rank on input directions the layer never sees.

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


def input_root(hessian: torch.Tensor, rel_floor: float = 1e-6) -> torch.Tensor:
    """``L`` (lower triangular, float64) with ``L L^T = H + d I``: a square root of the inputs'
    second moment [K, K] (float64; only its lower triangle is read). ``d`` starts at ``rel_floor``
    times H's largest diagonal entry, so directions the inputs never take (padding; fewer tokens
    than K) keep ``L`` invertible, and grows until the factorization succeeds; on those directions
    any correction costs nothing. (A Cholesky factor whitens as well as an eigendecomposition does,
    at a tenth of its time.) The damping goes onto H's diagonal in place and the diagonal is put
    back after, bit for bit: no K x K copy (a real model has hundreds of them)."""
    diagonal = hessian.diagonal()
    saved = diagonal.clone()
    damping = float(saved.max().clamp(min=1e-30)) * rel_floor
    for _ in range(8):
        diagonal += damping
        try:
            root, info = torch.linalg.cholesky_ex(hessian)
        finally:
            diagonal.copy_(saved)
        if int(info) == 0:
            return root
        damping *= 100
    raise ValueError("the inputs' second moment is not a finite positive semi-definite matrix (NaN or inf in the activations?)")


def eora_factors(delta: torch.Tensor, hessian: torch.Tensor, rank: int,
                 root: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B [N, r], A [r, K]) float32 minimizing ``tr((dW - BA) H (dW - BA)^T)`` over rank-r BA.
    ``root``: ``input_root(hessian)`` when the caller has it (linears sharing an input).

    The best BA is the rank-r truncated SVD of ``P = dW L`` mapped back by ``L^-1``. Only the top r
    singular vectors are needed, so they come from the eigenvectors of P's smaller Gram matrix:
    with P's top left singular vectors U_r the answer is ``U_r (U_r^T dW)``; with its top right
    ones V_r it is ``(dW L V_r) (V_r^T L^-1)``."""
    root = input_root(hessian.to(torch.float64)) if root is None else root
    delta = delta.to(torch.float64)
    projected = delta @ root  # P = dW L
    n, k = projected.shape
    r = min(rank, n, k)
    if n <= k:
        _, vectors = torch.linalg.eigh(projected @ projected.T)  # ascending: the top r are last
        u = vectors[:, -r:].flip(-1)
        b, a = u, u.T @ delta
    else:
        _, vectors = torch.linalg.eigh(projected.T @ projected)
        v = vectors[:, -r:].flip(-1)
        b = projected @ v
        a = torch.linalg.solve_triangular(root.T, v, upper=True).T  # V_r^T L^-1
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
