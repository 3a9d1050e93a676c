"""Implementations of ``lqc::qlinear`` (schema in lqc.ir.lqc_ops): the reference math and the
fast CPU kernels torch ships.

The reference dequantizes the weight and multiplies in the activations' dtype: exact, and what
every kernel is tested against. The ``*_cpu`` formats use torch's packed CPU matmuls, which only
run fast with bfloat16 activations (20-25 us for a 1536x576 decode matmul, against 80 us dense
float32 and ~1 ms for their own float32 path), so activations are cast to bfloat16 around them.
For prefill-sized inputs (``INT8_CPU_GEMM_ROWS``) int8 weights go through the bf16 GEMM instead.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import lqc.ir.lqc_ops  # noqa: F401  (the schema must exist before an implementation registers)

from lqc.runtime.quantization.formats import QuantizedWeight, quantize_per_token_fp8, quantize_per_token_int8
from lqc.runtime.quantization.int4_int8_cpu import load_kernel, pack_int4_vnni, pack_w8a8_vnni, vnni_qlinear
from lqc.runtime.quantization.lowrank import lowrank_residual


def dequantize_qlinear_weight(qweight, scales, zeros, fmt: str, group_size: int, in_features: int) -> torch.Tensor:
    """The float32 weight [N, K_padded] a qlinear's constants stand for (reference layouts only)."""
    base = {"int8": "int8", "int8_cpu": "int8", "w8a8": "w8a8", "fp8": "fp8", "fp8_dyn": "fp8_dyn", "int4": "int4"}.get(fmt)
    if base is None:
        raise ValueError(f"no reference dequantization for the kernel layout {fmt!r}")
    padded = qweight.shape[1] * (2 if base == "int4" else 1)
    return QuantizedWeight(base, qweight, scales, zeros, group_size, padded).dequantize(torch.float32)


def qlinear_reference(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features,
                      lowrank_a=None, lowrank_b=None, lowrank_scale=None):
    y = _qlinear_reference(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features)
    return _add_lowrank(y, x, in_features, lowrank_a, lowrank_b, lowrank_scale)


def _qlinear_reference(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features):
    x2 = x.reshape(-1, in_features)
    if fmt in ("w8a8", "fp8_dyn"):
        q, s = quantize_per_token_int8(x2) if fmt == "w8a8" else quantize_per_token_fp8(x2)
        y = (q.to(torch.float32) @ qweight.to(torch.float32).T) * s * scales.to(torch.float32)
    else:
        weight = dequantize_qlinear_weight(qweight, scales, zeros, fmt, group_size, in_features)
        x2 = _pad(x2, weight.shape[1])
        y = x2.to(torch.float32) @ weight.T if x.dtype != torch.float64 else x2 @ weight.double().T
    return _finish(y, bias, x, out_features)


@torch.library.impl("lqc::qlinear", "CompositeExplicitAutograd")
def qlinear(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features,
            lowrank_a=None, lowrank_b=None, lowrank_scale=None):
    y = _qlinear(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features)
    return _add_lowrank(y, x, in_features, lowrank_a, lowrank_b, lowrank_scale)


def _add_lowrank(y, x, in_features, a, b, scale):
    """``y`` plus the low-rank compensation path, added in float32 (the factors are a few percent
    of the layer's work: r (K + N) multiply-adds a row)."""
    if a is None:
        return y
    residual = lowrank_residual(x.reshape(-1, in_features), a, b, scale)
    return (y.to(torch.float32) + residual.reshape(y.shape)).to(y.dtype)


def _qlinear(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features):
    x2 = x.reshape(-1, in_features)
    if fmt in ("int4_vnni", "w8a8_vnni"):
        return vnni_qlinear(x, qweight, bias, fmt, group_size, in_features, out_features)
    if fmt == "int4_cpu":
        k = qweight.shape[1] * 2
        y = torch._weight_int4pack_mm_for_cpu(_pad(x2, k).to(torch.bfloat16), qweight, group_size, scales)
    elif fmt == "int8_cpu" and x2.shape[0] >= INT8_CPU_GEMM_ROWS:
        # int8 codes are exact in bfloat16: one bf16 GEMM (float32 accumulation), scaled after
        y = (_pad(x2, qweight.shape[1]).to(torch.bfloat16) @ qweight.to(torch.bfloat16).T).float() * scales.float()
    elif fmt == "int8_cpu":
        y = torch._weight_int8pack_mm(_pad(x2, qweight.shape[1]).to(torch.bfloat16), qweight, scales)
    elif fmt == "w8a8" and x.device.type == "cpu":
        q, s = quantize_per_token_int8(x2)
        y = _int8_matmul(q, qweight) * s * scales.to(torch.float32)
    elif fmt == "fp8_dyn" and x.device.type == "cpu":
        q, s = quantize_per_token_fp8(x2)
        y = torch._scaled_mm(q, qweight.T, scale_a=s, scale_b=scales.to(torch.float32)[None, :], out_dtype=torch.float32)
    else:
        return _qlinear_reference(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features)
    return _finish(y, bias, x, out_features)


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch._int_mm needs more than 16 rows; decode steps have one, where float matmul of the
    # integer values is exact (|products| < 2^14, sums of at most a few thousand < 2^24).
    if a.shape[0] > 16:
        return torch._int_mm(a, b.T.contiguous()).to(torch.float32)
    return a.to(torch.float32) @ b.to(torch.float32).T


