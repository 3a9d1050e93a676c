"""HQQ: half-quadratic optimization of int4 zero points, no calibration data needed.

Round-to-nearest with min/max parameters minimizes nothing in particular. HQQ (Badri & Shaji,
2023) fits each group's zero point to minimize an lp (p < 1) norm of the weight error, which
favours getting most weights exactly right over spreading the error, by alternating:

    W_e = shrink_p(W - dequant(quant(W)))        (the sparse outlier part of the error)
    z   = mean(W_q - (W - W_e) / s)               (the zero that explains the rest)

with the proximal operator shrink_p(x) = sign(x) * relu(|x| - |x|^(p-1) / beta), and beta growing
each step. Scales stay those of min/max. Everything runs on all groups at once, in float32.
"""

from __future__ import annotations

import torch

from lqc.runtime.quantization.formats import INT4_OFFSET, int4_minmax_params

MAX_CODE = 15


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    return torch.sign(x) * torch.relu(x.abs() - (x.abs() + 1e-8).pow(p - 1) / beta)


@torch.no_grad()
def hqq_int4_params(
    weight: torch.Tensor, group_size: int, *, iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) per group of a [N, K] weight (K a multiple of the group), in lqc's int4
    convention ``w = (q - 8) * s + z``."""
    n, k = weight.shape
    w = weight.to(torch.float32).reshape(-1, group_size)
    scales, zeros_lqc = int4_minmax_params(weight, group_size)
    s = scales.reshape(-1, 1)
    z = INT4_OFFSET - zeros_lqc.reshape(-1, 1) / s  # HQQ's zero: w = s * (q - z)
    best_z, best_err = z.clone(), torch.full_like(z, float("inf"))
    for _ in range(iters):
        q = torch.clamp(torch.round(w / s + z), 0, MAX_CODE)
        err = w - (q - z) * s
        group_err = err.abs().mean(dim=1, keepdim=True)
        better = group_err < best_err
        best_err = torch.where(better, group_err, best_err)
        best_z = torch.where(better, z, best_z)
        w_e = _shrink(err, beta, p)
        z = torch.mean(q - (w - w_e) / s, dim=1, keepdim=True)
        beta *= kappa
    zeros = (INT4_OFFSET - best_z) * s
    return scales, zeros.reshape(n, k // group_size)
