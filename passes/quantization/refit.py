"""Refit int4 group scales and zeros to GPTQ's codes: the best parameters for the codes it chose.

GPTQ picks each group's scale and zero before it rounds (static groups, from a range search), then
chooses the codes column by column, pushing rounding errors onto later columns. Once the codes are
fixed, the layer's output error is a quadratic in the parameters: with centered codes c = q - 8,
the weight is w_hat = c * s_g + z_g on group g, and for one output row

    err(s, z) = (w - w_hat) H (w - w_hat)^T,     H = the mean input Hessian,

is minimized by one small linear solve over that row's 2G unknowns (G groups; groups are coupled
through H's off-diagonal blocks, so the solve is per row, not per group). This is the closed-form
version of what AutoRound and OmniQuant tune by gradient descent, for the codes GPTQ already has.

Zero-point modes other than ``float`` tie z to s (``integer``: z = -zp * s; ``symmetric``: z = 0):
there the weight is (c - zp) * s_g, and only the scales are refitted.
"""

from __future__ import annotations

import torch

from lqc.runtime.quantization.formats import INT4_OFFSET


def refit_int4_params(
    weight: torch.Tensor, hessian: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
    group_size: int, *, fit_zeros: bool = True, param_dtype: torch.dtype = torch.float16, ridge: float = 1e-4,
    chunk: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) [N, G] in ``param_dtype`` for the int4 ``codes`` [N, K] (0..15) of the float
    ``weight`` [N, K] (K a multiple of ``group_size``), minimizing each row's ``d H d^T``.

    ``scales``/``zeros``: the parameters the codes were chosen with. The solve is pulled towards them
    by ``ridge`` times the mean diagonal of each row's system, so a group the inputs never reach (H
    zero there) keeps them. A row keeps its old parameters unless the refitted ones, as stored in
    ``param_dtype``, lower its error and keep every scale positive. ``fit_zeros`` False: the
    zero points stay ``-zp * s`` (zp = -z / s, kept) and only scales are refitted."""
    n = weight.shape[0]
    h = hessian.to(torch.float64)
    old_s, old_z = scales.to(torch.float64), zeros.to(torch.float64)
    centered = codes.to(torch.float64) - INT4_OFFSET
    if not fit_zeros:  # w_hat = (c + z/s) * s: the zero point moves with the scale
        centered = centered + (old_z / old_s).repeat_interleave(group_size, dim=1)
    new_s, new_z = old_s.clone(), old_z.clone()
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        s, z = _solve_rows(weight[rows].to(torch.float64), h, centered[rows], old_s[rows], old_z[rows], group_size, fit_zeros, ridge)
        s, z = s.to(param_dtype).to(torch.float64), z.to(param_dtype).to(torch.float64)
        before = _row_errors(weight[rows], h, centered[rows], old_s[rows], old_z[rows] if fit_zeros else None, group_size)
        after = _row_errors(weight[rows], h, centered[rows], s, z if fit_zeros else None, group_size)
        better = (after < before) & (s > 0).all(dim=1)
        new_s[rows] = torch.where(better[:, None], s, old_s[rows])
        new_z[rows] = torch.where(better[:, None], z, old_z[rows])
    if not fit_zeros:
        new_z = old_z / old_s * new_s  # the same integer (or zero) zero point, on the new scale
    return new_s.to(param_dtype), new_z.to(param_dtype)


def _solve_rows(w, h, c, s0, z0, group_size: int, fit_zeros: bool, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares (s, z) [r, G] of each row, by the normal equations M theta = b.

    With C_g the row's centered codes on group g and H_gh H's blocks, the system's blocks are
    ``M_ss[g, h] = C_g H_gh C_h^T``, ``M_sz[g, h] = C_g H_gh 1``, ``M_zz[g, h] = 1 H_gh 1`` and
    ``b_s[g] = C_g (H w)_g``, ``b_z[g] = 1 (H w)_g``."""
    r, k = w.shape
    groups = k // group_size
    cg = c.reshape(r, groups, group_size)
    # T[r, g, :] = C_g H[g, :]: one batched product over groups, r x K x K work in all
    t = torch.bmm(cg.transpose(0, 1), h.reshape(groups, group_size, k)).transpose(0, 1)  # [r, G, K]
    t = t.reshape(r, groups, groups, group_size)
    hw = (w @ h).reshape(r, groups, group_size)
    m_ss = torch.einsum("rghj,rhj->rgh", t, cg)
    b_s = (cg * hw).sum(-1)
    if fit_zeros:
        m_sz = t.sum(-1)  # [r, g, h]
        m_zz = h.reshape(groups, group_size, groups, group_size).sum((1, 3)).expand(r, groups, groups)
        m = torch.cat([torch.cat([m_ss, m_sz], 2), torch.cat([m_sz.transpose(1, 2), m_zz], 2)], 1)
        b = torch.cat([b_s, hw.sum(-1)], 1)
        theta0 = torch.cat([s0, z0], 1)
    else:
        m, b, theta0 = m_ss, b_s, s0
    lam = ridge * m.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-30)  # [r]
    eye = torch.eye(m.shape[1], dtype=m.dtype)
    theta = torch.linalg.solve(m + lam[:, None, None] * eye, b + lam[:, None] * theta0)
    return (theta[:, :groups], theta[:, groups:]) if fit_zeros else (theta, z0)


def _row_errors(w, h, c, s, z, group_size: int) -> torch.Tensor:
    """Each row's output error [r] for the weight ``c * s (+ z)`` per group."""
    w_hat = c * s.repeat_interleave(group_size, dim=1)
    if z is not None:
        w_hat = w_hat + z.repeat_interleave(group_size, dim=1)
    return row_errors(w, h, w_hat)


def row_errors(weight: torch.Tensor, hessian: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Each row's output error ``d H d^T`` [N] (float64) of replacing ``weight`` by ``quantized``."""
    d = quantized.to(torch.float64) - weight.to(torch.float64)
    return ((d @ hessian.to(torch.float64)) * d).sum(-1)
