"""KIVI-style quantization of attention keys and values (Liu et al., 2024).

Keys have a few channels with large magnitudes on every token, so they are quantized per channel:
one scale and zero per (channel, block of ``group`` tokens). Values have no such channels and
are quantized per token: one scale and zero per (token, group of ``group`` channels). Both are
asymmetric min/max round to nearest with ``bits`` = 8, 4 or 2: ``x ~ code * scale + zero``,
code in [0, 2^bits - 1]. Codes are packed into uint8 along the head dimension (two int4 or four
int2 codes a byte, the first in the low bits); scales and zeros are stored in float16, as they
would be for a float16 model (their share of the bytes is what the size report counts).

Tensors are [batch, heads, tokens, head_dim], the layout Hugging Face caches use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KV_BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16


@dataclass
class QuantizedKV:
    """One quantized block of keys or values: codes [B, H, T, D * bits / 8] uint8, and scales and
    zeros broadcastable against [B, H, T, D] after ``expand_groups``."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    axis: str  # "channel" (keys: groups along tokens) or "token" (values: groups along channels)
    group: int

    @property
    def tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.zeros))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., D] (each < 2^bits) -> [..., D * bits / 8], the first code in the low bits."""
    if bits == 8:
        return codes.to(torch.uint8)
    per_byte = 8 // bits
    grouped = codes.to(torch.uint8).reshape(*codes.shape[:-1], codes.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of ``pack``: uint8 [..., D * bits / 8] -> codes [..., D]."""
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[..., None] >> shifts) & mask).reshape(*packed.shape[:-1], -1)


def check_kv_options(bits: int, group: int, head_dim: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV bits must be one of {', '.join(map(str, KV_BITS))}; got {bits}")
    if group < 1:
        raise ValueError(f"the KV group size must be positive; got {group}")
    if head_dim % (8 // bits if bits < 8 else 1):
        raise ValueError(f"head_dim {head_dim} does not pack into bytes at {bits} bits")
    if head_dim % min(group, head_dim):
        raise ValueError(
            f"values are quantized in groups of {group} channels, which do not divide head_dim {head_dim}; "
            f"use a group that divides {head_dim}, or one of at least {head_dim} (one group per head)"
        )


def _minmax(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    low = x.amin(dim=dim, keepdim=True)
    high = x.amax(dim=dim, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp_min(1e-8)
    # stored in float16: quantize against the stored values, so dequantization is exactly consistent
    return scale.to(SCALE_DTYPE).to(x.dtype), low.to(SCALE_DTYPE).to(x.dtype)


def quantize_keys(keys: torch.Tensor, bits: int) -> QuantizedKV:
    """Keys [B, H, T, D] -> per channel over all T tokens of the block (one scale/zero per channel)."""
    x = keys.to(torch.float32)
    scale, zero = _minmax(x, dim=-2, bits=bits)  # [B, H, 1, D]
    codes = torch.round((x - zero) / scale).clamp(0, 2**bits - 1)
    return QuantizedKV(pack(codes, bits), scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE), bits, "channel", keys.shape[-2])


def quantize_values(values: torch.Tensor, bits: int, group: int) -> QuantizedKV:
    """Values [B, H, T, D] -> per token, in groups of ``group`` channels (the whole head if larger)."""
    b, h, t, d = values.shape
    group = min(group, d)
    if d % group:
        raise ValueError(f"head_dim {d} is not a multiple of the value group size {group}")
    x = values.to(torch.float32).reshape(b, h, t, d // group, group)
    scale, zero = _minmax(x, dim=-1, bits=bits)  # [B, H, T, D/g, 1]
    codes = torch.round((x - zero) / scale).clamp(0, 2**bits - 1).reshape(b, h, t, d)
    return QuantizedKV(pack(codes, bits), scale[..., 0].to(SCALE_DTYPE), zero[..., 0].to(SCALE_DTYPE), bits, "token", group)


def dequantize(q: QuantizedKV, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    codes = unpack(q.codes, q.bits).to(dtype)
    if q.axis == "channel":
        return codes * q.scales.to(dtype) + q.zeros.to(dtype)
    b, h, t, d = codes.shape
    grouped = codes.reshape(b, h, t, d // q.group, q.group)
    return (grouped * q.scales.to(dtype)[..., None] + q.zeros.to(dtype)[..., None]).reshape(b, h, t, d)
