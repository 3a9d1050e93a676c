"""ffn_to_moe on tiny Llama (SwiGLU), GPT-2 (gelu-tanh spelled out, Conv1D) and BERT (post-norm):
every expert active equals the dense model, partial activation cuts FFN FLOPs with a router that
beats chance, the carve is computed once per model, and bad options fail with the fix named.
The balanced clustering it rests on is checked against brute force."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import lqc
from lqc.ir import LqcConfigError, op_name, trace
from lqc.ir.lqc_ops import moe_ffn_args
from lqc.passes import Calibration, PassContext, PassManager, load_recipe
from lqc.passes.lowering import PackCpuLayouts
from lqc.passes.structural.expert_partition import balanced_assignment, balanced_kmeans, partition_neurons


@pytest.fixture
def calibration():
    return Calibration([torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(3))])


def _carve(model, ids, calibration, **options):
    graph = trace(model, ids)
    entry = {"pass": "ffn_to_moe", "experts": 4, "shared": 1, "tokens": 1000, **options}
    report = PassManager([entry]).run(graph, PassContext(calibration=calibration, progress=False))
    return graph, report.records[-1]


def _logits(outputs):
    return outputs[-1] if isinstance(outputs, (list, tuple)) else outputs


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_every_expert_active_equals_the_dense_model(family, token_ids, calibration):
    model = lqc.models.load(family).model
    reference = _logits(trace(model, token_ids)(token_ids))
    graph, record = _carve(model, token_ids, calibration, top_k=3)
    moes = [n for n in graph.nodes if op_name(n) == "lqc::moe_ffn"]
    assert len(moes) == record.matches == 2
    out = _logits(graph(token_ids))
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5
    assert record.details.active_fraction == 1.0


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_half_active_halves_ffn_flops_with_a_router_better_than_chance(family, token_ids, calibration):
    model = lqc.models.load(family).model
    graph, record = _carve(model, token_ids, calibration, top_k=1)
    details = record.details
    assert details.active_fraction == 0.5
    assert details.ffn_flops_per_token_moe < 0.52 * details.ffn_flops_per_token_dense  # + the small router
    for layer in details.layers:
        assert layer["shared_neurons"] == layer["expert_size"] and layer["routed_experts"] == 3
        assert layer["router_recall"] > 1 / 3  # a random router picks the right one of 3 a third of the time
    assert torch.isfinite(_logits(graph(token_ids))).all()


def test_generate_through_compress_carves_once(tiny_llama, token_ids):
    from lqc.passes import DEFAULT_CACHE

    calibration = [torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(4))]
    all_active = [{"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 3, "tokens": 1000}]
    before = DEFAULT_CACHE.computed["ffn_to_moe"]
    compressed = lqc.compress(tiny_llama, all_active, calibration=calibration, progress=False)
    with torch.no_grad():
        for extra in ({}, {"cache_implementation": "static"}):
            expected = tiny_llama.generate(token_ids, max_new_tokens=6, do_sample=False, **extra)
            assert torch.equal(compressed.generate(token_ids, max_new_tokens=6, do_sample=False, **extra), expected)
    assert DEFAULT_CACHE.computed["ffn_to_moe"] - before == 1  # prefill and decode graphs share one carve


def test_targets_and_random_partition(tiny_llama, token_ids, calibration):
    graph, record = _carve(tiny_llama, token_ids, calibration, top_k=1, targets=[r"layers\.0\."])
    assert [row["layer"] for row in record.details.layers] == ["model.layers.0.mlp"]
    assert sum(op_name(n) == "lqc::moe_ffn" for n in graph.nodes) == 1
    _, clustered = _carve(tiny_llama, token_ids, calibration, top_k=1)
    _, random = _carve(tiny_llama, token_ids, calibration, top_k=1, partition="random")
    assert clustered.details.layers[0] != random.details.layers[0]


def test_experts_quantize_to_int8_in_the_same_recipe(tiny_llama, token_ids, calibration):
    """ffn_to_moe then quantize int8: every expert weight becomes int8 codes plus per-row scales
    (a quarter of the bytes), and the logits stay within int8 rounding of the float carve."""
    carve = {"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 2, "tokens": 1000}
    float_graph, _ = _carve(tiny_llama, token_ids, calibration, top_k=2)
    graph = trace(tiny_llama, token_ids)
    # only the FFNs (their experts): the error measured is the experts' rounding alone
    quantize = {"pass": "quantize", "format": "int8", "targets": [r"\.mlp$"]}
    # and the eager/Inductor lowering: torch's int8 CPU kernel runs the experts with bfloat16 scales
    report = PassManager([*load_recipe([carve, quantize]), PackCpuLayouts()]).run(
        graph, PassContext(calibration=calibration, progress=False))
    moes = [n for n in graph.nodes if op_name(n) == "lqc::moe_ffn"]
    assert len(moes) == 2
    for node in moes:
        for name in ("w_in", "w_gate", "w_out"):
            assert graph.constant(moe_ffn_args(node)[name]).dtype == torch.int8
            assert graph.constant(moe_ffn_args(node)[f"{name}_scale"]).dtype == torch.bfloat16  # kernels: true
    experts = [row for row in report.records[1].details.layers if row.kind == "experts"]
    assert [row.layer for row in experts[:3]] == [f"model.layers.0.mlp.experts.{w}" for w in ("w_in", "w_gate", "w_out")]
    assert all(row.bytes_after < 0.3 * row.bytes_before for row in experts)
    assert report.records[1].matches == len(experts) == 6 and len(report.records[2].details.experts) == 2
    reference, out = _logits(float_graph(token_ids)), _logits(graph(token_ids))
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-2


def test_experts_stay_float_under_other_formats_with_a_warning(tiny_llama, token_ids, calibration):
    graph = trace(tiny_llama, token_ids)
    recipe = [{"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 2, "tokens": 1000},
              {"pass": "quantize", "format": "int4", "group_size": 32}]
    with pytest.warns(UserWarning, match=r"the experts of 2 lqc::moe_ffn nodes stay float: expert weights are quantized with format 'int8' only"):
        PassManager(recipe).run(graph, PassContext(calibration=calibration, progress=False))
    for node in graph.nodes:
        if op_name(node) == "lqc::moe_ffn":
            assert graph.constant(moe_ffn_args(node)["w_in"]).dtype == torch.float32


def test_unknown_activation_is_left_dense_with_a_warning(tiny_llama, token_ids, calibration):
    model = copy.deepcopy(tiny_llama)
    model.model.layers[1].mlp.act_fn = torch.nn.Tanh()
    with pytest.warns(UserWarning, match=r"model.layers.1.mlp left dense: the gate's activation is not silu"):
        graph, record = _carve(model, token_ids, calibration, top_k=1)
    assert [row["layer"] for row in record.details.layers] == ["model.layers.0.mlp"]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"top_k": 4}, r"top_k 4 must be between 1 and the 3 routed experts"),
        ({"shared": 4, "top_k": 1}, r"0 <= shared < experts"),
        ({"experts": 3, "top_k": 1}, r"has 160 neurons, not a multiple of experts=3; choose a number of experts that divides 160"),
    ],
)
def test_option_errors(tiny_llama, token_ids, calibration, options, message):
    with pytest.raises(LqcConfigError, match=message):
        _carve(tiny_llama, token_ids, calibration, **options)


def test_balanced_assignment_is_optimal():
    cost = torch.rand(6, 3, generator=torch.Generator().manual_seed(0))
    labels = balanced_assignment(cost, 2)
    assert torch.bincount(labels).tolist() == [2, 2, 2]
    best = min(
        sum(cost[i, c].item() for i, c in enumerate(p)) for p in set(itertools.permutations([0, 0, 1, 1, 2, 2]))
    )
    assert abs(sum(cost[i, c].item() for i, c in enumerate(labels.tolist())) - best) <= 1e-3


def test_clustering_recovers_neurons_that_fire_together():
    """Three planted groups of 8 neurons, each firing on its own third of the tokens."""
    g = torch.Generator().manual_seed(1)
    group_of = torch.randperm(24, generator=g) % 3
    token_group = torch.arange(300) % 3
    hidden = (group_of[None, :] == token_group[:, None]).float() * 5 + 0.1 * torch.randn(300, 24, generator=g)
    labels = balanced_kmeans((hidden.abs() > 1).float().T, 3)
    for planted in range(3):
        assert len(set(labels[group_of == planted].tolist())) == 1
    shared, groups, rate = partition_neurons(hidden, experts=3, shared=0, active_fraction=1 / 3)
    assert len(shared) == 0 and groups.shape == (3, 8)
    assert sorted(sorted(group_of[g].tolist()) for g in groups) == [[0] * 8, [1] * 8, [2] * 8]
