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


def test_each_input_sees_the_replaced_weights_before_it(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    inputs = [(torch.randint(0, 256, token_ids.shape, generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    sites = linear_sites(graph)
    stats = SequentialInputStats(graph, lambda: inputs, sites, progress=False)
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

