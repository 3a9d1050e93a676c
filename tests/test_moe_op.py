"""``lqc::moe_ffn``: the op's fast path against its gather/scatter reference, the dense FFN it
equals with every expert active, its fake (shape) implementation under torch.compile, and
errors that name the inconsistent operand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lqc  # noqa: F401  (registers lqc::moe_ffn)
from lqc.runtime.structural.moe import moe_ffn, moe_ffn_reference


def _experts(experts=4, neurons=6, width=10, out=None, gated=True, bias=False, shared=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = out or width
    return dict(
        router_weight=torch.randn(experts - shared, width, generator=g),
        router_bias=torch.randn(experts - shared, generator=g) if bias else None,
        w_in=torch.randn(experts, neurons, width, generator=g) / width**0.5,
        w_gate=torch.randn(experts, neurons, width, generator=g) / width**0.5 if gated else None,
        b_in=torch.randn(experts, neurons, generator=g) if bias else None,
        w_out=torch.randn(experts, out, neurons, generator=g) / neurons**0.5,
    )


def _relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("tokens", [1, 2, 7, 33])
@pytest.mark.parametrize("shared,top_k", [(0, 1), (0, 2), (0, 5), (1, 1), (2, 3)])
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", False), (False, "gelu", True), (False, "gelu_tanh", True), (True, "relu", False)])
def test_fast_path_equals_reference(tokens, shared, top_k, gated, activation, bias):
    w = _experts(experts=5, gated=gated, bias=bias, out=9, shared=shared)
    x = torch.randn(1, tokens, 10, generator=torch.Generator().manual_seed(tokens))
    expected = moe_ffn_reference(x, **w, shared=shared, top_k=top_k, activation=activation)
    got = torch.ops.lqc.moe_ffn(x, *w.values(), shared, top_k, activation)
    assert got.shape == (1, tokens, 9)
    assert _relative(got, expected) <= 1e-6


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("shared", [0, 1])
def test_every_expert_active_is_the_dense_ffn(gated, shared):
    """Concatenating the experts' neurons gives back the dense FFN they were carved from."""
    w = _experts(experts=3, neurons=5, width=8, gated=gated, bias=not gated, shared=shared)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(1))
    w_in, w_out = w["w_in"].reshape(15, 8), w["w_out"].permute(1, 0, 2).reshape(8, 15)
    if gated:
        dense = F.linear(F.silu(F.linear(x, w["w_gate"].reshape(15, 8))) * F.linear(x, w_in), w_out)
        activation = "silu"
    else:
        dense = F.linear(F.gelu(F.linear(x, w_in, w["b_in"].reshape(15))), w_out)
        activation = "gelu"
    for impl in (moe_ffn, moe_ffn_reference):
        got = impl(x, **w, shared=shared, top_k=3 - shared, activation=activation)
        assert _relative(got, dense) <= 1e-6


@pytest.mark.parametrize("tokens", [1, 5])
def test_routing_follows_the_router(tokens):
    """A router that always prefers routed expert 1 sends every token there, besides the shared expert 0."""
    w = _experts(experts=4, shared=1)
    w["router_weight"] = torch.zeros_like(w["router_weight"])
    w["router_bias"] = torch.tensor([0.0, 5.0, 0.0])
    x = torch.randn(tokens, 10, generator=torch.Generator().manual_seed(2))

    def expert(e):
        return F.linear(F.silu(F.linear(x, w["w_gate"][e])) * F.linear(x, w["w_in"][e]), w["w_out"][e])

    assert _relative(moe_ffn(x, **w, shared=1, top_k=1, activation="silu"), expert(0) + expert(2)) <= 1e-6


def _int8_experts(w):
    """The experts' weights as symmetric per-row int8 codes plus scales (what the quantize pass stores)."""
    out = dict(w)
    for name in ("w_in", "w_gate", "w_out"):
        if w[name] is None:
            continue
        scale = w[name].abs().amax(dim=-1) / 127
        out[name] = torch.round(w[name] / scale[..., None]).clamp(-127, 127).to(torch.int8)
        out[f"{name}_scale"] = scale
    return out


