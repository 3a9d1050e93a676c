"""``concat_linears``: linears that read the same input become one wider linear, split after.

``[x W_q^T, x W_k^T, x W_v^T] = x [W_q; W_k; W_v]^T``: stacking the weights along their outputs
and splitting the result is exact (every output is the same dot product), and one matmul over
the stacked weight replaces several smaller ones. A decode step pays a fixed cost per op, so
q/k/v (three matmuls) and gate/up (two) per block become one each.

Only ``linear(x, W, b)`` sites are stacked (the spelling HF Llama-family models trace to), with
the same input node, weight dtype and bias presence. The stacked weight is computed once per
model (the transform cache) and shared by every compiled graph. The new node is named after the
stacked layers (``model.layers.0.self_attn.q_proj+k_proj+v_proj``), so ``targets`` written for
``q_proj`` still select it in later passes.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.linear import LinearSite, linear_sites
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass


@dataclass
class ConcatLinearsOptions(PassOptions):
    min_group: int = field(default=2, metadata={"help": "stack groups of at least this many linears"})


@dataclass
class ConcatLinearsReport:
    stacked: list[dict]  # {"layers": the linears stacked, "into": the stacked linear's name}


def stacked_name(names: list[str]) -> str:
    """``a.b.q_proj``, ``a.b.k_proj`` -> ``a.b.q_proj+k_proj``."""
    prefix = names[0].rsplit(".", 1)[0] + "." if "." in names[0] else ""
    if all(n.startswith(prefix) for n in names):
        return prefix + "+".join(n[len(prefix):] for n in names)
    return "+".join(names)


def concat_groups(graph: Graph, selects=lambda node: True, min_group: int = 2) -> list[list[LinearSite]]:
    """Groups of plain linears sharing an input, in graph order."""
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for site in linear_sites(graph):
        if op_name(site.node) != "linear" or site.transposed or not selects(site.node):
            continue
        by_input.setdefault(site.x, []).append(site)
    groups = []
    for sites in by_input.values():
        # one group per (dtype, bias presence): a mixed set splits into stackable parts
        parts: dict[tuple, list[LinearSite]] = {}
        for site in sites:
            parts.setdefault((graph.constant(site.weight).dtype, site.bias is None), []).append(site)
        groups += [part for part in parts.values() if len(part) >= min_group]
    return groups


def concat_group(graph: Graph, sites: list[LinearSite], transform=None) -> fx.Node:
    """Replace ``sites`` by one linear and a split; returns the new linear node."""
    compute = transform or (lambda key, sources, fn: fn())
    names = [site.name(graph) for site in sites]
    name = stacked_name(names)
    sources = [site.weight for site in sites] + [site.bias for site in sites if site.bias is not None]

    def stacked():
        weight = torch.cat([graph.constant(site.weight) for site in sites], 0)
        bias = torch.cat([graph.constant(site.bias) for site in sites], 0) if sites[0].bias is not None else None
        return weight, bias

    weight, bias = compute(("concat", name), sources, stacked)
    sizes = [int(graph.constant(site.weight).shape[0]) for site in sites]
    g = graph.gm.graph
    first = min(sites, key=lambda site: list(graph.nodes).index(site.node)).node
    fqns = tuple(f for site in sites for f in graph.fqns(site.weight))
    with derived_from(graph, [s.node for s in sites] + [s.weight for s in sites]):
        weight_node = graph.add_constant(weight, f"{name}.weight", fqns, before=first)
        bias_node = graph.add_constant(bias, f"{name}.bias", fqns, before=first) if bias is not None else None
        with g.inserting_before(first):
            linear = g.call_function(F.linear, (sites[0].x, weight_node, bias_node))
            parts = g.call_function(torch.split, (linear, sizes, -1))
            outputs = [g.call_function(operator.getitem, (parts, i)) for i in range(len(sites))]
    # the stacked linear runs "inside" a module named after the layers it stacks
    stack = dict(first.meta.get("nn_module_stack", {}))
    if stack:
        key, (path, cls) = list(stack.items())[-1]
        stack[key + "_concat"] = (stacked_name([s.module_path or n for s, n in zip(sites, names)]), cls)
        stack.pop(key)
    linear.meta["nn_module_stack"] = stack
    for site, out in zip(sites, outputs):
        out.meta["nn_module_stack"] = dict(site.node.meta.get("nn_module_stack", {}))
        site.node.replace_all_uses_with(out)
        g.erase_node(site.node)
    return linear


@register_pass
class ConcatLinears(Pass):
    name = "concat_linears"
    description = "stack linears sharing an input (q/k/v, gate/up) into one linear, split after (exact)"
    Options = ConcatLinearsOptions

    def run(self, graph: Graph, ctx) -> PassResult:
        groups = concat_groups(graph, self.selects, self.options.min_group)
        rows = []
        for sites in groups:
            names = [site.name(graph) for site in sites]
            concat_group(graph, sites, lambda key, sources, fn: ctx.transform(graph, key, sources, fn))
            rows.append({"layers": names, "into": stacked_name(names)})
        return PassResult(matches=len(rows), details=ConcatLinearsReport(stacked=rows))
