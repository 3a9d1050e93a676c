"""Packed weight formats for quantized linears, and their reference (de)quantization.

A quantized weight is stored in a canonical, kernel-independent layout (what ``lqc.save`` writes):

| format | qweight | scales | zeros | dequantized weight |
| --- | --- | --- | --- | --- |
| ``int8`` | int8 [N, K] | [N] | - | ``q * s`` (symmetric, per output channel) |
| ``int4`` | uint8 [N, K/2], two per byte, low nibble first | [N, K/g] | [N, K/g] | ``(q - 8) * s + z`` per group of g inputs |
| ``w8a8`` | int8 [N, K] | [N] | - | as int8; activations quantized per token at run time |
| ``fp8`` | float8_e4m3fn [N, K] | [N] | - | ``q * s`` |
| ``fp8_dyn`` | float8_e4m3fn [N, K] | [N] | - | as fp8; activations quantized to fp8 per token at run time |

int4 uses torch's CPU int4 convention (``_weight_int4pack_mm_for_cpu``): unsigned codes 0..15,
offset 8, a float zero point per group. Engines with integer zero points (compressed-tensors:
``w = (c - 8 - zp) * s``) hold it exactly when ``z = -zp * s`` for an integer zp in -8..7, or
``z = 0`` (symmetric): ``fit_zero_points`` constrains a method's parameters to those. ``K`` may be padded up to a multiple of the group size
with zero columns; ``in_features`` keeps the true width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4", "w8a8", "fp8", "fp8_dyn")
ZERO_POINTS = ("float", "integer", "symmetric")  # int4 zero points: lqc's own, integer multiples of the scale, none
INT4_OFFSET = 8
FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass
class QuantizedWeight:
    format: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int  # inputs per scale; 0 means one scale per output channel
    in_features: int  # K before padding

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def padded_in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.format == "int4" else 1)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, in_features] this format stands for."""
        if self.format == "int4":
            codes = unpack_int4(self.qweight).to(torch.float32) - INT4_OFFSET
            scales = self.scales.to(torch.float32).repeat_interleave(self.group_size, dim=1)
            zeros = self.zeros.to(torch.float32).repeat_interleave(self.group_size, dim=1)
            weight = codes * scales + zeros
        else:
            weight = self.qweight.to(torch.float32) * self.scales.to(torch.float32)[:, None]
        return weight[:, : self.in_features].to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] (K even) -> [N, K/2], element 2i in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def pad_columns(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero columns up to a multiple of ``multiple`` (a zero column times any input adds nothing)."""
    extra = (-weight.shape[1]) % multiple
    if not extra:
        return weight
    return torch.cat([weight, weight.new_zeros(weight.shape[0], extra)], dim=1)  # F.pad refuses int8


def quantize_int8(
    weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32, fmt: str = "int8", scales: torch.Tensor | None = None
) -> QuantizedWeight:
    """Symmetric per-output-channel int8: absmax scales (RTN) unless a method passes its own."""
    w = weight.to(torch.float32)
    if scales is None:
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    # Round with the stored scale, so dequantization uses exactly the scale the codes were made for.
    scales = scales.to(scale_dtype)
    q = torch.round(w / scales.to(torch.float32)[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(fmt, q, scales, None, 0, weight.shape[1])


def int4_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Round-to-nearest codes 0..15 for given per-group scales and zeros: q = round((w - z) / s) + 8."""
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)
    z = zeros.to(torch.float32).repeat_interleave(group_size, dim=1)
    return (torch.round((weight.to(torch.float32) - z) / s) + INT4_OFFSET).clamp(0, 15).to(torch.uint8)


