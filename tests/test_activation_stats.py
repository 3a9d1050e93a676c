"""Calibration statistics against forward hooks on the eager model, and the early stop."""

from __future__ import annotations

import torch

from lqc.ir.capture import trace
from lqc.ir.inputs import inputs_from_tokens
from lqc.ir.linear import linear_sites
from lqc.passes.quantization import activation_stats
from lqc.passes.quantization.activation_stats import collect_input_stats


def test_input_stats_match_forward_hooks_on_the_eager_model(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    block_sites = [s for s in linear_sites(graph) if "lm_head" not in s.module_path]
    batches = [(torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(i)),) for i in range(3)]

    reference: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            rows = args[0].reshape(-1, args[0].shape[-1]).double()
            reference[name] = reference.get(name, 0) + rows.T @ rows
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for (ids,) in batches:
            tiny_llama(ids)
    for h in handles:
        h.remove()

    stats = collect_input_stats(graph, [inputs_from_tokens(graph, ids) for (ids,) in batches],
                                [s.x for s in block_sites], progress=False)
    for site in block_sites:
        expected = reference[site.module_path]
        torch.testing.assert_close(stats[site.x.name].hessian, expected, rtol=1e-5, atol=1e-4)
    assert all(stats[s.x.name].count == 3 * 12 for s in block_sites)


def test_the_recorder_stops_after_the_last_watched_node(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    first_site = linear_sites(graph)[0]
    ran = []

    class Counting(activation_stats._Recorder):
        def run_node(self, node):
            ran.append(node)
            return super().run_node(node)

    recorder = Counting(graph, {first_site.x: activation_stats.InputStats(first_site.x.meta["val"].shape[-1], 0)},
                        torch.Generator().manual_seed(0))
    nodes = list(graph.gm.graph.nodes)
    try:
        recorder.run(*inputs_from_tokens(graph, token_ids))
    except activation_stats._AllRecorded:
        pass
    assert ran == nodes[: nodes.index(first_site.x) + 1]  # nothing after it ran: not the first linear, not the lm_head