@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("gated,activation,bias", [(True, "silu", False), (False, "gelu", True)])
@pytest.mark.parametrize("scale_dtype,width,neurons,tolerance", [
    (torch.float32, 10, 6, 1e-6),      # codes widened to float32: the reference's math
    (torch.bfloat16, 64, 32, 3e-2),    # torch's int8 CPU kernel, in bfloat16
    (torch.bfloat16, 10, 6, 3e-2),     # bfloat16, widths the kernel cannot take: widened
])
def test_int8_experts_match_the_reference_and_stay_near_float(tokens, gated, activation, bias, scale_dtype, width, neurons, tolerance):
    w = _experts(experts=5, gated=gated, bias=bias, width=width, neurons=neurons, out=width, shared=1)
    q = _int8_experts(w)
    for name in ("w_in_scale", "w_gate_scale", "w_out_scale"):
        if name in q:
            q[name] = q[name].to(scale_dtype)
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(4))
    expected = moe_ffn_reference(x, **q, shared=1, top_k=2, activation=activation)
    got = torch.ops.lqc.moe_ffn(x, *(q[k] for k in w), 1, 2, activation, q["w_in_scale"], q.get("w_gate_scale"), q["w_out_scale"])
    assert got.dtype == torch.float32
    assert _relative(got, expected) <= tolerance
    # the same routing (the router is not quantized): only the weights' rounding (and bfloat16) differs
    assert _relative(got, moe_ffn(x, **w, shared=1, top_k=2, activation=activation)) <= 2e-2 + tolerance


def test_compiles_with_its_fake_implementation():
    w = _experts()
    x = torch.randn(1, 3, 10, generator=torch.Generator().manual_seed(3))

    def f(x):
        return torch.ops.lqc.moe_ffn(x, *w.values(), 0, 2, "silu") + 1

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"w_gate": torch.zeros(4, 5, 10)}, r"w_gate is \(4, 5, 10\), expected \(4, 6, 10\) like w_in"),
        ({"router_weight": torch.zeros(3, 10)}, r"router_weight is \(3, 10\), expected \[4, 10\] \(one row per routed expert\)"),
        ({"shared": 4}, r"shared is 4; it must be between 0 and 3"),
        ({"w_out": torch.zeros(4, 10, 5)}, r"w_out is \(4, 10, 5\), expected \[4, out_features, 6\]"),
        ({"top_k": 5}, r"top_k is 5; it must be between 1 and the 4 routed experts"),
        ({"activation": "tanh"}, r"activation 'tanh' is not one of silu, gelu, gelu_tanh, relu"),
        ({"w_in": torch.zeros(4, 6, 10, dtype=torch.int8)}, r"w_in is torch.int8: int8 codes need w_in_scale"),
        ({"w_out_scale": torch.ones(4, 10)}, r"w_out is torch.float32: int8 codes need w_out_scale, and w_out_scale needs int8 codes"),
        ({"w_gate": torch.zeros(4, 6, 10, dtype=torch.int8), "w_gate_scale": torch.ones(4, 10)},
         r"w_gate_scale is \(4, 10\), expected \[4, 6\] \(one per expert row of w_gate\)"),
    ],
)
def test_reference_errors_name_the_operand(change, message):
    args = {**_experts(), "shared": 0, "top_k": 2, "activation": "silu", **change}
    with pytest.raises(ValueError, match=message):
        moe_ffn_reference(torch.zeros(2, 10), **args)
    with pytest.raises(ValueError, match=r"the input has 9 features, the experts expect 10"):
        moe_ffn_reference(torch.zeros(2, 9), **{**_experts(), "shared": 0, "top_k": 2, "activation": "silu"})


def test_tracing_checks_the_operands():
    """Under torch.compile the fake implementation checks shapes: a clear error at compile time."""
    w = _experts()
    w["w_out"] = torch.zeros(4, 10, 5)

    def f(x):
        return torch.ops.lqc.moe_ffn(x, *w.values(), 0, 2, "silu")

    with pytest.raises(Exception, match=r"w_out is \(4, 10, 5\), expected \[4, out_features, 6\]"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.zeros(1, 3, 10))