def _pad(x2: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - x2.shape[1]
    return F.pad(x2, (0, extra)) if extra > 0 else x2


def _finish(y: torch.Tensor, bias, x: torch.Tensor, out_features: int) -> torch.Tensor:
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_features)


# torch's CPU int8 kernel reads K in blocks of 32: other widths give wrong results or crash.
INT8_CPU_K_MULTIPLE = 32
# From this many rows of x on (prefill), that kernel is slower than converting the weight to
# bfloat16 and calling the bf16 GEMM: 2 threads, 128 x 576 x 1536 1.52 -> 0.99 ms, 512 rows
# 6.25 -> 2.47 ms, SmolLM2's 49,152-row lm_head at 512 rows 354 -> 159 ms; at 64 rows it is a tie.
INT8_CPU_GEMM_ROWS = 128


def int8_cpu_layout(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight padded with zero columns to a multiple of 32, bf16 scales) for ``_weight_int8pack_mm``."""
    from lqc.runtime.quantization.formats import pad_columns

    return pad_columns(weight.qweight, INT8_CPU_K_MULTIPLE).contiguous(), weight.scales.to(torch.bfloat16)


def int4_cpu_layout(weight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(qweight, scales_and_zeros) in the layout ``_weight_int4pack_mm_for_cpu`` reads."""
    from lqc.runtime.quantization.formats import unpack_int4

    codes = unpack_int4(weight.qweight).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack([weight.scales, weight.zeros], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros.to(torch.bfloat16)


KERNEL_LAYOUTS = ("int8", "int8_cpu", "int4", "int4_cpu", "int4_vnni", "w8a8", "w8a8_vnni", "fp8", "fp8_dyn")


def kernel_layout(weight: QuantizedWeight, kernel: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(qweight, scales, zeros) of ``weight`` laid out for the qlinear format ``kernel``: the
    canonical tensors, or the packed CPU layouts built from them (deterministically)."""
    if kernel == "int8_cpu" and weight.format == "int8":
        return (*int8_cpu_layout(weight), None)
    if kernel == "int4_cpu" and weight.format == "int4":
        return (*int4_cpu_layout(weight), None)
    if kernel == "int4_vnni" and weight.format == "int4":
        return pack_int4_vnni(weight), weight.scales.new_empty(0), None
    if kernel == "w8a8_vnni" and weight.format == "w8a8":
        return pack_w8a8_vnni(weight), weight.scales.new_empty(0), None
    if kernel == weight.format:
        return weight.qweight, weight.scales, weight.zeros
    raise ValueError(f"a {weight.format} weight has no {kernel!r} layout; valid layouts: {', '.join(KERNEL_LAYOUTS)}")


class QLinear(torch.nn.Module):
    """An eager module computing ``lqc::qlinear``: what lqc.load puts where a quantized linear was.

    Its buffers are the constants the quantize pass put in the graph, so a loaded model traces
    to the same graph the compressed one ran."""

    def __init__(self, weight: QuantizedWeight, kernel: str, bias: torch.Tensor | None = None):
        super().__init__()
        if kernel in ("int4_vnni", "w8a8_vnni") and (why := load_kernel()) is not None:
            # saved on a machine with AVX-512 VNNI, loaded on one without: torch's kernels instead
            kernel = "w8a8" if kernel == "w8a8_vnni" else "int4_cpu" if weight.out_features % 16 == 0 else "int4"
            warnings.warn(f"lqc.load: the int4_vnni kernel is unavailable ({why}); layers run {kernel} instead "
                          "(bf16 activations)", stacklevel=3)
        qweight, scales, zeros = kernel_layout(weight, kernel)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernel, self.group_size = kernel, weight.group_size
        self.in_features, self.out_features = weight.in_features, weight.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lqc.qlinear(
            x, self.qweight, self.scales, self.zeros, self.bias, self.kernel, self.group_size, self.in_features, self.out_features
        )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, group_size={self.group_size}"
