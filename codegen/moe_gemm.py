"""MoE FFN as two grouped GEMMs over permuted tokens: ``lqc::moe_ffn`` in Triton.

The router (one small matmul and a top-k) runs in torch. Then every (token, expert) pair, the
shared experts' pairs included, is sorted by expert and each expert's run of pairs is padded to a
multiple of BLOCK_M, so every block of rows belongs to one expert (``permute``). Two launches of
one grouped-GEMM kernel follow, each program computing a [BLOCK_M, BLOCK_N] tile for its block's
expert:

1. up: ``h = act(x[tok] @ w_gate[e].T) * (x[tok] @ w_in[e].T + b_in[e])`` (without a gate,
   ``act(x[tok] @ w_in[e].T + b_in[e])``), reading x's rows through the permutation (the gather
   happens in the kernel's loads, x is never copied into expert order);
2. down: ``y = h @ w_out[e].T``, row for row.

Then each token's rows are summed back into its output (``index_add_``, in a fixed order). The
group's epilogue, the residual add after the FFN, is that sum's starting value: the output
begins as the residual (in float32) instead of zeros, so the add costs no pass of its own. Experts
have weight 1, as in lqc.runtime.structural.moe (a carve of a dense FFN). int8 experts: codes widened in
registers, their per-row scales applied to the accumulator. The accumulators are float32.

Checked against ``lqc.runtime.structural.moe.moe_ffn_reference`` under ``TRITON_INTERPRET=1``
(tests/test_triton_moe_gemm.py). Import this module after TRITON_INTERPRET is set (see
dequant_gemm's docstring: builtins only in the kernels).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lqc.codegen.interpreter import decorated_for_interpreter
from lqc.codegen.templates import dot_input_precision
import lqc.ir.kernel_ops  # noqa: F401  (the schema this module implements)
from lqc.ir.lqc_ops import MOE_ACTIVATIONS, check_moe_ffn_shapes
from lqc.runtime.structural.moe import moe_ffn_reference, route

_ACTIVATION_CODES = {"none": 0, "silu": 1, "gelu": 2, "gelu_tanh": 3, "relu": 4}
assert set(MOE_ACTIVATIONS) <= set(_ACTIVATION_CODES)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, row_ids_ptr, block_expert_ptr,
    w_ptr, s_ptr, g_ptr, gs_ptr, b_ptr, out_ptr,
    N, K,
    stride_am, stride_ak,
    stride_we, stride_wn, stride_wk,
    stride_se, stride_sn,
    stride_be, stride_bn,
    stride_om, stride_on,
    HAS_GATE: tl.constexpr, IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    source = tl.load(row_ids_ptr + rows)  # the row of A each permuted row reads; -1 for padding
    valid = source >= 0
    source = tl.where(valid, source, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    w_base = w_ptr + expert * stride_we
    g_base = g_ptr + expert * stride_we
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + source[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=valid[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        w_offsets = offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]: W.T
        w_mask = mask_k[:, None] & mask_n[None, :]
        w = tl.load(w_base + w_offsets, mask=w_mask, other=0).to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        if HAS_GATE:
            g = tl.load(g_base + w_offsets, mask=w_mask, other=0).to(tl.float32)
            acc_gate = tl.dot(a, g, acc_gate, input_precision=INPUT_PRECISION)

    if IS_INT8:  # per-row scales of the codes: constant along K, applied once
        acc = acc * tl.load(s_ptr + expert * stride_se + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_GATE:
            acc_gate = acc_gate * tl.load(gs_ptr + expert * stride_se + offs_n * stride_sn, mask=mask_n,
                                          other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n * stride_bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    h = acc_gate if HAS_GATE else acc
    if ACT == 1:
        h = h / (1.0 + tl.exp(-h))
    elif ACT == 2:
        h = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    elif ACT == 3:
        h = 0.5 * h * (2.0 / (1.0 + tl.exp(-2.0 * (0.7978845608028654 * (h + 0.044715 * h * h * h)))))
    elif ACT == 4:
        h = tl.maximum(h, 0.0)
    if HAS_GATE:
        h = h * acc
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on, h,
             mask=valid[:, None] & mask_n[None, :])


def permute(picked: torch.Tensor, shared: int, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_ids [P_pad], block_expert [P_pad / block_m]) for routed picks [T, k] (routed indices):
    token ids grouped by expert (shared experts take every token), each expert's run padded with
    -1 to a multiple of block_m."""
    tokens = picked.shape[0]
    all_tokens = torch.arange(tokens, device=picked.device)
    row_ids, block_expert = [], []
    for e in range(experts):
        if e < shared:
            ids = all_tokens
        else:
            ids = (picked == e - shared).any(dim=1).nonzero().flatten()  # in token order
        if ids.numel() == 0:
            continue
        blocks = triton.cdiv(ids.numel(), block_m)
        padded = torch.full((blocks * block_m,), -1, dtype=torch.int32, device=picked.device)
        padded[: ids.numel()] = ids.to(torch.int32)
        row_ids.append(padded)
        block_expert += [e] * blocks
    return torch.cat(row_ids), torch.tensor(block_expert, dtype=torch.int32, device=picked.device)