def int4_minmax_params(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min/max scales and zeros per group of a [N, K] weight (K a multiple of the group)."""
    n, k = weight.shape
    groups = weight.to(torch.float32).reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    zeros = lo + INT4_OFFSET * scales
    return scales, zeros


def quantize_int4(
    weight: torch.Tensor,
    group_size: int,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
    param_dtype: torch.dtype = torch.float16,
    zero_point: str = "float",
) -> QuantizedWeight:
    """Group-wise int4. Scales and zeros default to each group's min/max (RTN); methods such as
    HQQ, AWQ's clipping search or GPTQ pass their own. ``zero_point`` (ZERO_POINTS) constrains them
    (``fit_zero_points``) before the codes are rounded."""
    in_features = weight.shape[1]
    w = pad_columns(weight.to(torch.float32), group_size)
    if scales is None or zeros is None:
        scales, zeros = int4_minmax_params(w, group_size)
    scales, zeros = fit_zero_points(scales, zeros, zero_point, param_dtype)
    codes = int4_codes(w, scales, zeros, group_size)
    return QuantizedWeight("int4", pack_int4(codes), scales, zeros, group_size, in_features)


def fit_zero_points(
    scales: torch.Tensor, zeros: torch.Tensor, mode: str, param_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 (scales, zeros) in ``param_dtype``, constrained to ``mode``:

    - ``float``: as given (lqc's own kernels take any zero point);
    - ``integer``: ``z = -zp * s`` with zp = round(-z / s) in -8..7 (the grid moves by at most half a
      step; what an integer-zero-point engine stores as zp);
    - ``symmetric``: ``z = 0``, with the smallest scale whose codes -8..7 still cover the range
      [z - 8s, z + 7s] the method chose (its clipping kept). Parameters already of the mode stay.
    The result satisfies ``zero_point_problem`` for the mode. Rounded to ``param_dtype`` first, so
    the zero point is fitted to the scale as stored."""
    if mode not in ZERO_POINTS:
        raise ValueError(f"zero_point must be one of {ZERO_POINTS}; got {mode!r}")
    s, z = scales.to(param_dtype).float(), zeros.to(param_dtype).float()
    if mode == "integer":
        zp = torch.round(-z / s).clamp(-INT4_OFFSET, INT4_OFFSET - 1)
        z = -zp * s
    elif mode == "symmetric":
        lo, hi = z - INT4_OFFSET * s, z + (INT4_OFFSET - 1) * s
        fitted = torch.maximum(-lo / INT4_OFFSET, hi / (INT4_OFFSET - 1)).clamp(min=1e-8)
        s = torch.where(z == 0, s, fitted).to(param_dtype).float()
        z = torch.zeros_like(z)
    return s.to(param_dtype), z.to(param_dtype)


def integer_zero_points(q: QuantizedWeight) -> torch.Tensor | None:
    """int4 zero points zp (int8, -8..7, ``w = (c - 8 - zp) * s``) if every group's float zero is
    ``-zp * s`` as stored (``fit_zero_points`` with ``integer`` or ``symmetric``); None otherwise."""
    s, z = q.scales.float(), q.zeros.float()
    zp = torch.round(-z / s)
    exact = (zp >= -INT4_OFFSET) & (zp <= INT4_OFFSET - 1) & ((-zp * s).to(q.zeros.dtype) == q.zeros)
    return zp.to(torch.int8) if bool(exact.all()) else None


def quantize_fp8(weight: torch.Tensor, scale_dtype: torch.dtype = torch.float32, fmt: str = "fp8") -> QuantizedWeight:
    """float8 e4m3 weights with a per-output-channel scale mapping each row's max to 448."""
    w = weight.to(torch.float32)
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12).to(scale_dtype)
    q = (w / scales.to(torch.float32)[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedWeight(fmt, q, scales, None, 0, weight.shape[1])


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic float8 e4m3 activations, one scale per token mapping its max to 448."""
    scales = (x.abs().amax(dim=-1, keepdim=True).to(torch.float32) / FP8_MAX).clamp(min=1e-12)
    q = (x.to(torch.float32) / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scales


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 quantization of activations, one scale per token (row)."""
    scales = (x.abs().amax(dim=-1, keepdim=True).to(torch.float32) / 127.0).clamp(min=1e-8)
    q = torch.round(x.to(torch.float32) / scales).clamp(-127, 127).to(torch.int8)
    return q, scales
