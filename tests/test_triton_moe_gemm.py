"""The MoE grouped-GEMM kernels against lqc::moe_ffn's reference, under TRITON_INTERPRET=1:
ragged token counts (one token included), widths and neuron counts not multiples of the blocks,
gated and plain experts, biases, int8 and float experts, fp32 (<= 1e-3 relative) and bf16 (<= 1e-2)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from lqc.codegen import moe_gemm  # noqa: E402
from lqc.runtime.structural.moe import moe_ffn_reference  # noqa: E402

if not moe_gemm.interpreted() and not torch.cuda.is_available():
    raise RuntimeError("lqc.codegen.moe_gemm was imported before TRITON_INTERPRET=1 was set and there is no GPU")


def _operands(tokens, width, neurons, d_out, experts, shared, gate, bias, int8, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    routed = experts - shared

    def weight(*shape):
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    x = torch.randn(tokens, width, generator=gen).to(dtype)
    ops = {
        "router_weight": weight(routed, width), "router_bias": None,
        "w_in": weight(experts, neurons, width), "w_gate": weight(experts, neurons, width) if gate else None,
        "b_in": torch.randn(experts, neurons, generator=gen) * 0.1 if bias else None,
        "w_out": weight(experts, d_out, neurons),
    }
    scales = {}
    if int8:
        for name in ("w_in", "w_gate", "w_out"):
            w = ops[name]
            if w is None:
                continue
            s = w.abs().amax(dim=-1) / 127
            ops[name] = torch.round(w / s[..., None]).clamp(-127, 127).to(torch.int8)
            scales[f"{name}_scale"] = s
    return x, ops, scales


CASES = [
    # tokens, width, neurons, d_out, experts, shared, top_k, gate, bias, int8, activation
    (1, 48, 40, 48, 5, 1, 2, True, False, False, "silu"),
    (5, 64, 40, 33, 5, 1, 2, True, True, True, "silu"),
    (19, 40, 72, 40, 6, 0, 3, False, True, False, "gelu_tanh"),
    (19, 48, 40, 48, 4, 2, 1, True, False, True, "relu"),
    (33, 32, 48, 32, 8, 1, 3, True, False, False, "gelu"),
]


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-{'int8' if c[9] else 'float'}-{c[10]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_the_reference(case, dtype):
    tokens, width, neurons, d_out, experts, shared, top_k, gate, bias, int8, activation = case
    x, ops, scales = _operands(tokens, width, neurons, d_out, experts, shared, gate, bias, int8, dtype, seed=tokens * 7 + width)
    out = moe_gemm.moe_ffn_triton(x, shared=shared, top_k=top_k, activation=activation, **ops, **scales)
    # the reference in float32 on the same (bf16-rounded) x: the kernels accumulate in float32
    expected = moe_ffn_reference(x.float(), shared=shared, top_k=top_k, activation=activation, **ops, **scales)
    assert out.dtype == dtype and out.shape == expected.shape
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    assert ((out.float() - expected).norm() / expected.norm()).item() <= tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_epilogue(dtype):
    """The group's residual add: the experts' rows are summed onto the residual (the op's torch
    implementation adds it after the reference); a wrong shape is an error naming both."""
    tokens, width, neurons, d_out, experts, shared, top_k, gate, bias, int8, activation = CASES[1]
    x, ops, scales = _operands(tokens, width, neurons, d_out, experts, shared, gate, bias, int8, dtype, seed=3)
    residual = torch.randn(tokens, d_out, generator=torch.Generator().manual_seed(4)).to(dtype)
    out = moe_gemm.moe_ffn_triton(x, shared=shared, top_k=top_k, activation=activation, **ops, **scales, residual=residual)
    expected = moe_ffn_reference(x.float(), shared=shared, top_k=top_k, activation=activation, **ops, **scales) + residual.float()
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    assert out.dtype == dtype and ((out.float() - expected).norm() / expected.norm()).item() <= tolerance
    with pytest.raises(ValueError, match=r"residual has shape \(5, 32\), expected the output's \(5, 33\)"):
        moe_gemm.moe_ffn_triton(x, shared=shared, top_k=top_k, activation=activation, **ops, **scales,
                                residual=residual[:, :32])


def test_permutation_groups_pairs_by_expert_in_blocks():
    picked = torch.tensor([[0, 2], [2, 1], [0, 1]])  # 3 tokens, routed experts 0..2, 1 shared
    row_ids, block_expert = moe_gemm.permute(picked, shared=1, experts=4, block_m=4)
    assert block_expert.tolist() == [0, 1, 2, 3]  # each expert's run fits one block of 4
    assert row_ids.tolist() == [0, 1, 2, -1, 0, 2, -1, -1, 1, 2, -1, -1, 0, 1, -1, -1]


def test_bad_operands_raise_before_the_kernel():
    x, ops, scales = _operands(3, 48, 40, 48, 5, 1, False, False, False, torch.float32, seed=0)
    with pytest.raises(ValueError, match="top_k is 9"):
        moe_gemm.moe_ffn_triton(x, shared=1, top_k=9, activation="silu", **ops)
