"""AWQ (Lin et al., 2023): activation-aware scales, then a clipping search, for int4 weights.

1. Scale search, per group of linears sharing one input x (q/k/v; gate/up; down): input
   channels that carry large activations matter most, so they are scaled up before quantization,
   ``W diag(s)``, and the producer of x absorbs ``1/s`` (lqc.passes.reparam.scale_migration). With
   ``s = mean|x|^alpha`` (normalized), alpha is chosen from a grid in [0, 1) by the error of the
   group's outputs on calibration rows: ``|| x W^T - (x / s) Q(W diag(s))^T ||^2``.
2. Clipping search, per output row and group: shrink the group's range to ``r`` times its
   largest magnitude before min/max quantization, r from 1 down to 0.5, keeping the r with the
   smallest output error on the calibration rows. Query and key projections are not clipped:
   attention scores are too sensitive to their outliers.
"""

from __future__ import annotations

import torch

from lqc.runtime.quantization.formats import INT4_OFFSET, int4_minmax_params, pad_columns

MAX_CODE = 15


def fake_quant_int4(weight: torch.Tensor, group_size: int, scales=None, zeros=None) -> torch.Tensor:
    """Quantize and dequantize a [N, K] weight (K a multiple of the group), float32."""
    n, k = weight.shape
    if scales is None:
        scales, zeros = int4_minmax_params(weight, group_size)
    w = weight.reshape(n, k // group_size, group_size)
    s, z = scales[..., None], zeros[..., None]
    q = torch.clamp(torch.round((w - z) / s) + INT4_OFFSET, 0, MAX_CODE)
    return ((q - INT4_OFFSET) * s + z).reshape(n, k)


@torch.no_grad()
def search_scales(
    x: torch.Tensor, x_abs_mean: torch.Tensor, weights: list[torch.Tensor], group_size: int, grid: int = 20
) -> tuple[torch.Tensor, float, list[float]]:
    """(s [K], chosen alpha, error per grid point) for linears ``weights`` [N_i, K] sharing input rows ``x`` [n, K]."""
    x = x.to(torch.float32)
    weights = [w.to(torch.float32) for w in weights]
    reference = [x @ w.T for w in weights]
    errors, best = [], (float("inf"), 0.0, torch.ones_like(x_abs_mean))
    for i in range(grid):
        alpha = i / grid
        s = x_abs_mean.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w, ref in zip(weights, reference):
            # widths the group does not divide are padded with zero columns, as when stored
            approx = pad_columns(x / s, group_size) @ fake_quant_int4(pad_columns(w * s, group_size), group_size).T
            err += float((approx - ref).pow(2).mean())
        errors.append(err)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], errors


