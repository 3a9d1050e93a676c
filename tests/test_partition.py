"""The fusion partitioner (lqc.codegen.partition) on compressed tiny models and hand-built graphs:
one group per lqc op, groups disjoint, the quotient graph a DAG, SwiGLU / residual / bias /
activation epilogues, RMSNorm prologues (a shared norm stays outside), no cycle, no stateful or
in-place work absorbed, and the debug description."""

from __future__ import annotations

import copy

import networkx as nx
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from transformers import DynamicCache

import lqc
import lqc.models
from lqc.codegen.partition import creates_cycle, dataflow_graph, describe, partition
from lqc.ir import Graph, op_name, trace
from tests.graphs import graph_of
from lqc.passes import Calibration, PassContext, PassManager
from lqc.runtime.quantization.formats import quantize_int8

COMPUTING = ("call_function", "call_method", "call_module")


def _ids():
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def _compressed(*entries):
    """tiny Llama through cleanup and ``entries``, captured once (no lqc.compress: faster)."""
    graph = trace(lqc.models.load("tiny-llama").model, _ids())
    PassManager([{"pass": "cleanup"}, *entries]).run(graph, PassContext(progress=False))
    return graph


@pytest.fixture(scope="module")
def int8_graph():
    model = lqc.models.load("tiny-llama").model
    compressed = lqc.compress(model, "int8", progress=False)
    (graph,) = compressed._lqc_compression.graphs
    return graph


@pytest.fixture(scope="module")
def int4_graph():
    return _compressed({"pass": "quantize", "format": "int4", "group_size": 32, "method": "hqq"})


@pytest.fixture(scope="module")
def concat_graph():
    """q/k/v and gate/up stacked into one qlinear each, so every norm has one reader."""
    return _compressed({"pass": "concat_linears"}, {"pass": "quantize", "format": "int8"})


def _nodes(graph, name):
    return [n for n in graph.nodes if op_name(n) == name]


def _check_invariants(graph, part):
    """Every lqc op anchors exactly one group, groups are disjoint, rest is the remainder, and the
    quotient graph (groups contracted) is a DAG, checked with networkx's own quotient_graph."""
    anchors = [n for n in graph.nodes if op_name(n) in ("lqc::qlinear", "lqc::moe_ffn", "lqc::kv_attention",
                                                          "lqc::kv_dynamic_attention", "lqc::kv_static_attention")]
    assert [g.anchor for g in part.groups] == anchors
    grouped = [n for g in part.groups for n in g.nodes]
    assert len(grouped) == len(set(grouped))  # every node in at most one group
    computing = [n for n in graph.nodes if n.op in COMPUTING]
    assert set(grouped) | set(part.rest) == set(computing) and not set(grouped) & set(part.rest)
    for group in part.groups:
        members = set(group.nodes)
        assert group.anchor in members and set(group.prologue) | set(group.epilogue) == members - {group.anchor}
        assert all(i not in members for i in group.inputs) and set(group.outputs) <= members
    assert nx.is_directed_acyclic_graph(part.quotient_graph())
    dataflow = dataflow_graph(graph)
    blocks = [set(g.nodes) for g in part.groups] + [{n} for n in graph.nodes if part.group_of(n) is None]
    assert nx.is_directed_acyclic_graph(nx.quotient_graph(dataflow, blocks))


# -- tiny Llama ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["int8_graph", "int4_graph"])
def test_every_qlinear_anchors_one_group_and_the_quotient_is_a_dag(which, request):
    graph = request.getfixturevalue(which)
    part = partition(graph)
    assert len(part) == len(_nodes(graph, "lqc::qlinear")) == 14 and all(g.kind == "qlinear" for g in part)
    _check_invariants(graph, part)


@pytest.mark.parametrize("which", ["int8_graph", "int4_graph"])
def test_swiglu_multiply_joins_the_later_projection(which, request):
    graph = request.getfixturevalue(which)
    part = partition(graph)
    for silu in _nodes(graph, "silu"):
        (mul,) = silu.users
        gate, up = silu.args[0], next(a for a in mul.args if a is not silu)
        assert "gate_proj" in Graph.module_path(gate) and "up_proj" in Graph.module_path(up)
        group = part.group_of(mul)
        assert group is part.group_of(silu) and group.anchor is up  # up_proj comes after gate_proj
        assert group.roles[mul] == group.roles[silu] == "swiglu"
        assert gate in group.inputs and group.outputs == [mul]
        assert part.group_of(gate).epilogue == []  # the gate kernel writes its raw output


