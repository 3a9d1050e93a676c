"""``fold_norms``: fold a norm's elementwise weight (and bias) into the linears that read it.

A norm ends with an affine map per channel, ``y = gamma * n(h) + beta`` (RMSNorm has no beta).
When every user of y is a linear, that map moves into their weights:

    W y + b = (W diag(gamma)) n(h) + (W beta + b)

so the norm keeps only its normalization ``n(h)``. Exact in real arithmetic; the products are
formed in float64 and cast back. Rotation (lqc.passes.reparam.rotate) needs it: ``n(h)`` commutes with
an orthogonal rotation of h, ``gamma * n(h)`` does not.

A norm whose output also reaches something other than a linear (BERT's post-norm residual) is
left as it is, and so is a LayerNorm bias reaching a linear spelled as a bare ``matmul`` (it has
no bias to absorb ``W beta``). A weight shared by several layers (a tied lm_head) gets its own
folded copy; the table it is tied to is untouched.
"""

from __future__ import annotations

import warnings

from dataclasses import dataclass

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.linear import LinearSite, linear_sites
from lqc.ir.patterns import from_weights
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass
from lqc.passes.reparam.scale_migration import Producer, find_producer


@dataclass
class FoldNormsOptions(PassOptions):
    pass


@dataclass
class FoldNormsReport:
    folded: list[dict]  # {"norm": what the norm was, "into": the linears that took its weight}


@dataclass
class NormFold:
    producer: Producer  # kind "norm": a ``gamma * h`` product, or a layer_norm with weight (and bias)
    consumers: list[LinearSite]

    @property
    def gamma(self) -> fx.Node:
        return self.producer.constants[0]

    @property
    def beta(self) -> fx.Node | None:
        return self.producer.constants[1] if len(self.producer.constants) > 1 else None


def foldable_norms(graph: Graph, selects=lambda node: True) -> list[NormFold]:
    """Norms whose every user is a linear the caller selects, with their consumers."""
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for site in linear_sites(graph):
        by_input.setdefault(site.x, []).append(site)
    folds = []
    for x, sites in by_input.items():
        producer = find_producer(graph, x, sites)
        if producer is None or producer.kind != "norm" or not all(selects(site.node) for site in sites):
            continue
        fold = NormFold(producer, sites)
        if fold.beta is not None and any(op_name(site.node) == "matmul" for site in sites):
            continue  # a bare matmul has no bias to take W beta
        folds.append(fold)
    return folds


def fold_norm(graph: Graph, fold: NormFold, transform=None) -> list[str]:
    """Apply one fold; returns the consumers' names. ``transform(key, sources, fn)`` caches the
    folded weights across graphs (a PassContext's), else they are computed here."""
    compute = transform or (lambda key, sources, fn: fn())
    gamma = graph.constant(fold.gamma).to(torch.float64)
    beta = graph.constant(fold.beta).to(torch.float64) if fold.beta is not None else None
    names = []
    for site in fold.consumers:
        name = site.name(graph)
        names.append(name)
        sources = [site.weight, fold.gamma] + ([fold.beta] if fold.beta is not None else []) + ([site.bias] if site.bias is not None else [])

        def folded(site=site):
            stored = graph.constant(site.weight)
            weight = site.weight_tensor(graph).to(torch.float64)
            new_weight = (weight * gamma[None, :]).to(stored.dtype)
            new_bias = None
            if beta is not None:
                bias = graph.constant(site.bias).to(torch.float64) if site.bias is not None else 0.0
                new_bias = (weight @ beta + bias).to(stored.dtype)
            return (new_weight.T.contiguous() if site.transposed else new_weight), new_bias

        new_weight, new_bias = compute(("fold", name), sources, folded)
        with derived_from(graph, [site.node, site.weight, fold.gamma]):
            weight_node = graph.add_constant(new_weight, f"{name}.weight_folded", graph.fqns(site.weight), before=site.node)
            site.node.replace_input_with(site.weight, weight_node)
            site.weight = weight_node
            if new_bias is not None:
                bias_node = graph.add_constant(new_bias, f"{name}.bias_folded", graph.fqns(site.bias) if site.bias is not None else (), before=site.node)
                _set_bias(site, bias_node)
    _drop_affine(graph, fold.producer)
    return names


def _set_bias(site: LinearSite, bias: fx.Node) -> None:
    node = site.node
    if op_name(node) == "addmm":
        node.update_arg(0, bias)
    elif "bias" in node.kwargs:
        node.update_kwarg("bias", bias)
    elif len(node.args) > 2:
        node.update_arg(2, bias)
    else:
        node.args = (*node.args[:2], bias)
    site.bias = bias


def _drop_affine(graph: Graph, producer: Producer) -> None:
    node = producer.node
    if op_name(node) == "layer_norm":
        args = list(node.args) + [None] * (5 - len(node.args))
        args[2] = args[3] = None  # weight and bias now live in the consumers
        node.args = tuple(args)
        return
    # gamma * h -> h
    h = node.args[1] if node.args[0] is producer.constants[0] else node.args[0]
    node.replace_all_uses_with(h)
    graph.gm.graph.erase_node(node)


@register_pass
class FoldNorms(Pass):
    name = "fold_norms"
    description = "fold RMSNorm / LayerNorm weights (and biases) into the linears that read them (exact)"
    Options = FoldNormsOptions

    def run(self, graph: Graph, ctx) -> PassResult:
        folds = foldable_norms(graph, self.selects)
        rows = []
        for fold in folds:
            norm = fold.producer.describe(graph)
            consumers = fold_norm(graph, fold, lambda key, sources, fn: ctx.transform(graph, key, sources, fn))
            rows.append({"norm": norm, "into": consumers})
        if not rows and (feeding := _norms_feeding_linears(graph)):
            warnings.warn(f"lqc fold_norms: {graph.name} folds no norm: the norms feeding linears ({feeding[0]} and "
                          f"{len(feeding) - 1} more) do not end in a product by a weight vector it recognises "
                          f"(norm(x) * gamma [+ beta])", stacklevel=2)
        return PassResult(matches=len(rows), details=FoldNormsReport(folded=rows))


def _norms_feeding_linears(graph: Graph) -> list[str]:
    """Paths of the norm regions a linear reads that still multiply by a weight (a norm folded
    already has none; batch norms are fold_batchnorm's)."""
    inputs = {site.x.name for site in linear_sites(graph)}
    by_name = {n.name: n for n in graph.nodes}

    def weighted(names) -> bool:
        nodes = [by_name[n] for n in names if n in by_name]
        return not any(op_name(n) == "batch_norm" for n in nodes) and any(
            op_name(n) == "mul" and any(from_weights(a) for a in n.all_input_nodes) for n in nodes)

    return [r.path for r in graph.regions_of_kind("norm") if inputs & set(r.nodes) and weighted(r.nodes)]

