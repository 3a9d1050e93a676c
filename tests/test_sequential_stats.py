"""GPTQ's sequential statistics: each input's statistics are those of the graph in which every
linear before it runs on its replacement weight, collected in one resumable forward."""

from __future__ import annotations

import copy

import pytest
import torch

from lqc.ir import LqcConfigError, trace
from lqc.ir.linear import linear_sites
from lqc.passes.quantization.activation_stats import collect_input_stats
from lqc.passes.quantization.sequential_stats import SequentialInputStats


def _values(graph, inputs, node_name):
    """The value of one node on each input set (a plain interpreted run)."""
    values = []

    class Capture(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if node.name == node_name:
                values.append(result.reshape(-1, result.shape[-1]))
            return result

    for args in inputs:
        Capture(graph.gm).run(*args)
    return torch.cat(values)


def test_each_input_sees_the_replaced_weights_before_it(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    inputs = [(torch.randint(0, 256, token_ids.shape, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    sites = linear_sites(graph)
    stats = SequentialInputStats(graph, lambda: inputs, sites, progress=False, float_target=True)
    sites = stats.order(sites)
    generator = torch.Generator().manual_seed(0)
    # reference: the same graph traced from a copy of the model, its earlier weights swapped in place
    reference = trace(copy.deepcopy(tiny_llama), token_ids)
    reference_sites = {s.node.name: s for s in linear_sites(reference)}
    checked = set()
    for site in sites:
        recorded = stats(site).mean_hessian.clone()
        if site.x.name not in checked:
            ref_x = reference_sites[site.node.name].x
            expected = collect_input_stats(reference, inputs, [ref_x], progress=False)[ref_x.name].mean_hessian
            torch.testing.assert_close(recorded, expected, rtol=1e-6, atol=1e-9)
            # the float target: the cross term against the untouched graph's input at the same node
            cross = _values(graph, inputs, site.x.name).T @ _values(reference, inputs, ref_x.name)
            torch.testing.assert_close(stats(site).cross, cross.double(), rtol=1e-5, atol=1e-4)
            checked.add(site.x.name)
        weight = site.weight_tensor(graph)
        new = weight + 0.05 * torch.randn(weight.shape, generator=generator)  # a large change, so a missed swap shows
        stats.quantized(site, new)
        ref_site = reference_sites[site.node.name]
        reference.constant(ref_site.weight).copy_(new.T if site.transposed else new)
    assert len(checked) == len({s.x for s in sites}) > 4


def test_out_of_order_requests_and_other_methods_are_refused(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    sites = linear_sites(graph)
    stats = SequentialInputStats(graph, lambda: [(token_ids,)], sites, progress=False)
    ordered = stats.order(sites)
    stats(ordered[-1])
    with pytest.raises(RuntimeError, match="was asked for after the graph ran past it"):
        stats(ordered[0])
    from lqc.passes.quantization.quantize import QuantizeOptions

    with pytest.raises(LqcConfigError, match="quantize.sequential collects GPTQ's statistics layer by layer"):
        QuantizeOptions(format="int4", method="awq", sequential=True)


def test_float_target_weight_is_the_least_squares_map():
    from lqc.passes.quantization.weights import float_target_weight

    generator = torch.Generator().manual_seed(0)
    x_float = torch.randn(4096, 32, generator=generator, dtype=torch.float64)
    x_quant = x_float + 0.1 * torch.randn(4096, 32, generator=generator, dtype=torch.float64)
    weight = torch.randn(8, 32, generator=generator)
    hessian, cross = x_quant.T @ x_quant / 4096, x_float.T @ x_quant / 4096
    target = float_target_weight(weight, cross, hessian, damp=0.0)
    expected = torch.linalg.lstsq(x_quant, x_float @ weight.double().T).solution.T  # argmin ||x_quant W*^T - x_float W^T||
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=1e-5)
    unchanged = float_target_weight(weight, hessian, hessian, damp=0.0)  # inputs the prefix did not change
    torch.testing.assert_close(unchanged, weight, rtol=1e-4, atol=1e-5)