@torch.no_grad()
def search_clipping(
    x: torch.Tensor, weight: torch.Tensor, group_size: int, ratios: int = 11, min_ratio: float = 0.5, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 (scales, zeros) [N, K/g] after a per-(row, group) search of the clipping ratio."""
    n, k = weight.shape
    groups = k // group_size
    xg = x.to(torch.float32).reshape(-1, groups, group_size)  # [t, G, g]
    best_scales = torch.empty(n, groups)
    best_zeros = torch.empty(n, groups)
    for start in range(0, n, chunk):  # rows in chunks bound the [t, rows, G] products
        w = weight[start : start + chunk].to(torch.float32).reshape(-1, groups, group_size)
        reference = torch.einsum("tGg,rGg->trG", xg, w)
        absmax = w.abs().amax(dim=-1)
        best_err = torch.full(absmax.shape, float("inf"))
        for i in range(ratios):
            r = 1.0 - i * (1.0 - min_ratio) / (ratios - 1)
            limit = (absmax * r)[..., None]
            clipped = torch.maximum(torch.minimum(w, limit), -limit)
            lo, hi = clipped.amin(dim=-1), clipped.amax(dim=-1)
            scales = ((hi - lo) / MAX_CODE).clamp(min=1e-8)
            zeros = lo + INT4_OFFSET * scales
            q = torch.clamp(torch.round((w - zeros[..., None]) / scales[..., None]) + INT4_OFFSET, 0, MAX_CODE)
            deq = (q - INT4_OFFSET) * scales[..., None] + zeros[..., None]
            err = (torch.einsum("tGg,rGg->trG", xg, deq) - reference).pow(2).sum(dim=0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            rows = slice(start, start + w.shape[0])
            best_scales[rows] = torch.where(better, scales, best_scales[rows])
            best_zeros[rows] = torch.where(better, zeros, best_zeros[rows])
    return best_scales, best_zeros


@torch.no_grad()
def search_clipping_hessian(
    hessian: torch.Tensor, weight: torch.Tensor, group_size: int, steps: int = 8, min_ratio: float = 0.6, chunk: int = 128,
    search: str = "grid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 (scales, zeros) [N, K/g] minimizing each (row, group)'s output error ``d H_G d^T``.

    The error of a weight change d confined to group G is exactly d H_G d^T, with H_G the group's
    diagonal block of the input Hessian: the statistics of every calibration token, where
    ``search_clipping`` sees a sample of rows. The low and high ends of the range shrink
    independently, which fits asymmetric groups better than one symmetric clip: ``search="grid"``
    tries all ``steps`` x ``steps`` pairs of shrink ratios; ``"coordinate"`` the ``steps`` low ends
    with the high end unshrunk, then the ``steps`` high ends with each group's best low end (2 x
    ``steps`` candidates: 4x less work at 8 steps)."""
    if search not in ("grid", "coordinate"):
        raise ValueError(f"search must be 'grid' or 'coordinate'; got {search!r}")
    n, k = weight.shape
    groups = k // group_size
    h = hessian.to(torch.float32)
    blocks = torch.stack([h[i * group_size : (i + 1) * group_size, i * group_size : (i + 1) * group_size] for i in range(groups)])
    ratios = [1.0 - i * (1.0 - min_ratio) / (steps - 1) for i in range(steps)]
    best_scales = torch.empty(n, groups)
    best_zeros = torch.empty(n, groups)
    for start in range(0, n, chunk):
        w = weight[start : start + chunk].to(torch.float32).reshape(-1, groups, group_size)  # [r, G, g]
        best = _RangeSearch(w, blocks)
        if search == "grid":
            for r_lo in ratios:
                for r_hi in ratios:
                    best.try_ratios(r_lo, r_hi)
        else:
            for r_lo in ratios:
                best.try_ratios(r_lo, 1.0)
            best_lo = best.r_lo.clone()
            for r_hi in ratios[1:]:
                best.try_ratios(best_lo, r_hi)
        best_scales[start : start + w.shape[0]] = best.scales
        best_zeros[start : start + w.shape[0]] = best.zeros
    return best_scales, best_zeros


class _RangeSearch:
    """The best int4 range found so far for each (row, group) of ``w`` [r, G, g], by ``d H_G d^T``."""

    def __init__(self, w: torch.Tensor, blocks: torch.Tensor):
        self.w, self.blocks = w, blocks
        self.lo_all, self.hi_all = w.amin(dim=-1), w.amax(dim=-1)
        self.lo0, self.hi0 = self.lo_all.clamp(max=0), self.hi_all.clamp(min=0)
        self.err = torch.full(self.lo_all.shape, float("inf"))
        self.scales, self.zeros = torch.empty_like(self.err), torch.empty_like(self.err)
        self.r_lo = torch.ones_like(self.err)

    def try_ratios(self, r_lo: float | torch.Tensor, r_hi: float) -> None:
        w, lo_all, hi_all = self.w, self.lo_all, self.hi_all
        # shrink towards zero for ranges that straddle it, towards the other end otherwise
        lo = torch.where(lo_all < 0, self.lo0 * r_lo, lo_all + (hi_all - lo_all) * (1 - r_lo))
        hi = torch.where(hi_all > 0, self.hi0 * r_hi, hi_all - (hi_all - lo_all) * (1 - r_hi))
        hi = torch.maximum(hi, lo + 1e-8)
        scales = ((hi - lo) / MAX_CODE).clamp(min=1e-8)
        zeros = lo + INT4_OFFSET * scales
        q = torch.clamp(torch.round((w - zeros[..., None]) / scales[..., None]) + INT4_OFFSET, 0, MAX_CODE)
        d = (q - INT4_OFFSET) * scales[..., None] + zeros[..., None] - w
        err = torch.einsum("rGg,Ggh,rGh->rG", d, self.blocks, d)
        better = err < self.err
        self.err = torch.where(better, err, self.err)
        self.scales = torch.where(better, scales, self.scales)
        self.zeros = torch.where(better, zeros, self.zeros)
        self.r_lo = torch.where(better, torch.as_tensor(r_lo, dtype=err.dtype).expand_as(err), self.r_lo)