def test_residual_adds_are_absorbed(int8_graph):
    part = partition(int8_graph)
    residuals = [n for n in int8_graph.nodes if op_name(n) == "add" and any(
        isinstance(a, fx.Node) and op_name(a) == "lqc::qlinear" for a in n.args)]
    assert len(residuals) == 4  # o_proj and down_proj of both blocks
    for add in residuals:
        group = part.group_of(add)
        projection = next(a for a in add.args if part.group_of(a) is group)
        assert Graph.module_path(projection).endswith(("o_proj", "down_proj"))
        assert group.roles[add] == "residual" and group.outputs == [add]
        assert len(add.users) > 1  # read by the next norm and the next residual: the group's output


def test_a_norm_shared_by_several_projections_stays_outside(int8_graph):
    part = partition(int8_graph)
    norms = [n for n in int8_graph.nodes if op_name(n) == "mul" and len(n.users) > 1
             and all(op_name(u) == "lqc::qlinear" for u in n.users)]
    assert [len(n.users) for n in norms] == [3, 2, 3, 2]  # q/k/v and gate/up, per block
    for norm in norms:
        assert part.group_of(norm) is None and norm in part.rest
        assert all(norm in part.group_of(q).inputs and not part.group_of(q).prologue for q in norm.users)
    assert not any(g.prologue for g in part)


def test_a_norm_with_one_reader_is_the_prologue(concat_graph):
    part = partition(concat_graph)
    _check_invariants(concat_graph, part)
    assert len(part) == 8  # qkv, o, gate+up, down per block
    with_prologue = [g for g in part if g.prologue]
    assert [Graph.module_path(g.anchor).rsplit(".", 1)[1] for g in with_prologue] == \
           ["q_proj+k_proj+v_proj", "gate_proj+up_proj"] * 2
    for group in with_prologue:
        assert [op_name(n) for n in group.prologue] == ["pow", "mean", "add", "rsqrt", "mul", "mul"]
        assert {group.roles[n] for n in group.prologue} == {"rms_norm"}
        (x,) = [n for n in group.inputs if n.op != "get_attr"]  # the norm's input; the rest are weights
        assert group.prologue[0].args[0] is x and op_name(x) in ("add", "embedding")
    # concat_linears' gate+up: split, halves, silu and multiply all in the one group
    for group in with_prologue[1::2]:
        assert [op_name(n) for n in group.epilogue] == ["split", "getitem", "getitem", "silu", "mul"]
        assert {group.roles[n] for n in group.epilogue} == {"swiglu"} and group.outputs == [group.epilogue[-1]]


def test_describe_mentions_every_group(int8_graph):
    part = partition(int8_graph)
    text = describe(part)
    lines = text.splitlines()
    assert lines[0] == f"{int8_graph.name}: 14 fusion groups, {len(part.rest)} nodes left to Inductor"
    assert len(lines) == 1 + len(part)
    for group, line in zip(part, lines[1:]):
        assert line.split()[:3] == ["qlinear", f"%{group.anchor.name}", Graph.module_path(group.anchor)]
    assert "model.layers.0.mlp.up_proj" in lines[6] and lines[6].endswith("epilogue: swiglu(silu mul)")
    assert lines[4].endswith("epilogue: residual(add)")


def test_a_graph_without_lqc_ops_goes_to_inductor_whole():
    graph = _compressed()
    part = partition(graph)
    assert part.groups == [] and part.rest == [n for n in graph.nodes if n.op in COMPUTING]
    assert describe(part).splitlines() == [f"{graph.name}: 0 fusion groups, {len(part.rest)} nodes left to Inductor"]


