"""KIVI-style quantization of attention keys and values (Liu et al., 2024).

Keys have a few channels with large magnitudes on every token, so they are quantized per channel:
one scale and zero per (channel, block of ``group`` tokens). Values have no such channels and
are quantized per token: one scale and zero per (token, group of ``group`` channels). Both are
asymmetric min/max round to nearest with ``bits`` = 8, 4 or 2: ``x ~ code * scale + zero``,
code in [0, 2^bits - 1]. Codes are packed into uint8 along the head dimension (two int4 or four
int2 codes a byte, the first in the low bits); scales and zeros are stored in float16, as they
would be for a float16 model (their share of the bytes is what the size report counts).

Tensors are [batch, heads, tokens, head_dim], the layout Hugging Face caches use. One
``QuantizedKV`` holds any number of whole blocks, stacked along tokens, so a cache appends to it
and attention reads all of it in a few large operations (``key_scores``, ``mix_values``) that
fold the scales and zeros into the query and the attention weights instead of dequantizing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

KV_BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16


@dataclass
class QuantizedKV:
    """Quantized keys or values: codes [B, H, T, D * bits / 8] uint8, and float16 scales and zeros:
    [B, H, T / group, D] for keys ("channel": one per channel and block of ``group`` tokens),
    [B, H, T, D / group] for values ("token": one per token and group of ``group`` channels)."""

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

    def _scale_rows(self, start: int, stop: int) -> slice:
        return slice(start // self.group, stop // self.group) if self.axis == "channel" else slice(start, stop)

    def tokens_slice(self, start: int, stop: int) -> "QuantizedKV":
        """Tokens [start, stop): block boundaries for keys. Views, no copy."""
        rows = self._scale_rows(start, stop)
        return replace(self, codes=self.codes[..., start:stop, :], scales=self.scales[..., rows, :], zeros=self.zeros[..., rows, :])

    def clone(self) -> "QuantizedKV":
        return replace(self, codes=self.codes.clone(), scales=self.scales.clone(), zeros=self.zeros.clone())

    def append(self, other: "QuantizedKV") -> "QuantizedKV":
        return replace(self, **{name: torch.cat([getattr(self, name), getattr(other, name)], dim=-2)
                                for name in ("codes", "scales", "zeros")})

    def index_batch(self, index: torch.Tensor) -> "QuantizedKV":
        return replace(self, **{name: getattr(self, name).index_select(0, index) for name in ("codes", "scales", "zeros")})


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
    if min(group, head_dim) % (8 // bits):
        raise ValueError(f"a value group of {group} channels splits a byte of {8 // bits} {bits}-bit codes; use a multiple of {8 // bits}")
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


def quantize_keys(keys: torch.Tensor, bits: int, group: int | None = None) -> QuantizedKV:
    """Keys [B, H, T, D] -> per channel over each block of ``group`` tokens (default: all T)."""
    b, h, t, d = keys.shape
    group = group or t
    if t % group:
        raise ValueError(f"keys are quantized in whole blocks of {group} tokens; got {t} tokens")
    x = keys.to(torch.float32).reshape(b, h, t // group, group, d)
    scale, zero = _minmax(x, dim=-2, bits=bits)  # [B, H, T/g, 1, D]
    codes = torch.round((x - zero) / scale).clamp(0, 2**bits - 1).reshape(b, h, t, d)
    return QuantizedKV(pack(codes, bits), scale[..., 0, :].to(SCALE_DTYPE), zero[..., 0, :].to(SCALE_DTYPE), bits, "channel", group)


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
    b, h, t, d = codes.shape
    if q.axis == "channel":
        blocks = codes.reshape(b, h, t // q.group, q.group, d)
        return (blocks * q.scales.to(dtype)[..., None, :] + q.zeros.to(dtype)[..., None, :]).reshape(b, h, t, d)
    grouped = codes.reshape(b, h, t, d // q.group, q.group)
    return (grouped * q.scales.to(dtype)[..., None] + q.zeros.to(dtype)[..., None]).reshape(b, h, t, d)


def _shifted_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., T, P] -> float32 [..., T, n, P], n = 8 / bits codes a byte: S_k = byte >> (bits * k).

    Code k of a byte is S_k - 2^bits S_(k+1) (S_n = 0). A matmul against the S_k, with its
    weights or results corrected by that identity, is the matmul against the codes, without
    masking each code out: a shift and a conversion per code of a byte instead of a full unpack.
    (Stacking the S_k as the second-last axis is cheaper than interleaving them in channel order.)
    """
    per_byte = 8 // bits
    if per_byte == 1:
        return packed.to(torch.float32)[..., None, :]
    return torch.stack([packed, *(packed >> (bits * k) for k in range(1, per_byte))], dim=-2).to(torch.float32)


