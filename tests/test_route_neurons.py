"""route_neurons (experts of one neuron, the gate as router) and lqc::keep_top_neurons: the op
equals its topk/scatter reference (ties included); an FFN whose gate opens exactly half of its
neurons on every token is routed exactly; the rewritten graph computes what the pass says
(checked against a hand-patched eager model); the skipped-neuron bias is the mean skipped
contribution; every neuron active is the dense model; save/load keeps the logits."""

from __future__ import annotations

import copy
import itertools
import types

import pytest
import torch
import torch.nn.functional as F

import lqc
from lqc.ir import LqcConfigError, op_name, trace
from lqc.passes import Calibration, PassContext, PassManager
from lqc.runtime.structural.neuron_routing import keep_top_neurons, keep_top_neurons_reference


@pytest.fixture
def calibration():
    return Calibration([torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(3))])


def _route(model, ids, calibration, **options):
    graph = trace(model, ids)
    entry = {"pass": "route_neurons", "tokens": 240, **options}
    report = PassManager([entry]).run(graph, PassContext(calibration=calibration, progress=False))
    return graph, report.records[-1]


def _logits(outputs):
    return outputs[-1] if isinstance(outputs, (list, tuple)) else outputs


@pytest.mark.parametrize("shape,k", [((1, 7, 33), 5), ((3, 160), 80), ((2, 5, 16), 16), ((4, 9), 1)])
def test_keep_top_neurons_equals_its_reference(shape, k):
    g = torch.Generator().manual_seed(k)
    hidden, gate = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    weight = torch.rand(shape[-1], generator=g)
    gate[..., ::3] = 0.5  # ties at (and around) the threshold: the lower index wins
    weight[::3] = 1.0
    expected = keep_top_neurons_reference(hidden, gate, weight, k)
    assert torch.equal(keep_top_neurons(hidden, gate, weight, k), expected)
    assert torch.equal(torch.ops.lqc.keep_top_neurons(hidden, gate, weight, k), expected)
    assert ((expected != 0).sum(-1) <= k).all()


def test_bad_operands_and_options_are_named():
    with pytest.raises(ValueError, match="neuron_weight is"):
        keep_top_neurons_reference(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(7), 2)
    with pytest.raises(LqcConfigError, match="active is 0"):
        PassManager([{"pass": "route_neurons", "active": 0}])


