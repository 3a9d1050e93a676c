"""How many neurons each routed FFN keeps: the same fraction everywhere, or a per-layer split of
the same total chosen on calibration data (route_neurons' ``per_layer``).

Layers are not equally sensitive. For each routed FFN alone, at each candidate fraction (the
target plus and minus ``step`` and ``2 step``), one run of the graph measures the KL divergence
of the model's next-token distribution from the unrouted model's on calibration tokens, every
other FFN dense. The split is then the one that minimises the summed KLs with the total number
of kept neurons equal to the uniform split's: a multiple-choice knapsack, solved exactly by
dynamic programming over the layers (TEAL's and EvoPress's per-layer allocation, with the
additive estimate in place of EvoPress's search).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lqc.ir import Graph

from lqc.passes.numerics import run_graph
from lqc.passes.structural.drop_choice import kl_per_token, logits_node


def candidate_steps(active: float, step: float) -> list[int]:
    """Offsets (in steps) around ``active`` that stay within (0, 1]."""
    return [s for s in (-2, -1, 0, 1, 2) if 0 < active + s * step <= 1 + 1e-9]


@torch.no_grad()
def allocate(graph: Graph, routed: list[tuple[fx.Node, torch.Tensor | None, dict]], active: float, step: float,
             inputs: list[tuple], progress=None) -> list[int]:
    """k per routed FFN. ``routed``: per FFN its keep_top_neurons node, its skipped-bias constant
    (None without bias) and {k: fitted bias} for every candidate k. Leaves every node and bias as
    the uniform split had them."""
    steps = candidate_steps(active, step)
    widths = [node.args[2].meta["val"].shape[0] if "val" in node.args[2].meta else graph.constant(node.args[2]).numel()
              for node, _, _ in routed]
    ks = [{s: max(1, min(n, round((active + s * step) * n))) for s in steps} for n in widths]
    original = [(node.args[3], None if bias is None else bias.clone()) for node, bias, _ in routed]

    def set_k(i: int, k: int) -> None:
        node, bias, fitted = routed[i]
        node.args = (*node.args[:3], k)
        if bias is not None:
            bias.copy_(fitted[k] if k in fitted else torch.zeros_like(bias))

    for i, n in enumerate(widths):
        set_k(i, n)  # every FFN dense: the reference
    head = logits_node(graph)
    shape = tuple(head.meta["val"].shape) if "val" in head.meta else None

    def kl() -> float:
        graph.gm.recompile()
        total = count = 0
        for args, reference in zip(inputs, references):
            logits = _logits(run_graph(graph, args), shape)
            part, tokens = kl_per_token(logits, reference)
            total, count = total + part, count + tokens
        return total / count

    graph.gm.recompile()
    references = [torch.log_softmax(_logits(run_graph(graph, args), shape).float(), dim=-1) for args in inputs]
    losses = []
    for i in range(len(routed)):
        row = {}
        for s in steps:
            set_k(i, ks[i][s])
            row[s] = kl()
        set_k(i, widths[i])
        losses.append(row)
        if progress is not None:
            progress.update(1)
    chosen = _knapsack(losses, widths, ks, steps)
    for i, (k, bias) in enumerate(original):
        routed[i][0].args = (*routed[i][0].args[:3], k)
        if bias is not None:
            routed[i][1].copy_(bias)
    graph.gm.recompile()
    return [ks[i][s] for i, s in enumerate(chosen)]


def _logits(outputs: list[torch.Tensor], shape) -> torch.Tensor:
    matches = [t for t in outputs if shape is not None and tuple(t.shape) == shape]
    return matches[0] if matches else outputs[0]


def _knapsack(losses: list[dict], widths: list[int], ks: list[dict], steps: list[int]) -> list[int]:
    """Per layer the step minimising the summed loss with the kept neurons summing to the uniform
    split's (offsets counted in neurons, so FFNs of different widths trade fairly)."""
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}  # neurons kept minus uniform -> (loss, steps)
    for i, row in enumerate(losses):
        nxt: dict[int, tuple[float, list[int]]] = {}
        for offset, (loss, picked) in best.items():
            for s in steps:
                if s not in row:
                    continue
                key = offset + ks[i][s] - ks[i][0]
                value = (loss + row[s], picked + [s])
                if key not in nxt or value[0] < nxt[key][0]:
                    nxt[key] = value
        best = nxt
    feasible = [key for key in best if key <= 0]
    return best[max(feasible)][1]
