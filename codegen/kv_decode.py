"""Flash-decoding attention over lqc's compressed KV cache, in Triton.

``attend_triton(view, query, attention_mask, scaling)`` computes what lqc.runtime.kv.attention's
``attend`` computes, ``softmax(q K^T * scaling + mask) V`` over a layer's stored tokens (the
full-precision sinks, the KIVI-quantized blocks, the full-precision recent tokens), without
dequantizing the cache to memory:

- One kernel, launched per part. Each program takes one (batch, KV head) and one chunk of the
  part's tokens (flash-decoding: at decode the query is a few rows, so the tokens are what gives
  the GPU enough programs), loops over the chunk in blocks of BLOCK_T tokens and keeps an online
  softmax: running max, running sum, and the [rows, head_dim] accumulator. Quantized blocks are
  unpacked and dequantized in registers: keys per channel (``code * scale[t // group, d] +
  zero``), values per token (``code * scale[t, d // group] + zero``), 8, 4 or 2 bits, codes packed
  along the head dimension (lqc.runtime.kv.quant).
- The query heads sharing a KV head are rows of one [rows, head_dim] tile (GQA never repeats KV).
- The mask (boolean or additive, over token positions, gathered at the stored tokens' positions
  as ``attend`` does; or causal among this step's tokens) is an additive bias the kernel reads.
- Each program writes a partial (max, sum, accumulator); torch merges them by log-sum-exp. A
  query row that may attend to nothing gets zeros, as ``attend`` (and SDPA) give.

SnapKV's importance needs the attention probabilities themselves: ``attend`` keeps computing
those steps. Heads whose dimension is not a power of two (>= 16) fall back to ``attend`` too.
Reductions use ``tl.reduce`` with this module's own combine functions (builtins only: see
dequant_gemm's docstring). Checked against ``attend`` under ``TRITON_INTERPRET=1``
(tests/test_triton_kv_decode.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lqc.codegen.interpreter import decorated_for_interpreter
from lqc.codegen.templates import dot_input_precision
from lqc.runtime.kv.attention import CompressedKVView, attend, mask_bias

TOKENS_PER_PROGRAM = 256  # a chunk of tokens per program (split of the token axis)
BLOCK_T = 16  # tokens per inner step


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _load_keys(k_ptr, ks_ptr, kz_ptr, k_base, ks_base, sk_t, sks_t, offs_t, mask_t, offs_d,
               BITS: tl.constexpr, K_GROUP: tl.constexpr):
    """Tokens ``offs_t`` of one KV head's keys in fp32, read transposed, [D, BLOCK_T]: the right
    operand of q @ K^T. BITS 0: stored as they are; else BITS-bit codes, one scale and zero per
    channel and block of K_GROUP tokens."""
    if BITS == 0:
        k = tl.load(k_ptr + k_base + offs_t[None, :] * sk_t + offs_d[:, None],
                    mask=mask_t[None, :], other=0.0).to(tl.float32)
    else:
        per_byte = 8 // BITS
        kb = tl.load(k_ptr + k_base + offs_t[None, :] * sk_t + (offs_d[:, None] // per_byte),
                     mask=mask_t[None, :], other=0).to(tl.int32)
        kc = (kb >> ((offs_d[:, None] % per_byte) * BITS)) & ((1 << BITS) - 1)
        k_rows = offs_t[None, :] // K_GROUP
        ks = tl.load(ks_ptr + ks_base + k_rows * sks_t + offs_d[:, None], mask=mask_t[None, :], other=0.0)
        kz = tl.load(kz_ptr + ks_base + k_rows * sks_t + offs_d[:, None], mask=mask_t[None, :], other=0.0)
        k = kc.to(tl.float32) * ks.to(tl.float32) + kz.to(tl.float32)
    return k


@triton.jit
def _load_values(v_ptr, vs_ptr, vz_ptr, v_base, vs_base, sv_t, svs_t, offs_t, mask_t, offs_d,
                 BITS: tl.constexpr, V_GROUP: tl.constexpr):
    """Tokens ``offs_t`` of one KV head's values in fp32, [BLOCK_T, D]. BITS 0: stored as they are;
    else BITS-bit codes, one scale and zero per token and group of V_GROUP channels."""
    if BITS == 0:
        v = tl.load(v_ptr + v_base + offs_t[:, None] * sv_t + offs_d[None, :],
                    mask=mask_t[:, None], other=0.0).to(tl.float32)
    else:
        per_byte = 8 // BITS
        vb = tl.load(v_ptr + v_base + offs_t[:, None] * sv_t + (offs_d[None, :] // per_byte),
                     mask=mask_t[:, None], other=0).to(tl.int32)
        vc = (vb >> ((offs_d[None, :] % per_byte) * BITS)) & ((1 << BITS) - 1)
        v_cols = offs_d[None, :] // V_GROUP
        vs = tl.load(vs_ptr + vs_base + offs_t[:, None] * svs_t + v_cols, mask=mask_t[:, None], other=0.0)
        vz = tl.load(vz_ptr + vs_base + offs_t[:, None] * svs_t + v_cols, mask=mask_t[:, None], other=0.0)
        v = vc.to(tl.float32) * vs.to(tl.float32) + vz.to(tl.float32)
    return v


@triton.jit
def _kv_partial_kernel(
    q_ptr, k_ptr, v_ptr, ks_ptr, kz_ptr, vs_ptr, vz_ptr, bias_ptr, o_ptr, m_ptr, l_ptr,
    R, T, TOKENS_PER_PROG, HKV, CHUNK0,
    sq_b, sq_h, sq_r,
    sk_b, sk_h, sk_t,
    sv_b, sv_h, sv_t,
    sks_b, sks_h, sks_t,
    svs_b, svs_h, svs_t,
    sbias_b, sbias_h, sbias_r, sbias_t,
    so_b, so_h, so_c, so_r,
    sm_b, sm_h, sm_c,
    BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid_bh // HKV
    h = pid_bh % HKV
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    mask_r = offs_r < R
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_r[:, None] * sq_r + offs_d[None, :], mask=mask_r[:, None], other=0.0)
    q = q.to(tl.float32)

    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.full((BLOCK_R,), 0.0, tl.float32)
    acc = tl.full((BLOCK_R, D), 0.0, tl.float32)
    t_start = chunk * TOKENS_PER_PROG
    t_end = tl.minimum(t_start + TOKENS_PER_PROG, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        k = _load_keys(k_ptr, ks_ptr, kz_ptr, b * sk_b + h * sk_h, b * sks_b + h * sks_h, sk_t, sks_t,
                       offs_t, mask_t, offs_d, BITS, K_GROUP)
        v = _load_values(v_ptr, vs_ptr, vz_ptr, b * sv_b + h * sv_h, b * svs_b + h * svs_h, sv_t, svs_t,
                         offs_t, mask_t, offs_d, BITS, V_GROUP)

        s = tl.dot(q, k, input_precision=INPUT_PRECISION)  # [BLOCK_R, BLOCK_T]; q is already scaled
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sbias_b + h * sbias_h + offs_r[:, None] * sbias_r + (CHUNK0 + offs_t[None, :]) * sbias_t,
                         mask=mask_r[:, None] & mask_t[None, :], other=0.0)
        s = tl.where(mask_t[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(s, 1, _maximum))
        # a row with nothing allowed yet keeps max -inf: shift by 0 there so exp gives 0, not nan
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m - shift)
        l = l * alpha + tl.reduce(p, 1, _add)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=INPUT_PRECISION)
        m = m_new

    base = b * so_b + h * so_h + chunk * so_c
    tl.store(o_ptr + base + offs_r[:, None] * so_r + offs_d[None, :], acc, mask=mask_r[:, None])
    tl.store(m_ptr + b * sm_b + h * sm_h + chunk * sm_c + offs_r, m, mask=mask_r)
    tl.store(l_ptr + b * sm_b + h * sm_h + chunk * sm_c + offs_r, l, mask=mask_r)


def supported(view: CompressedKVView, query: torch.Tensor, importance_window: int, softcap: float = 0.0) -> str | None:
    """Why ``attend_triton`` hands this step to ``attend`` (None: it computes it)."""
    d = query.shape[-1]
    if importance_window:
        return "SnapKV importance needs the attention probabilities"
    if softcap:
        return "soft-capped scores (Gemma 2) are not in the kernel"
    if d < 16 or d & (d - 1):
        return f"head_dim {d} is not a power of two >= 16"
    return None


def attend_triton(view: CompressedKVView, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
                  importance_window: int = 0, causal: bool = True, softcap: float = 0.0, *,
                  tokens_per_program: int = TOKENS_PER_PROGRAM):
    """``attend``'s result ([B, q, Hq, D], importance) by the flash-decoding kernel."""
    if supported(view, query, importance_window, softcap) is not None:
        return attend(view, query, attention_mask, scaling, importance_window, causal, softcap)
    b, query_heads, q_len, d = query.shape
    kv_heads = view.keys.shape[1]
    rep = query_heads // kv_heads
    rows = rep * q_len
    q = (query.to(torch.float32).reshape(b, kv_heads, rows, d) * scaling).contiguous()
    bias = mask_bias(view, attention_mask, q_len, causal, query.device)  # [B, 1 or Hkv, q, T]
    if bias is not None:  # the kernel's rows are (query head of a KV head, query token): [B, Hkv, rep * q, T]
        bias = bias[:, :, None].expand(b, kv_heads, rep, q_len, view.tokens).reshape(b, kv_heads, rows, view.tokens)
        bias = bias.contiguous()
    block_r = max(16, triton.next_power_of_2(rows))
    precision = dot_input_precision()  # q, K, V are float32 here: TF32 only where torch allows it

    parts = []  # (tokens, keys, values, key scales, key zeros, value scales, value zeros, bits, k group, v group)
    if view.sink_keys.shape[-2]:
        parts.append((view.sink_keys, view.sink_values, None, None, None, None, 0, 1, 1))
    if view.quantized:
        keys, values = view.quantized
        parts.append((keys.codes, values.codes, keys.scales, keys.zeros, values.scales, values.zeros, keys.bits, keys.group,
                      min(values.group, d)))
    parts.append((view.keys, view.values, None, None, None, None, 0, 1, 1))

    partials, first_column = [], 0
    for k, v, ks, kz, vs, vz, bits, k_group, v_group in parts:
        if k.shape[-2]:
            partials.append(_partial(q, bias, (k, v, ks, kz, vs, vz), bits, k_group, v_group, first_column,
                                     tokens_per_program, block_r, precision))
            first_column += k.shape[-2]
    out = _merge(partials).reshape(b, query_heads, q_len, d).transpose(1, 2).contiguous()
    return out.to(query.dtype), None


