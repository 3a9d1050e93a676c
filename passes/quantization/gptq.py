"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

For a linear with inputs X, the layer-output error of a weight change D is tr(D H D^T) with
H = X^T X. Quantizing column i and compensating the rest optimally gives the update
W[:, i:] -= (w_i - q_i) / [H^-1]_ii * [H^-1]_i,i:, computed from the upper Cholesky factor of H^-1,
in blocks of columns so most of the work is matrix products. H is damped by a fraction of its
mean diagonal so the factorization exists.

Group parameters (int4): without act-order, each group's scale and zero are fitted to the
already-updated weights when its first column is reached; with act-order (columns by decreasing
Hessian diagonal) they are fitted up front on the original weights ("static groups"), so every
group keeps one scale and zero whatever order its columns are visited in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lqc.runtime.quantization.formats import INT4_OFFSET, fit_zero_points

MAX_CODE = 15


@dataclass
class GPTQResult:
    weight: torch.Tensor  # the quantized weight, dequantized [N, K]: exactly on the format's grid
    scales: torch.Tensor  # [N, K/g] (int4) or [N] (int8)
    zeros: torch.Tensor | None  # [N, K/g] (int4, lqc's convention w = (q - 8) * s + z)


def _int4_params(w: torch.Tensor, param_dtype: torch.dtype, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    # rounded to the dtype they are stored in, so the weights GPTQ compensates for are the stored ones
    lo, hi = w.amin(dim=dim), w.amax(dim=dim)
    s = ((hi - lo) / MAX_CODE).clamp(min=1e-8)
    return s.to(param_dtype).float(), (lo + INT4_OFFSET * s).to(param_dtype).float()


def _quant_int4(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    q = torch.clamp(torch.round((w - z) / s) + INT4_OFFSET, 0, MAX_CODE)
    return (q - INT4_OFFSET) * s + z


def _quant_int8(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / s), -127, 127) * s


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of the damped H^-1, mask of dead input columns)."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(5):
        try:
            chol = torch.linalg.cholesky(h)
            break
        except torch.linalg.LinAlgError:
            h += damp * (10**attempt) * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=h.dtype)
    else:
        raise torch.linalg.LinAlgError("the calibration Hessian is not positive definite even after damping")
    inverse = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inverse, upper=True).to(torch.float32), dead


@torch.no_grad()
def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    fmt: str,
    group_size: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    param_dtype: torch.dtype = torch.float16,
    group_params: tuple[torch.Tensor, torch.Tensor] | None = None,
    zero_point: str = "float",
) -> GPTQResult:
    """Quantize ``weight`` [N, K] (K a multiple of ``group_size`` for int4) given the mean input
    Hessian [K, K]. ``fmt``: "int4" (group-wise asymmetric) or "int8" (per-channel symmetric).
    ``group_params``: int4 (scales, zeros) [N, K/g] to use as static groups. ``zero_point``: int4
    zero points as ``fit_zero_points`` constrains them, applied before any column is rounded."""
    w = weight.to(torch.float32).clone()
    n, k = w.shape
    if fmt != "int8" and (fmt != "int4" or group_size <= 0 or k % group_size):
        raise ValueError(f"gptq supports int4 with a group size dividing {k}, or int8; got {fmt} g{group_size}")
    params = _Params.initial(w, fmt, group_size, act_order, param_dtype, group_params, zero_point)

    # Columns are visited in `order`; the factor is computed for H in that order.
    order = torch.argsort(torch.diag(hessian), descending=True) if act_order else torch.arange(k)
    hinv, dead = inverse_hessian_factor(hessian[order][:, order], damp)
    wt = w[:, order].T.contiguous()  # [K, N], row i = the i-th column visited
    wt[dead] = 0  # inputs that were always zero: their weights never matter
    visited = order.tolist()
    result = torch.zeros_like(wt)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        errors = _quantize_block(wt, start, end, hinv, visited, params, result)
        wt[end:] -= (errors.T @ hinv[start:end, end:]).T

    inverse_order = torch.argsort(order)
    if fmt == "int4":
        return GPTQResult(result.T[:, inverse_order], params.scales.T.contiguous(), params.zeros.T.contiguous())  # [N, G]
    return GPTQResult(result.T[:, inverse_order], params.scales, None)


@dataclass
class _Params:
    """The quantization parameters as GPTQ fills them in. Transposed: the loop visits one input
    column at a time, and a row of these is contiguous."""

    fmt: str
    group_size: int
    param_dtype: torch.dtype
    scales: torch.Tensor  # [G, N] (int4) or [N] (int8: per row, absmax)
    zeros: torch.Tensor | None  # [G, N] (int4)
    fitted: list[bool]  # int4: which groups have their parameters
    zero_point: str = "float"

    @staticmethod
    def initial(w, fmt, group_size, act_order, param_dtype, group_params, zero_point="float") -> "_Params":
        n, k = w.shape
        if fmt == "int8":
            return _Params(fmt, 0, param_dtype, (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8), None, [])
        groups = k // group_size
        params = _Params(fmt, group_size, param_dtype, torch.zeros(groups, n), torch.zeros(groups, n), [False] * groups, zero_point)
        if group_params is not None:  # static groups given by the caller
            scales, zeros = params.fit(*group_params)
            params.scales, params.zeros = scales.T.contiguous(), zeros.T.contiguous()
            params.fitted = [True] * groups
        elif act_order:  # static groups, fitted before any update
            for g in range(groups):
                params.scales[g], params.zeros[g] = params.fit(*_int4_params(w[:, g * group_size : (g + 1) * group_size], param_dtype))
            params.fitted = [True] * groups
        return params

    def fit(self, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int4 parameters as stored, in the zero-point mode asked for (float32 for the loop)."""
        scales, zeros = fit_zero_points(scales, zeros, self.zero_point, self.param_dtype)
        return scales.float(), zeros.float()


def _quantize_block(wt, start: int, end: int, hinv, visited: list[int], params: _Params, result) -> torch.Tensor:
    """Quantize the visited columns start..end into ``result``, compensating within the block;
    returns the block's scaled errors for the lazy update of the columns after it."""
    block = wt[start:end].clone()
    errors = torch.zeros_like(block)
    h_block = hinv[start:end, start:end]
    h_diag = h_block.diagonal().tolist()
    group_size = params.group_size
    for i in range(end - start):
        col = block[i]
        if params.fmt == "int4":
            g = visited[start + i] // group_size
            if not params.fitted[g]:  # first column of this group, in order: fit on updated weights
                first = start + i
                span = wt[first : first + group_size].clone()
                span[: end - first] = block[i : i + (end - first)][: span.shape[0]]
                params.scales[g], params.zeros[g] = params.fit(*_int4_params(span, params.param_dtype, dim=0))
                params.fitted[g] = True
            q = _quant_int4(col, params.scales[g], params.zeros[g])
        else:
            q = _quant_int8(col, params.scales)
        result[start + i] = q
        err = (col - q) / h_diag[i]
        block[i:] -= h_block[i, i:, None] * err[None, :]
        errors[i] = err
    return errors
