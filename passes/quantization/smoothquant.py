"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before W8A8.

Per-token int8 activations lose the small channels of a row whenever one channel of that row is
an outlier. Per group of linears sharing one input x, SmoothQuant divides every input channel by

    s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)

and multiplies the weights' columns by the same s (lqc.passes.reparam.scale_migration: the producer of x
absorbs ``1/s``, an exact reparameterization), so activations and weights share the range.
alpha is a fixed strength (0.5 in the paper), or chosen from a grid by the error of the group's
W8A8 outputs on calibration rows, ``|| x W^T - Q(x / s) Q(W diag(s))^T ||^2``.
"""

from __future__ import annotations

import torch

from lqc.runtime.quantization.formats import quantize_int8, quantize_per_token_int8


def smoothing_scales(x_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] for linears ``weights`` [N_i, K] whose shared input has per-channel max ``x_abs_max``."""
    w_abs_max = torch.stack([w.to(torch.float32).abs().amax(dim=0) for w in weights]).amax(dim=0)
    s = x_abs_max.to(torch.float32).clamp(min=1e-5).pow(alpha) / w_abs_max.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-5)


def fake_quant_w8a8(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Q(x) Q(W)^T`` in float32: per-token int8 activations, per-channel int8 weights."""
    q, s = quantize_per_token_int8(x)
    return (q.to(torch.float32) * s) @ quantize_int8(weight, fmt="w8a8").dequantize(torch.float32).T


@torch.no_grad()
def search_smoothing(
    x: torch.Tensor, x_abs_max: torch.Tensor, weights: list[torch.Tensor], alpha: float | None = None, grid: int = 20
) -> tuple[torch.Tensor, float | None, list[float]]:
    """(s [K], alpha (None: no smoothing won), error per candidate). A given ``alpha`` is used as is (no errors)."""
    if alpha is not None:
        return smoothing_scales(x_abs_max, weights, alpha), alpha, []
    x = x.to(torch.float32)
    weights = [w.to(torch.float32) for w in weights]
    reference = [x @ w.T for w in weights]
    errors, best = [], (float("inf"), None, torch.ones_like(x_abs_max))
    # None (no smoothing) is a candidate: the search never does worse than leaving x alone
    for candidate in [None] + [i / grid for i in range(1, grid)]:
        s = torch.ones_like(x_abs_max) if candidate is None else smoothing_scales(x_abs_max, weights, candidate)
        err = sum(float((fake_quant_w8a8(x / s, w * s) - ref).pow(2).mean()) for w, ref in zip(weights, reference))
        errors.append(err)
        if err < best[0]:
            best = (err, candidate, s)
    return best[2], best[1], errors
