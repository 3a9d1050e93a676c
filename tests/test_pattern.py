"""The pattern matcher: commutative ops, wildcards, single use, explain, and rewrites."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lqc.ir import trace
from lqc.ir.pattern import Pattern, explain


def swiglu(gate, up):
    return F.silu(gate) * up


def swiglu_swapped(gate, up):
    return up * F.silu(gate)


def rms_norm(x, weight, eps):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(torch.float32)


def test_commutative_match_in_both_orders(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    # the model computes silu(gate) * up; a pattern written up * silu(gate) must match too
    for fn in (swiglu, swiglu_swapped):
        matches = Pattern(fn).find(graph)
        assert len(matches) == 2
        for match in matches:
            assert match["gate"].meta["nn_module_stack"]  # bound to graph nodes
            assert "gate_proj" in graph.module_path(match["gate"])
            assert "up_proj" in graph.module_path(match["up"])


def test_wildcard_binds_literal_and_constant(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    matches = Pattern(rms_norm).find(graph)
    assert len(matches) == 5  # 2 per block + the final norm
    assert all(m["eps"] == tiny_llama.config.rms_norm_eps for m in matches)
    assert all(m["weight"].op == "get_attr" for m in matches)


def test_explain_names_the_mismatch(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    up = next(n for n in graph.nodes if graph.module_path(n).endswith("up_proj") and n.op == "call_function")
    text = explain(Pattern(swiglu), up)
    assert text.startswith("swiglu does not match at %" + up.name)
    assert "pattern expects 'mul', the graph has 'linear'" in text
    # a commutative mismatch reports both operand orders
    product = next(n for n in graph.nodes if Pattern(swiglu).match(n) is not None)
    text = explain(Pattern(lambda a, b: torch.relu(a) * b, name="relu_mul"), product)
    assert "tried both operand orders" in text and "'relu'" in text and "'silu'" in text
    assert explain(Pattern(swiglu), product).startswith("swiglu matches at %")


def test_single_use_check():
    def f(x, y):
        s = torch.sigmoid(x)
        return s * y + s  # the sigmoid is used outside the s * y pattern

    graph = trace(f, torch.randn(4), torch.randn(4))
    pattern = Pattern(lambda a, b: torch.sigmoid(a) * b, name="sigmoid_mul")
    mul = next(n for n in graph.nodes if n.op == "call_function" and n.target.__name__ == "mul")
    assert pattern.match(mul) is None
    assert "also used outside the pattern" in explain(pattern, mul)
    assert Pattern(lambda a, b: torch.sigmoid(a) * b, single_use=False).match(mul) is not None


def test_wildcard_used_twice_must_bind_one_node():
    def f(x, y):
        return x * x, x * y

    graph = trace(f, torch.randn(4), torch.randn(4))
    square = Pattern(lambda a: a * a, name="square")
    muls = [n for n in graph.nodes if n.op == "call_function"]
    assert square.match(muls[0]) is not None
    assert square.match(muls[1]) is None
    assert "would bind both" in explain(square, muls[1])


def test_replace_with_keeps_outputs_and_records_provenance(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    with torch.no_grad():
        reference = graph(token_ids)[-1]
    matches = Pattern(swiglu).find(graph)
    replaced = [m.replace_with(lambda gate, up: torch.sigmoid(gate) * gate * up) for m in matches]
    graph.recompile()
    with torch.no_grad():
        out = graph(token_ids)[-1]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert not Pattern(swiglu).find(graph)
    for node, match in zip(replaced, matches):
        assert set(node.meta["lqc_derived_from"]) == {n.name for n in match.nodes.values()}
        assert graph.module_path(node) == graph.module_path(match.anchor) or node.meta.get("nn_module_stack")
