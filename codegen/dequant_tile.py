"""The Triton building blocks of the dequantize-GEMM kernels: ``dequant_gemm_tile`` computes one
fp32 [BLOCK_M, BLOCK_N] tile of ``x' @ W.T`` for every canonical weight format (x' being x, or x
RMS-normalized and/or quantized per token), and the helpers it is made of.

``lqc.codegen.dequant_gemm``'s kernel and the kernels ``lqc.codegen.qlinear_kernels`` generates
call it and add what they need around it (bias, split-K, an epilogue). The formats, and why these
functions call only ``tl`` builtins, are in ``lqc.codegen.dequant_gemm``'s docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

# lqc.runtime.quantization.formats.INT4_OFFSET: codes 0..15 stand for -8..7 (a constexpr: jit code may
# only read globals that are)
INT4_OFFSET = tl.constexpr(8)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _rint(v):
    """Round half to even, as torch.round, for |v| < 2**22: adding 1.5 * 2**23 leaves no fraction
    bits in an fp32, so the add rounds (to nearest even) and the subtraction is exact. Builtins
    only (no libdevice), so it runs under the interpreter and on any GPU alike."""
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3(v):
    """v (|v| <= 448) rounded to the nearest float8 e4m3fn value, ties to even: torch's
    ``.to(torch.float8_e4m3fn)``. By arithmetic, not a cast: the interpreter's fp32 -> fp8 cast
    does not carry a rounded-up mantissa into the exponent (127 -> 64)."""
    exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # subnormals: the smallest normal's spacing
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    return _rint(v / step) * step


@triton.jit
def _round_to_bf16(v):
    """fp32 v rounded to the nearest bfloat16 (ties to even), kept in fp32. By integer arithmetic:
    the interpreter's fp32 -> bf16 cast truncates (see FP32_DOT in dequant_gemm_tile)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536: 0xFFFF0000 as an int32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _prologue_x(x, offs_k, mask_k, nw_ptr, rstd, act_scale,
                HAS_NORM: tl.constexpr, NORM_HAS_WEIGHT: tl.constexpr, ACT_QUANT: tl.constexpr,
                BF16_IN_FP32: tl.constexpr):
    """A loaded [BLOCK_M, BLOCK_K] tile of x as the GEMM reads it: RMS-normalized (times the
    norm's weight) and/or quantized per token (ACT_QUANT 1: int8, 2: float8 e4m3), in fp32.
    BF16_IN_FP32 (bf16 x under the interpreter, which computes in fp32): the normalized x is
    rounded to bf16 as the norm's output would be, before it is quantized."""
    xf = x.to(tl.float32)
    if HAS_NORM:
        xf = xf * rstd[:, None]
        if NORM_HAS_WEIGHT:
            xf = xf * tl.load(nw_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        if BF16_IN_FP32:
            xf = _round_to_bf16(xf)
        elif ACT_QUANT != 0:
            xf = xf.to(x.dtype).to(tl.float32)  # the norm's output is in x's dtype
    if ACT_QUANT == 1:
        xf = tl.minimum(tl.maximum(_rint(xf / act_scale[:, None]), -127.0), 127.0)
    elif ACT_QUANT == 2:
        xf = _round_to_e4m3(tl.minimum(tl.maximum(xf / act_scale[:, None], -448.0), 448.0))
    return xf


@triton.jit
def row_statistics(
    x_ptr, nw_ptr, norm_eps, offs_m, mask_m, K_IN, stride_xm, stride_xk,
    HAS_NORM: tl.constexpr, NORM_HAS_WEIGHT: tl.constexpr, ACT_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BF16_IN_FP32: tl.constexpr,
):
    """(rstd, act_scale) [BLOCK_M] each: what the GEMM's K loop needs to know of a whole row before
    it starts. rstd = 1 / sqrt(mean(x^2) + eps) for an RMSNorm prologue (1 without one); act_scale =
    max |x'| / 127 (int8) or / 448 (fp8) of the row x' the GEMM multiplies, for per-token
    activation quantization (1 without it). One extra pass over the program's rows of x (over all of
    K, also under split-K): M x K reads, small next to the N x K weight at the M this runs at."""
    rstd = tl.full((BLOCK_M,), 1.0, tl.float32)
    act_scale = tl.full((BLOCK_M,), 1.0, tl.float32)
    if HAS_NORM:
        squares = tl.full((BLOCK_M,), 0.0, tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & (offs_k < K_IN)[None, :], other=0.0).to(tl.float32)
            squares += tl.reduce(x * x, 1, _add)
        rstd = 1.0 / tl.sqrt(squares / K_IN + norm_eps)
    if ACT_QUANT != 0:
        absmax = tl.full((BLOCK_M,), 0.0, tl.float32)
        for k0 in range(0, K_IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K_IN
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            x = _prologue_x(x, offs_k, mask_k, nw_ptr, rstd, act_scale, HAS_NORM, NORM_HAS_WEIGHT, 0, BF16_IN_FP32)
            absmax = tl.maximum(absmax, tl.reduce(tl.abs(x), 1, _maximum))
        if ACT_QUANT == 1:
            act_scale = tl.maximum(absmax / 127.0, 1e-8)
        else:
            act_scale = tl.maximum(absmax / 448.0, 1e-12)
    return rstd, act_scale


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, offs_k, mask_k, kb,
                 stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                 IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """K block ``kb`` of W.T as fp32 [BLOCK_K, BLOCK_N], the operand tl.dot wants on the right:
    int4 dequantized; int8 / e4m3 codes unscaled (the per-channel scale, constant along K, is
    applied once to the accumulator instead of to every weight; the codes are exact in
    bf16/fp16/fp32)."""
    w_mask = mask_k[:, None] & mask_n[None, :]
    if IS_INT4:
        # Two codes a byte, element 2i in the low nibble, 2i+1 in the high one (pack_int4).
        # Each byte is loaded for both of its codes; the second load hits the cache.
        packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + (offs_k[:, None] // 2) * stride_wk,
                         mask=w_mask, other=0).to(tl.int32)
        codes = (packed >> ((offs_k[:, None] % 2) * 4)) & 0xF
        # GROUP_SIZE % BLOCK_K == 0 (checked by the launcher): the whole block lies in one
        # group, so its scales and zeros are one [BLOCK_N] row each.
        group = (kb * BLOCK_K) // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * stride_sn + group * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + group * stride_zg, mask=mask_n, other=0.0).to(tl.float32)
        w = (codes.to(tl.float32) - INT4_OFFSET) * s[None, :] + z[None, :]
    else:
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=w_mask, other=0.0).to(tl.float32)  # 0.0: the interpreter casts no int to fp8
    return w


@triton.jit
def dequant_gemm_tile(
    x_ptr, w_ptr, s_ptr, z_ptr, nw_ptr, norm_eps,
    offs_m, offs_n, mask_m, mask_n, K_IN, K_BLOCKS_PER_SPLIT, pid_k,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
    IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr, NORM_HAS_WEIGHT: tl.constexpr, ACT_QUANT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FP32_DOT: tl.constexpr,
):
    """The fp32 [BLOCK_M, BLOCK_N] tile of x' @ W.T over this program's slice of K (no bias), x'
    being x itself, or x RMS-normalized (HAS_NORM) and/or quantized per token (ACT_QUANT).

    Shared by this module's kernel and the kernels lqc.codegen.qlinear_kernels generates (which
    add an epilogue from the graph's nodes)."""
    rstd, act_scale = row_statistics(
        x_ptr, nw_ptr, norm_eps, offs_m, mask_m, K_IN, stride_xm, stride_xk,
        HAS_NORM, NORM_HAS_WEIGHT, ACT_QUANT, BLOCK_M, BLOCK_K, FP32_DOT,
    )
    # This program's K blocks: a contiguous slice, so its codes are one stretch of each row.
    k_blocks = (K_IN + BLOCK_K - 1) // BLOCK_K  # not tl.cdiv: see "builtins only" in the module docstring
    kb_start = pid_k * K_BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + K_BLOCKS_PER_SPLIT, k_blocks)

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: builtins only
    for kb in range(kb_start, kb_end):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        # Only the first K_IN columns: past them the reference's x is zero padding.
        mask_k = offs_k < K_IN

        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_NORM or ACT_QUANT != 0:
            x_gemm = _prologue_x(x, offs_k, mask_k, nw_ptr, rstd, act_scale, HAS_NORM, NORM_HAS_WEIGHT, ACT_QUANT, FP32_DOT)
            if not FP32_DOT:
                # the normalized x in x's dtype, as the norm hands it to the linear; int8 codes and
                # e4m3 values are exact in bf16 / fp16
                x_gemm = x_gemm.to(x.dtype)
        else:
            x_gemm = x

        w = _weight_tile(w_ptr, s_ptr, z_ptr, offs_n, mask_n, offs_k, mask_k, kb,
                         stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
                         IS_INT4, GROUP_SIZE, BLOCK_K)
        if FP32_DOT:
            # Only under the interpreter, with bf16 x. The interpreter keeps bf16 as raw uint16: its
            # tl.dot multiplies the bit patterns (triton-lang/triton#11584), fp32 -> bf16 casts
            # truncate and int8 -> bf16 casts garble. So it all stays fp32 (bf16 -> fp32 is exact)
            # and the launcher rounds the fp32 output to bf16 with torch.
            acc = tl.dot(x_gemm.to(tl.float32), w, acc, input_precision="ieee")
        else:
            # bf16/fp16 x: W rounded to x's type, products exact in the fp32 accumulator.
            acc = tl.dot(x_gemm, w.to(x_gemm.dtype), acc, input_precision=INPUT_PRECISION)

    if not IS_INT4:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT_QUANT != 0:
        acc = acc * act_scale[:, None]
    return acc
