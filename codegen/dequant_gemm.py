"""Dequantize-GEMM: ``lqc::qlinear`` for every canonical weight format as one Triton kernel.

``y = x @ W.T + bias`` where W is the weight the packed codes stand for (lqc.runtime.quantization.formats):

- ``int8``: codes int8 [N, K], one scale per output channel [N]; ``W = q * s``.
- ``fp8``: codes float8 e4m3fn [N, K], one scale per output channel; ``W = q * s``.
- ``int4``: codes 0..15 packed two a byte in uint8 [N, K/2], element 2i in the low nibble,
  scale and zero per group of g inputs [N, K/g]; ``W = (q - 8) * s + z``.
- ``w8a8`` / ``fp8_dyn``: int8 / fp8 weights as above, and x quantized per token (row) before the
  GEMM, to int8 (``round(x / s_x)``, ``s_x = max|x| / 127``) or to e4m3 (``s_x = max|x| / 448``):
  ``y = (q_x @ q.T) * s_x * s``. The kernel finds each row's s_x in a first pass over the row.

The tile function also takes an RMSNorm prologue (``dequant_gemm_tile``'s HAS_NORM: x normalized
as it is loaded, with the row's rstd from the same first pass), which the generated kernels of
lqc.codegen.qlinear_kernels use.

K is the padded width (a multiple of g); x has ``in_features <= K`` columns and the reference
pads it with zeros, so columns past ``in_features`` add nothing and the kernel never reads them.

The kernel never materializes W: each program loads a [BLOCK_K, BLOCK_N] tile of codes,
dequantizes it in registers and feeds it to ``tl.dot`` with an fp32 accumulator. Decode steps
have M = 1, which leaves most of a GPU idle with one program per N tile; split-K gives each
program a slice of K as well, and a second small kernel adds the slices up (see ``pick_split_k``).

What computes is checked against ``lqc.runtime.quantization.qlinear.qlinear_reference``
(tests/test_triton_dequant_gemm.py, on CPU under ``TRITON_INTERPRET=1``). No autotuning yet: the
block sizes and split are arguments, so an autotuner can search them later.

Builtins only: the kernels call ``tl`` builtins (``tl.full``, ``tl.dot``, ``tl.minimum``...) and
none of triton.language's own ``@triton.jit`` helpers (``tl.zeros``, ``tl.cdiv``, ``tl.sum``,
``tl.max``...). Those are decorated when triton is imported, and importing torch._dynamo (as
most of lqc does) imports triton, usually before anyone sets TRITON_INTERPRET=1; under the
interpreter they then fail with "Cannot call @triton.jit'd outside of the scope of a kernel".
TRITON_INTERPRET only has to be set before this module is imported.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from lqc.codegen.dequant_tile import dequant_gemm_tile
from lqc.codegen.interpreter import decorated_for_interpreter
from lqc.codegen.templates import DEQUANT_GEMM_FORMATS as FORMATS, dot_input_precision

# ACT_QUANT of each format: the per-token activation quantization its kernel does (0 none, 1 int8, 2 e4m3)
ACT_QUANT = {"int8": 0, "int4": 0, "fp8": 0, "w8a8": 1, "fp8_dyn": 2}
# the dtype each format keeps its weight codes in
CODE_DTYPES = {"int8": torch.int8, "w8a8": torch.int8, "int4": torch.uint8,
               "fp8": torch.float8_e4m3fn, "fp8_dyn": torch.float8_e4m3fn}

# split_k=None: only M up to this splits K (above it the M tiles alone give the GPU enough programs)
SPLIT_K_MAX_M = 64
MAX_SPLIT_K = 16
MIN_K_BLOCKS_PER_SPLIT = 4  # a slice shorter than this costs more in partial sums than it saves
DEFAULT_NUM_SMS = 132  # an H100 SXM; the device's own count is used when x is on a GPU


@triton.jit
def _dequant_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    M, N, K_IN, K_BLOCKS_PER_SPLIT,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_sn, stride_sg,
    stride_zn, stride_zg,
    stride_os, stride_om, stride_on,
    IS_INT4: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, FP32_DOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # which slice of K (always 0 without split-K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = dequant_gemm_tile(
        x_ptr, w_ptr, s_ptr, z_ptr, x_ptr, 0.0, offs_m, offs_n, mask_m, mask_n, K_IN, K_BLOCKS_PER_SPLIT, pid_k,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_zn, stride_zg,
        IS_INT4, GROUP_SIZE, False, False, ACT_QUANT, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION, FP32_DOT,
    )

    out_ptrs = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # A partial sum into the fp32 workspace [SPLIT_K, M, N]; _split_k_reduce_kernel adds
        # bias and casts once all slices are in.
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _split_k_reduce_kernel(partial_ptr, bias_ptr, out_ptr, MN, N,
                           SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    # partial [SPLIT_K, M, N] and out [M, N] are contiguous: flat indices walk both.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.full((BLOCK,), 0.0, tl.float32)
    for s in range(SPLIT_K):  # a fixed order: the same inputs give the same bits every run
        acc += tl.load(partial_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# interpreted(): whether this module's kernels were decorated under TRITON_INTERPRET=1 (run on CPU
# by the interpreter); a copy of the module decorated without it answers for its own kernels
interpreted = functools.partial(decorated_for_interpreter, _dequant_gemm_kernel)


# Split-K method: partial sums to an fp32 workspace and a second reduction pass, rather than
# tl.atomic_add into the output. Atomics need a zeroed fp32 output and still a pass to add bias
# and cast to bf16/fp16, so they save no launch; their summation order changes from run to run
# (results not bit-reproducible); and the interpreter runs programs one after another, so tests
# on CPU would never see the races atomics are there to handle. The workspace costs
# SPLIT_K x M x N floats, small for the M this is used at.


def pick_split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, num_sms: int = DEFAULT_NUM_SMS) -> int:
    """The split for ``split_k=None``: 1 when M > SPLIT_K_MAX_M; otherwise double it (up to
    MAX_SPLIT_K) while the grid has fewer programs than the GPU has SMs and each slice keeps at
    least MIN_K_BLOCKS_PER_SPLIT blocks of K."""
    if m > SPLIT_K_MAX_M:
        return 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = 1
    while split * 2 <= MAX_SPLIT_K and tiles * split < num_sms and k_blocks // (split * 2) >= MIN_K_BLOCKS_PER_SPLIT:
        split *= 2
    return split


def plan_split_k(x, m, n, in_features, block_m, block_n, block_k, split_k) -> tuple[int, int]:
    """(slices, K blocks per slice) for ``split_k`` (None: ``pick_split_k`` for x's device)."""
    if split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else DEFAULT_NUM_SMS
        split_k = pick_split_k(m, n, in_features, block_m, block_n, block_k, sms)
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = min(split_k, k_blocks)  # more slices than K blocks would only add empty ones
    k_blocks_per_split = triton.cdiv(k_blocks, split_k)
    return triton.cdiv(k_blocks, k_blocks_per_split), k_blocks_per_split  # 10 blocks in 4 slices of 3: the 4th gets 1


def default_block_k(fmt: str, group_size: int) -> int:
    """64, or for int4 the largest power of two up to 64 dividing the group (a block must lie in one group)."""
    if fmt != "int4":
        return 64
    block = 64
    while block > 1 and group_size % block:
        block //= 2
    return block


def _is_pow2_at_least_16(v) -> bool:
    return isinstance(v, int) and v >= 16 and v & (v - 1) == 0


def _check(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features, block_m, block_n, block_k, split_k):
    if fmt not in FORMATS:
        raise ValueError(
            f"dequant_gemm computes formats {', '.join(FORMATS)}; got fmt {fmt!r}. Other formats run through "
            "lqc.runtime.quantization.qlinear (the CPU layouts int8_cpu / int4_cpu are built from the canonical int8 / int4 weights)"
        )
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x is {x.dtype}; dequant_gemm takes float32, bfloat16 or float16 activations (cast x first)")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}: its last dimension must be in_features={in_features}")
    want = CODE_DTYPES[fmt]
    if qweight.dtype != want:
        layout = "two codes a byte, as runtime.quantization.formats.pack_int4 makes them" if fmt == "int4" else "the codes themselves"
        raise ValueError(f"{fmt} qweight must be {want} ({layout}), got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[0] != out_features:
        raise ValueError(f"qweight has shape {tuple(qweight.shape)}, expected [out_features={out_features}, K]")
    k = qweight.shape[1] * (2 if fmt == "int4" else 1)
    if k < in_features:
        raise ValueError(f"qweight holds {k} inputs per row, fewer than in_features={in_features}")
    if fmt != "int4":
        if tuple(scales.shape) != (out_features,):
            raise ValueError(f"{fmt} scales have shape {tuple(scales.shape)}, expected [{out_features}] (one per output channel)")
        if zeros is not None:
            raise ValueError(f"{fmt} is symmetric and has no zeros; pass zeros=None")
    else:
        if not isinstance(group_size, int) or group_size <= 0 or k % group_size:
            raise ValueError(f"group_size {group_size} must be positive and divide the padded width K={k} (qweight is [N, K/2])")
        if zeros is None:
            raise ValueError("int4 needs zeros [N, K/group_size] (one zero point per group)")
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out_features, k // group_size):
                raise ValueError(
                    f"int4 {name} have shape {tuple(t.shape)}, expected [{out_features}, {k // group_size}] ([N, K/group_size])"
                )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{out_features}]")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if fmt == "int4" and default_block_k(fmt, group_size) < 16:
        raise ValueError(
            f"group_size={group_size} leaves no block_k: a K block must lie in one group and tl.dot needs at least 16 "
            "inputs a block; quantize with a group size that is a multiple of 16"
        )
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if v is not None and not _is_pow2_at_least_16(v):
            raise ValueError(f"{name}={v} must be a power of two >= 16 (tl.arange needs powers of two, tl.dot at least 16)")
    if fmt == "int4" and group_size % block_k:
        raise ValueError(
            f"block_k={block_k} does not divide group_size={group_size}: each K block must lie in one quantization "
            f"group; use block_k={default_block_k(fmt, group_size)} or another power of two >= 16 dividing {group_size}"
        )
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k={split_k!r} must be a positive int, or None to pick it from the shape")
    if x.device.type == "cpu" and not interpreted():
        raise ValueError(
            "x is on the CPU: Triton kernels need a GPU, or TRITON_INTERPRET=1 set before lqc.codegen.dequant_gemm is imported"
        )