def test_moe_ffn_anchors_a_group_with_its_residual():
    calibration = Calibration([torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3))])
    graph = trace(lqc.models.load("tiny-llama").model, _ids())
    recipe = [{"pass": "cleanup"}, {"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 2, "tokens": 500},
              {"pass": "quantize", "format": "int8"}]
    PassManager(recipe).run(graph, PassContext(calibration=calibration, progress=False))
    part = partition(graph)
    _check_invariants(graph, part)
    moes = [g for g in part if g.kind == "moe_ffn"]
    assert len(moes) == 2 and len([g for g in part if g.kind == "qlinear"]) == 8  # q, k, v, o per block
    for group in moes:
        assert [group.roles[n] for n in group.epilogue] == ["residual"] and not group.prologue


def test_kv_attention_groups_own_their_outputs():
    model = lqc.models.load("tiny-llama").model
    compiled = copy.copy(model)
    recipe = [{"pass": "cleanup"}, {"pass": "quantize", "format": "int8"},
              {"pass": "compress_kv", "bits": 4, "group": 4, "residual": 4, "sinks": 1}]
    compiled.forward = torch.compile(model.forward, backend="lqc",
                                     options={"recipe": recipe, "target": "eager", "progress": False})
    with torch.no_grad():
        compiled(_ids(), cache=DynamicCache(config=model.config))
    (graph,) = lqc.session_of(compiled.forward).graphs
    part = partition(graph)
    _check_invariants(graph, part)
    attention = [g for g in part if g.kind == "kv_attention"]
    assert len(attention) == 2 and len(part) == 16
    for group in attention:
        assert op_name(group.anchor) == "lqc::kv_dynamic_attention"
        # (attention, key handle, value handle): the getitems name the kernel's three outputs
        assert [op_name(n) for n in group.epilogue] == ["getitem"] * 3 and group.outputs == group.epilogue
        assert {group.roles[n] for n in group.epilogue} == {"unpack"}


# -- hand-built graphs ------------------------------------------------------------------------------


class _QLinear(torch.nn.Module):
    def __init__(self, width=8, out=8, seed=0):
        super().__init__()
        weight = quantize_int8(torch.randn(out, width, generator=torch.Generator().manual_seed(seed)))
        self.register_buffer("qweight", weight.qweight)
        self.register_buffer("scales", weight.scales)
        self.width, self.out = width, out

    def qlinear(self, x):
        return torch.ops.lqc.qlinear(x, self.qweight, self.scales, None, None, "int8", 0, self.width, self.out)


class SoftmaxResidual(_QLinear):
    """``y + softmax(y)``: the add reads the qlinear both directly and through the softmax."""

    def forward(self, x):
        y = self.qlinear(x)
        return y + torch.softmax(y, dim=-1)


class BiasGeluResidual(_QLinear):
    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.randn(8))

    def forward(self, x, residual):
        return residual + F.gelu(self.qlinear(x) + self.bias)


class RMSNormQLinear(_QLinear):
    """HF's RMSNorm spelling, with the casts to float32 and back, then a qlinear."""

    def __init__(self):
        super().__init__()
        self.register_buffer("weight", torch.ones(8, dtype=torch.bfloat16))

    def forward(self, h):
        x = h.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.qlinear((self.weight * x.to(torch.bfloat16)).to(torch.float32))


class InPlaceEpilogue(_QLinear):
    def forward(self, x):
        return F.relu(self.qlinear(x), inplace=True)


def test_an_add_that_would_close_a_cycle_is_not_absorbed():
    graph = graph_of(SoftmaxResidual(), torch.randn(2, 8))
    qlinear, softmax, add = (graph.find(name) for name in ("qlinear", "softmax", "add"))
    part = partition(graph)
    _check_invariants(graph, part)
    (group,) = part.groups
    assert group.nodes == [qlinear] and part.rest == [softmax, add] and group.outputs == [qlinear]
    # why: qlinear -> softmax -> add leaves the group and comes back; the softmax along with it does not
    dataflow = dataflow_graph(graph)
    assert creates_cycle(dataflow, qlinear, [add])
    assert not creates_cycle(dataflow, qlinear, [softmax, add])
    merged = nx.contracted_nodes(dataflow, qlinear, add, self_loops=False)
    assert not nx.is_directed_acyclic_graph(merged)  # what absorbing the add alone would have made


def test_bias_activation_and_residual_chain():
    graph = graph_of(BiasGeluResidual(), torch.randn(2, 8), torch.randn(2, 8))
    (group,) = partition(graph).groups
    assert [(op_name(n), group.roles[n]) for n in group.epilogue] == [
        ("add", "bias"), ("gelu", "activation"), ("add", "residual")]
    assert [n.name for n in group.inputs] == ["x", "residual", "qweight", "scales", "bias"]  # graph order
    assert group.outputs == [group.epilogue[-1]] and list(group.outputs[0].users)[0].op == "output"


def test_rms_norm_with_casts_is_a_prologue():
    graph = graph_of(RMSNormQLinear(), torch.randn(2, 8, dtype=torch.bfloat16))
    part = partition(graph)
    (group,) = part.groups
    assert [op_name(n) for n in group.prologue] == ["to", "pow", "mean", "add", "rsqrt", "mul", "to", "mul", "to"]
    assert {group.roles[n] for n in group.prologue} == {"rms_norm"}
    assert [n.name for n in group.inputs] == ["h", "weight", "qweight", "scales"] and part.rest == []
    assert "prologue: rms_norm(to pow mean add rsqrt mul to mul to)" in describe(part)


def test_in_place_work_is_never_absorbed():
    graph = graph_of(InPlaceEpilogue(), torch.randn(2, 8))
    part = partition(graph)
    (group,) = part.groups
    assert group.epilogue == [] and [op_name(n) for n in part.rest] == ["relu"]
