"""One linear weight -> its canonical quantized form, by method: round to nearest, HQQ, GPTQ.

Each handler takes the quantize pass's options and a float weight [N, K] and returns a
``QuantizedWeight`` in the canonical layout of lqc.runtime.quantization.formats; how a target lays
it out for its kernels is a lowering's business (lqc.passes.lowering).
"""

from __future__ import annotations

import torch

from lqc.runtime.quantization.formats import (
    INT4_OFFSET, QuantizedWeight, fit_zero_points, int4_codes, int4_minmax_params, pad_columns, quantize_fp8, quantize_int4, quantize_int8,
)

from lqc.passes.quantization.awq import search_clipping, search_clipping_hessian
from lqc.passes.quantization.gptq import gptq
from lqc.passes.quantization.hqq import hqq_int4_params
from lqc.passes.quantization.refit import refit_int4_params, row_errors


def quantize_weight(opts, weight: torch.Tensor, input_stats=None) -> QuantizedWeight:
    """``weight`` in ``opts.format`` by ``opts.method`` (not awq: that one migrates scales first,
    lqc.passes.quantization.migration). ``input_stats()`` gives the layer's calibration statistics
    (gptq only)."""
    if opts.method == "gptq":
        return gptq_weight(opts, weight, input_stats())
    if opts.method == "hqq":
        return hqq_weight(opts, weight)
    return round_to_nearest(opts.format, weight, opts.group_size, opts.zero_point)


def round_to_nearest(fmt: str, weight: torch.Tensor, group_size: int, zero_point: str = "float") -> QuantizedWeight:
    """Min/max (int4) or absmax (int8, w8a8, fp8, fp8_dyn) parameters, codes rounded to nearest."""
    if fmt == "int4":
        return quantize_int4(weight, group_size, zero_point=zero_point)
    if fmt in ("fp8", "fp8_dyn"):
        return quantize_fp8(weight, fmt=fmt)
    return quantize_int8(weight, fmt=fmt)


def hqq_weight(opts, weight: torch.Tensor) -> QuantizedWeight:
    """int4 with HQQ's optimized zero points (no data needed)."""
    padded = pad_columns(weight.to(torch.float32), opts.group_size)
    scales, zeros = hqq_int4_params(padded, opts.group_size, iters=opts.hqq_iters)
    return quantize_int4(weight, opts.group_size, scales, zeros, zero_point=opts.zero_point)


def gptq_weight(opts, weight: torch.Tensor, stats, hessian: torch.Tensor | None = None,
                x: torch.Tensor | None = None, clip: bool = True) -> QuantizedWeight:
    """GPTQ on the layer's mean input Hessian (``hessian`` overrides it: AWQ's scaled inputs).
    int4 static group parameters come from ``opts.gptq_params``; ``clip`` False (a layer feeding
    attention scores) keeps min/max ones."""
    k = weight.shape[1]
    group = opts.group_size if opts.format == "int4" else 0
    padded = pad_columns(weight.to(torch.float32), group) if group else weight.to(torch.float32)
    full = torch.zeros(padded.shape[1], padded.shape[1], dtype=torch.float64)
    full[:k, :k] = stats.mean_hessian if hessian is None else hessian  # padded inputs are always zero: dead columns
    group_params = None
    if group and opts.gptq_params == "clip":
        x = stats.sample if x is None else x
        group_params = search_clipping(pad_columns(x, group), padded, group) if clip else int4_minmax_params(padded, group)
    elif group and opts.gptq_params == "mse":
        group_params = search_clipping_hessian(full, padded, group, search=opts.mse_search) if clip else int4_minmax_params(padded, group)
    result = gptq(padded, full, fmt=opts.format, group_size=group, block_size=opts.block_size,
                  damp=opts.damp, act_order=opts.act_order, group_params=group_params, zero_point=opts.zero_point)
    if opts.format == "int4":
        scales, zeros = result.scales, result.zeros
        if opts.gptq_refit:
            scales, zeros, result.weight = refit_rounds(opts, padded, full, result)
        return quantize_int4(result.weight[:, :k], group, scales, zeros, zero_point=opts.zero_point)
    return quantize_int8(result.weight, scales=result.scales)


def refit_rounds(opts, weight: torch.Tensor, hessian: torch.Tensor, result):
    """``opts.refit_rounds`` rounds of: refit the parameters to the codes, then (before the next
    round) GPTQ again with the refitted parameters as its static groups. Each row keeps its best
    round's (scales, zeros, weight): rows are independent in the layer's output error."""
    group = opts.group_size
    best = refit_gptq_params(weight, hessian, result, group, opts.zero_point)
    for _ in range(opts.refit_rounds - 1):
        again = gptq(weight, hessian, fmt="int4", group_size=group, block_size=opts.block_size, damp=opts.damp,
                     act_order=opts.act_order, group_params=(best[0].float(), best[1].float()), zero_point=opts.zero_point)
        candidate = refit_gptq_params(weight, hessian, again, group, opts.zero_point)
        better = row_errors(weight, hessian, candidate[2]) < row_errors(weight, hessian, best[2])
        best = tuple(torch.where(better[:, None], new, old) for new, old in zip(candidate, best))
    return best


def refit_gptq_params(weight: torch.Tensor, hessian: torch.Tensor, result, group: int, zero_point: str):
    """GPTQ's int4 codes with the (scales, zeros) that fit them best (lqc.passes.quantization.refit),
    and the weight they dequantize to."""
    codes = int4_codes(result.weight, result.scales, result.zeros, group)
    scales, zeros = refit_int4_params(weight, hessian, codes, result.scales, result.zeros, group,
                                      fit_zeros=zero_point == "float")
    scales, zeros = fit_zero_points(scales, zeros, zero_point)
    s, z = (t.to(torch.float32).repeat_interleave(group, dim=1) for t in (scales, zeros))
    return scales, zeros, (codes.to(torch.float32) - INT4_OFFSET) * s + z


def fake_quantize(opts, weight: torch.Tensor) -> torch.Tensor:
    """Round to nearest in the pass's format, dequantized: the sensitivity proxy."""
    return round_to_nearest(opts.format, weight, opts.group_size, opts.zero_point).dequantize()