def _relu_pairs_llama():
    """A tiny Llama with relu gates in +/- pairs: on every token exactly half of each FFN's
    neurons have a nonzero gate, so routing to the best half is the dense model."""
    config = copy.deepcopy(lqc.models.load("tiny-llama").model.config)
    config.hidden_act = "relu"
    model = type(lqc.models.load("tiny-llama").model)(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate_proj.weight
            half = w.shape[0] // 2
            w[half:] = -w[:half]
    return model


def test_a_gate_that_opens_half_the_neurons_is_routed_exactly(token_ids, calibration):
    model = _relu_pairs_llama()
    reference = _logits(trace(model, token_ids)(token_ids))
    graph, record = _route(model, token_ids, calibration, active=0.5)
    assert record.matches == 2 and len([n for n in graph.nodes if op_name(n) == "lqc::keep_top_neurons"]) == 2
    assert all(layer["bias_norm"] < 1e-6 for layer in record.details.layers)  # nothing open was skipped
    out = _logits(graph(token_ids))
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5


def test_every_neuron_active_is_the_dense_model(tiny_llama, token_ids, calibration):
    reference = _logits(trace(tiny_llama, token_ids)(token_ids))
    graph, record = _route(tiny_llama, token_ids, calibration, active=1.0)
    assert record.details.ffn_weights_read_fraction == 1.0
    out = _logits(graph(token_ids))
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-6


def test_the_graph_computes_the_routed_ffn_with_the_mean_skipped_bias(tiny_llama, token_ids, calibration):
    """The rewritten graph against the eager model with each MLP patched to route by hand with
    the pass's constants; and each bias against the mean skipped contribution recomputed here."""
    graph, record = _route(tiny_llama, token_ids, calibration, active=0.5)
    assert record.details.ffn_weights_read_fraction == pytest.approx((1 + 0.5 + 0.5) / 3, abs=0.01)
    routed = [n for n in graph.nodes if op_name(n) == "lqc::keep_top_neurons"]
    constants = [(graph.constant(n.args[2]), n.args[3], graph.constant(next(iter(n.users)).next.args[1])) for n in routed]
    model = copy.deepcopy(tiny_llama)
    inputs = {}

    def forward(self, x):
        inputs.setdefault(self.index, []).append(x.reshape(-1, x.shape[-1]))
        gate = F.silu(self.gate_proj(x))
        weight, k, bias = constants[self.index]
        return self.down_proj(keep_top_neurons_reference(gate * self.up_proj(x), gate, weight, k)) + bias

    for i, layer in enumerate(model.model.layers):
        layer.mlp.index = i
        layer.mlp.forward = types.MethodType(forward, layer.mlp)
    with torch.no_grad():
        expected = model(token_ids).logits
    out = _logits(graph(token_ids))
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-5
    # the bias: the mean over the calibration tokens of down(hidden - kept), recomputed from the
    # first FFN's inputs on the same calibration windows the pass ran on
    inputs.clear()
    with torch.no_grad():
        for args in calibration.inputs_for(graph, tokens=240):
            model(args[0])
        x = torch.cat(inputs[0])[:240]
        mlp = tiny_llama.model.layers[0].mlp
        gate = F.silu(mlp.gate_proj(x))
        hidden = gate * mlp.up_proj(x)
        weight, k, bias = constants[0]
        skipped = hidden - keep_top_neurons_reference(hidden, gate, weight, k)
    assert torch.allclose(bias, F.linear(skipped, mlp.down_proj.weight).mean(0), atol=1e-5)


def test_routed_and_quantized_model_saves_and_loads(tiny_llama, token_ids, tmp_path):
    calib = torch.randint(0, 256, (1, 600), generator=torch.Generator().manual_seed(5))
    recipe = [{"pass": "route_neurons", "active": 0.5, "tokens": 240}, {"pass": "quantize", "format": "int8"}]
    compressed = lqc.compress(tiny_llama, recipe, calibration=calib, progress=False)
    lqc.save(compressed, tmp_path)
    loaded = lqc.load(tmp_path)
    assert type(loaded.model.layers[0].mlp).__name__ == "RoutedGatedMLP"
    assert type(loaded.model.layers[0].mlp.gate_proj).__name__ == "QLinear"
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, compressed(token_ids).logits)


def test_the_per_layer_split_keeps_the_total_and_is_the_best_additive_split():
    from lqc.passes.structural.neuron_budget import _knapsack

    g = torch.Generator().manual_seed(0)
    steps = [-2, -1, 0, 1, 2]
    widths = [16, 16, 32]
    ks = [{s: round((0.5 + s * 0.125) * n) for s in steps} for n in widths]
    losses = [{s: float(v) for s, v in zip(steps, torch.rand(5, generator=g).sort(descending=True).values)} for _ in widths]
    chosen = _knapsack(losses, widths, ks, steps)
    best = min(
        (sum(losses[i][c] for i, c in enumerate(combo)), combo)
        for combo in itertools.product(steps, repeat=len(widths))
        if sum(ks[i][c] - ks[i][0] for i, c in enumerate(combo)) == 0
    )
    assert sum(losses[i][c] for i, c in enumerate(chosen)) == pytest.approx(best[0])


def test_per_layer_routing_keeps_the_total_number_of_neurons(tiny_llama, token_ids, calibration):
    graph, record = _route(tiny_llama, token_ids, calibration, active=0.5, per_layer=True, per_layer_tokens=48)
    layers = record.details.layers
    assert sum(r["active_neurons"] for r in layers) == sum(round(0.5 * r["neurons"]) for r in layers)
    assert record.details.active_fraction == pytest.approx(0.5, abs=0.01)
    assert torch.isfinite(_logits(graph(token_ids))).all()