def moe_ffn_triton(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                   w_in_scale=None, w_gate_scale=None, w_out_scale=None, residual=None, *,
                   block_m: int = 16, block_n: int = 32, block_k: int = 32, input_precision: str | None = None):
    """What ``lqc::moe_ffn`` computes (plus ``residual`` when given), as two grouped-GEMM launches
    (see the module docstring). ``input_precision``: tl.dot's for float32 operands; None: torch's
    setting now (lqc.codegen.templates.dot_input_precision: "ieee" unless the user allowed TF32)."""
    if input_precision is None:
        input_precision = dot_input_precision()
    check_moe_ffn_shapes(x.shape[-1], router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                         w_in_scale, w_gate_scale, w_out_scale)
    experts, neurons, width = w_in.shape
    d_out = w_out.shape[1]
    x2 = x.reshape(-1, width)
    tokens = x2.shape[0]
    _check_residual(residual, x, d_out)
    if residual is None:
        out = torch.zeros((tokens, d_out), dtype=torch.float32, device=x.device)
    else:
        out = residual.reshape(tokens, d_out).to(torch.float32, copy=True)
    if tokens == 0:
        return out.to(x.dtype).reshape(*x.shape[:-1], d_out)
    row_ids, block_expert = permute(route(x2, router_weight, router_bias, top_k), shared, experts, block_m)
    rows = row_ids.numel()
    is_int8 = w_in.dtype == torch.int8
    dummy = out  # never read where a flag is off

    h = torch.empty((rows, neurons), dtype=torch.float32, device=x.device)
    s_in = w_in_scale if is_int8 else dummy
    _grouped_gemm_kernel[(block_expert.numel(), triton.cdiv(neurons, block_n))](
        x2, row_ids, block_expert,
        w_in, s_in, w_gate if w_gate is not None else w_in, w_gate_scale if (is_int8 and w_gate is not None) else s_in,
        b_in if b_in is not None else dummy, h,
        neurons, width,
        x2.stride(0), x2.stride(1),
        w_in.stride(0), w_in.stride(1), w_in.stride(2),
        s_in.stride(0) if is_int8 else 0, s_in.stride(1) if is_int8 else 0,
        b_in.stride(0) if b_in is not None else 0, b_in.stride(1) if b_in is not None else 0,
        h.stride(0), h.stride(1),
        HAS_GATE=w_gate is not None, IS_INT8=is_int8, HAS_BIAS=b_in is not None, ACT=_ACTIVATION_CODES[activation],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=input_precision,
    )
    # the down projection reads h row for row: its own row ids, padding still -1
    own_rows = torch.where(row_ids >= 0, torch.arange(rows, dtype=torch.int32, device=x.device), row_ids)
    y = torch.empty((rows, d_out), dtype=torch.float32, device=x.device)
    s_out = w_out_scale if is_int8 else dummy
    _grouped_gemm_kernel[(block_expert.numel(), triton.cdiv(d_out, block_n))](
        h, own_rows, block_expert,
        w_out, s_out, w_out, s_out, dummy, y,
        d_out, neurons,
        h.stride(0), h.stride(1),
        w_out.stride(0), w_out.stride(1), w_out.stride(2),
        s_out.stride(0) if is_int8 else 0, s_out.stride(1) if is_int8 else 0,
        0, 0,
        y.stride(0), y.stride(1),
        HAS_GATE=False, IS_INT8=is_int8, HAS_BIAS=False, ACT=0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, INPUT_PRECISION=input_precision,
    )
    valid = row_ids >= 0
    out.index_add_(0, row_ids[valid].long(), y[valid])
    return out.to(x.dtype).reshape(*x.shape[:-1], d_out)


interpreted = functools.partial(decorated_for_interpreter, _grouped_gemm_kernel)


def _check_residual(residual, x, d_out) -> None:
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], d_out):
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected the output's {(*x.shape[:-1], d_out)}")


@torch.library.impl("lqc::moe_ffn_grouped", "CompositeExplicitAutograd")
def moe_ffn_grouped(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                    w_in_scale=None, w_gate_scale=None, w_out_scale=None, residual=None):
    """``lqc::moe_ffn`` (+ ``residual``: the group's epilogue; schema and fake in lqc.ir.kernel_ops)
    by the grouped-GEMM kernels (a GPU, or CPU under the interpreter); on CPU otherwise, its CPU
    implementation: the reference."""
    args = (x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
            w_in_scale, w_gate_scale, w_out_scale)
    if x.is_cuda or interpreted():
        return moe_ffn_triton(*args, residual)
    _check_residual(residual, x, w_out.shape[1])
    out = moe_ffn_reference(*args)
    return out if residual is None else (out.to(torch.float32) + residual.to(torch.float32)).to(x.dtype)