def dequant_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt: str,
    group_size: int,
    in_features: int,
    out_features: int,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int | None = None,
    split_k: int | None = 1,
    input_precision: str | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """``lqc::qlinear(x, qweight, scales, zeros, bias, fmt, ...)`` for fmt ``int8`` / ``int4``:
    x [..., in_features] -> [..., out_features] in x's dtype.

    block_m=None: the smallest power of two >= M, between 16 and 64. block_k=None: 64, or for
    int4 the largest power of two <= 64 dividing group_size. split_k=None: ``pick_split_k``.
    input_precision: tl.dot's for float32 x ("ieee" matches the reference; "tf32" is faster and
    rounds x and W to 10-bit mantissas); None: torch's setting now (``dot_input_precision``: "ieee"
    unless the user allowed TF32); bf16 / fp16 x multiply in their own type.
    num_warps, num_stages: the GEMM kernel's launch config (GPU only; the interpreter ignores them).
    """
    if block_k is None:
        block_k = default_block_k(fmt, group_size) if isinstance(group_size, int) and group_size > 0 else 64
    if input_precision is None:
        input_precision = dot_input_precision()
    _check(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features, block_m, block_n, block_k, split_k)
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, in_features)  # a view when it can be: the kernel reads x through its strides
    if block_m is None:
        block_m = min(64, max(16, triton.next_power_of_2(m)))

    n = out_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    if in_features == 0:  # nothing to multiply: y is the bias alone
        out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
        return out.reshape(*x.shape[:-1], n)

    split_k, k_blocks_per_split = plan_split_k(x, m, n, in_features, block_m, block_n, block_k, split_k)
    # Under the interpreter bf16 results come back in fp32, rounded here (see FP32_DOT in the kernel).
    fp32_dot = x.dtype == torch.bfloat16 and interpreted()
    if fp32_dot:
        out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    _launch(x2, qweight, scales, zeros, bias, out, fmt, group_size, k_blocks_per_split,
            (block_m, block_n, block_k, split_k), input_precision, fp32_dot, num_warps, num_stages)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def _launch(x2, qweight, scales, zeros, bias, out, fmt, group_size, k_blocks_per_split, blocks,
            input_precision, fp32_dot, num_warps, num_stages) -> None:
    """Run the GEMM kernel into ``out`` [M, N] (and, with split-K, the reduction after it)."""
    (m, in_features), n = x2.shape, out.shape[1]
    block_m, block_n, block_k, split_k = blocks
    is_int4 = fmt == "int4"
    zeros_arg = zeros if is_int4 else scales  # never read for int8: any tensor will do
    target = out if split_k == 1 else torch.empty((split_k, m, n), dtype=torch.float32, device=x2.device)
    target_strides = (0, *out.stride()) if split_k == 1 else target.stride()
    s_stride_g = scales.stride(1) if is_int4 else 0
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split_k)
    _dequant_gemm_kernel[grid](
        x2, qweight, scales, zeros_arg, bias if bias is not None else scales, target,
        m, n, in_features, k_blocks_per_split,
        x2.stride(0), x2.stride(1),
        qweight.stride(0), qweight.stride(1),
        scales.stride(0), s_stride_g,
        zeros_arg.stride(0), zeros_arg.stride(1) if is_int4 else 0,
        *target_strides,
        IS_INT4=is_int4, GROUP_SIZE=group_size if is_int4 else 1, ACT_QUANT=ACT_QUANT[fmt], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        INPUT_PRECISION=input_precision, FP32_DOT=fp32_dot,
        num_warps=num_warps, num_stages=num_stages,
    )
    if split_k > 1:
        reduce_block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, reduce_block),)](
            target, bias if bias is not None else target, out, m * n, n,
            SPLIT_K=split_k, HAS_BIAS=bias is not None, BLOCK=reduce_block,
        )