def _partial(q, bias, tensors, bits, k_group, v_group, first_column, tokens_per_program, block_r, precision):
    """(o, m, l) of one stored part (sinks, quantized blocks, recent tokens): each chunk of
    ``tokens_per_program`` tokens' unnormalized output, row max and row sum."""
    b, kv_heads, rows, d = q.shape
    k, v, ks, kz, vs, vz = tensors
    tokens = k.shape[-2]
    chunks = triton.cdiv(tokens, tokens_per_program)
    o = torch.empty((b, kv_heads, chunks, rows, d), dtype=torch.float32, device=q.device)
    m = torch.empty((b, kv_heads, chunks, rows), dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    k, v = k.contiguous(), v.contiguous()
    ks = ks.contiguous() if ks is not None else k
    kz = kz.contiguous() if kz is not None else k
    vs = vs.contiguous() if vs is not None else v
    vz = vz.contiguous() if vz is not None else v
    bias_arg = bias if bias is not None else q
    _kv_partial_kernel[(b * kv_heads, chunks)](
        q, k, v, ks, kz, vs, vz, bias_arg, o, m, l_sum,
        rows, tokens, tokens_per_program, kv_heads, first_column,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        ks.stride(0), ks.stride(1), ks.stride(2),
        vs.stride(0), vs.stride(1), vs.stride(2),
        *(bias.stride() if bias is not None else (0, 0, 0, 0)),
        o.stride(0), o.stride(1), o.stride(2), o.stride(3),
        m.stride(0), m.stride(1), m.stride(2),
        BITS=bits, K_GROUP=k_group, V_GROUP=v_group, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_T=BLOCK_T, D=d, INPUT_PRECISION=precision,
    )
    return o, m, l_sum


def _merge(partials) -> torch.Tensor:
    """The attention output [B, Hkv, rows, D] from every chunk's (o, m, l): rescale each to the
    overall max, then divide by the overall sum."""
    o, m, l_sum = (torch.cat(part, dim=2) for part in zip(*partials))
    top = m.amax(dim=2, keepdim=True)
    weight = torch.exp(m - torch.where(torch.isinf(top), torch.zeros_like(top), top))  # exp(-inf) = 0 for empty chunks
    total = (l_sum * weight).sum(dim=2)
    out = (o * weight[..., None]).sum(dim=2) / total[..., None]
    return torch.where(total[..., None] > 0, out, torch.zeros_like(out))  # rows allowed nothing: zeros, as attend gives


# whether this module's kernel was decorated under TRITON_INTERPRET=1 (lqc.codegen.interpreter)
interpreted = functools.partial(decorated_for_interpreter, _kv_partial_kernel)