def key_scores(query: torch.Tensor, keys: QuantizedKV) -> torch.Tensor:
    """query [B, H, R, D] float32 -> query . key for every quantized key: [B, H, R, T].

    Per block, q . (code * s + z) = (q * s) . code + q . z: the block's scales go into the query
    (R rows, not T tokens) and the codes enter the matmul as small integers, never dequantized.
    """
    b, h, r, d = query.shape
    per_byte, blocks = 8 // keys.bits, keys.tokens // keys.group
    scaled = query[:, :, None] * keys.scales.to(torch.float32)[:, :, :, None, :]  # [B, H, blocks, R, D]
    scaled = scaled.reshape(b, h, blocks, r, d // per_byte, per_byte)
    weights = scaled.clone()  # the weight of S_k is a_k - 2^bits a_(k-1)
    weights[..., 1:] -= (1 << keys.bits) * scaled[..., :-1]
    weights = weights.transpose(-1, -2).reshape(b, h, blocks, r, d)  # the S_k's order: k major
    shifted = _shifted_codes(keys.codes, keys.bits).reshape(b, h, blocks, keys.group, d)
    scores = weights @ shifted.transpose(-1, -2)  # [B, H, blocks, R, group]
    scores = scores + (query @ keys.zeros.to(torch.float32).transpose(-1, -2)).transpose(-1, -2)[..., None]
    return scores.transpose(2, 3).reshape(b, h, r, keys.tokens)


def mix_values(weights: torch.Tensor, values: QuantizedKV) -> torch.Tensor:
    """Attention weights [B, H, R, T] float32 -> weights @ values: [B, H, R, D].

    Per token and channel group, sum_t p_t (code_t * s_t + z_t) = sum_t (p_t s_t) code_t + sum_t p_t z_t:
    the scales go into the weights and the codes are read as small integers.
    """
    b, h, r, t = weights.shape
    per_byte, bytes_ = 8 // values.bits, values.codes.shape[-1]
    groups = bytes_ * per_byte // values.group
    scales, zeros = values.scales.to(torch.float32), values.zeros.to(torch.float32)  # [B, H, T, groups]
    shifted = _shifted_codes(values.codes, values.bits)  # [B, H, T, n, bytes]
    shifted = shifted.reshape(b, h, t, per_byte, groups, bytes_ // groups).permute(0, 1, 4, 2, 3, 5)
    scaled = (weights[..., None] * scales[:, :, None]).permute(0, 1, 4, 2, 3)  # [B, H, groups, R, T]
    mixed = (scaled @ shifted.reshape(b, h, groups, t, -1)).reshape(b, h, groups, r, per_byte, bytes_ // groups)
    codes = mixed.clone()  # weights @ code_k = weights @ S_k - 2^bits weights @ S_(k+1)
    codes[..., :-1, :] -= (1 << values.bits) * mixed[..., 1:, :]
    out = codes.transpose(-1, -2) + (weights @ zeros).transpose(-1, -2)[..., None, None]  # [B, H, groups, R, bytes/g, n]
    return out.permute(0, 1, 3, 2, 4, 5).reshape(b, h, r, bytes_ * per_byte)
