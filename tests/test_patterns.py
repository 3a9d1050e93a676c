"""The pattern API's pattern-only ops and constraints (ir.pattern, ir.pattern_ops), and the common
transformer patterns written with them (ir.patterns) that lqc's partitioner and prologue use:
RMSNorm with and without its weight and casts, SwiGLU with any activation, and the explanation of
a near miss."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import lqc.models
from lqc.codegen.partition import partition
from lqc.ir import Graph, op_name, trace
from lqc.ir.pattern import OneOf, Pattern, ZeroOrMore, explain
from lqc.ir.patterns import (
    RMS_NORM,
    RMS_NORM_UNWEIGHTED,
    SWIGLU,
    explain_rms_norm,
    is_cast,
    is_vector_constant,
    match_rms_norm,
)
from tests.graphs import graph_of
from lqc.passes import PassContext, PassManager
from lqc.runtime.quantization.formats import quantize_int8


def _output(graph: Graph) -> fx.Node:
    """The graph's (first) output: dynamo's graphs return a tuple, symbolic_trace's the value."""
    out = graph.gm.graph.output_node().args[0]
    return out[0] if isinstance(out, (tuple, list)) else out


class Norm(torch.nn.Module):
    """HF's RMSNorm; ``dim`` and ``weighted`` make near misses and fold_norms' unweighted form."""

    def __init__(self, dim=-1, weighted=True, cast=True):
        super().__init__()
        self.dim, self.weighted, self.cast = dim, weighted, cast
        self.register_buffer("weight", torch.ones(8, dtype=torch.bfloat16))

    def forward(self, h):
        x = h.to(torch.float32) if self.cast else h
        x = x * torch.rsqrt(x.pow(2).mean(self.dim, keepdim=True) + 1e-6)
        return (self.weight * x.to(torch.bfloat16)).to(torch.float32) if self.weighted else x


class NormQLinear(Norm):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        weight = quantize_int8(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)

    def forward(self, h):
        return torch.ops.lqc.qlinear(super().forward(h), self.qweight, self.scales, None, None, "int8", 0, 8, 8)


def _bf16():
    return torch.randn(2, 8, dtype=torch.bfloat16)


# -- the API ----------------------------------------------------------------------------------------


def test_zero_or_more_takes_any_number_of_casts():
    casts = ZeroOrMore(is_cast, "casts")
    pattern = Pattern(lambda x: torch.relu(casts(x)), name="relu_of_casts")
    for spelling, chain in ((lambda h: torch.relu(h), []), (lambda h: torch.relu(h.float()), ["float"]),
                            (lambda h: torch.relu(h.float().half()), ["float", "half"])):
        graph = trace(spelling, torch.randn(4, dtype=torch.bfloat16))
        match = pattern.match(_output(graph))
        assert match is not None and match["x"].op == "placeholder"
        assert sorted(op_name(n) for n in match.graph_nodes) == sorted(["relu", *chain])


def test_zero_or_more_stops_below_a_value_read_outside():
    casts = ZeroOrMore(is_cast, "casts")

    def f(h):
        x = h.float()
        return torch.relu(x.half()), x  # the float cast is also an output

    graph = trace(f, torch.randn(4, dtype=torch.bfloat16))
    relu = next(n for n in graph.nodes if op_name(n) == "relu")
    match = Pattern(lambda x: torch.relu(casts(x)), name="relu_of_casts").match(relu)
    assert op_name(match["x"]) == "float" and [op_name(n) for n in match.graph_nodes] == ["relu", "half"]
    lenient = Pattern(lambda x: torch.relu(casts(x)), single_use=False).match(relu)
    assert lenient["x"].op == "placeholder"


def test_one_of_matches_any_listed_op_with_its_options():
    act = OneOf({"silu", "gelu"}, "act")
    pattern = Pattern(lambda a, b: act(a) * b, name="gated")
    for fn in (lambda a, b: F.silu(a) * b, lambda a, b: b * F.gelu(a, approximate="tanh")):
        graph = trace(fn, torch.randn(4), torch.randn(4))
        match = pattern.match(_output(graph))
        assert match is not None and match["a"].name == "l_a_"
    graph = trace(lambda a, b: torch.relu(a) * b, torch.randn(4), torch.randn(4))
    assert "pattern expects one of ['gelu', 'silu'], the graph has 'relu'" in explain(pattern, _output(graph))
    with pytest.raises(TypeError, match="pattern op"):
        act(torch.randn(2))


def test_constraints_are_checked_as_wildcards_bind():
    graph = graph_of(Norm(), _bf16())
    (mul,) = [n for n in graph.nodes if op_name(n) == "mul" and any(a.op == "get_attr" for a in n.args)]
    # the weight is the first operand: the other order binds the constant and passes the constraint
    assert Pattern(lambda w, h: w * h, constraints={"w": is_vector_constant}).match(mul)["w"].op == "get_attr"
    only_h = Pattern(lambda w, h: w * h, name="w_mul", constraints={"w": lambda v: False})
    assert "wildcard 'w' would bind %weight, which fails <lambda>" in explain(only_h, mul)
    with pytest.raises(ValueError, match="no wildcard z"):
        Pattern(lambda w, h: w * h, constraints={"z": is_vector_constant})


# -- the library's patterns -------------------------------------------------------------------------


def test_rms_norm_in_tiny_llama_with_and_without_weight():
    model = lqc.models.load("tiny-llama").model
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    graph = trace(model, ids)
    matches = RMS_NORM.find(graph)
    assert len(matches) == 5  # 2 per block + the final norm
    assert all(m["eps"] == model.config.rms_norm_eps and m["x"].op != "get_attr" for m in matches)
    PassManager([{"pass": "cleanup"}, {"pass": "fold_norms"}]).run(graph, PassContext(progress=False))
    assert RMS_NORM.find(graph) == [] and len(RMS_NORM_UNWEIGHTED.find(graph)) == 5  # weights moved into the linears


def test_match_rms_norm_binds_the_kernel_arguments():
    graph = graph_of(Norm(), _bf16())
    match = match_rms_norm(_output(graph))
    assert match.pattern is RMS_NORM and match["x"].name == "h" and match["weight"].name == "weight"
    assert [op_name(n) for n in graph.nodes if n in set(match.graph_nodes)] == \
           ["to", "pow", "mean", "add", "rsqrt", "mul", "to", "mul", "to"]
    unweighted = graph_of(Norm(weighted=False, cast=False), torch.randn(2, 8))
    match = match_rms_norm(_output(unweighted))
    assert match.pattern is RMS_NORM_UNWEIGHTED and match["x"].name == "h" and match["eps"] == 1e-6


def test_swiglu_with_any_activation():
    graph = trace(lambda g, u: u * F.gelu(g), torch.randn(4), torch.randn(4))
    match = SWIGLU.match(_output(graph))
    assert match["gate"].name == "l_g_" and match["up"].name == "l_u_"


def test_a_near_miss_is_explained_and_gets_no_prologue():
    # mean over the first dimension is no RMSNorm: the qlinear gets no prologue, and the pattern says why
    graph = graph_of(NormQLinear(dim=0), _bf16())
    (group,) = partition(graph).groups
    assert group.prologue == []
    text = explain_rms_norm(group.anchor.args[0])
    assert text.splitlines()[0].startswith("rms_norm does not match at %to_2")
    assert "wildcard 'dim' would bind 0, which fails is_last_dim" in text
    # the same graph with dim=-1 does get it
    (group,) = partition(graph_of(NormQLinear(), _bf16())).groups
    assert {group.roles[n] for n in group.prologue} == {"rms_norm"} and len(group.prologue) == 9
