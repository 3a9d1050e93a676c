"""AWQ and SmoothQuant in the quantize pass: per-channel scales migrated between a group of linears
sharing an input and the op producing that input, then the scaled weights quantized.

Scales for every group come first (applied to float weights), then every weight is quantized,
as AWQ does: a row scaling of up_proj (for down_proj) must reach up_proj's own quantization.
The searches live in lqc.passes.quantization.awq and .smoothquant; the graph edit of the
producer in lqc.passes.reparam.scale_migration.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from lqc.ir import Graph
from lqc.ir.linear import LinearSite, feeds_attention_scores
from lqc.runtime.quantization.formats import QuantizedWeight, int4_minmax_params, pad_columns, quantize_int4

from lqc.passes.quantization.awq import search_clipping, search_scales
from lqc.passes.quantization.report import MigrationGroup
from lqc.passes.quantization.smoothquant import search_smoothing
from lqc.passes.quantization.weights import gptq_weight, quantize_weight
from lqc.passes.reparam.scale_migration import find_producer, scale_producer


def migrate(opts, graph: Graph, ctx, sites: list[LinearSite], input_stats) -> tuple[dict[str, QuantizedWeight], list[MigrationGroup]]:
    """({layer: its quantized, scaled weight}, the groups) for ``sites``; the producers of the
    groups' inputs are scaled in the graph."""
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for site in sites:
        by_input.setdefault(site.x, []).append(site)
    groups = [(group, find_producer(graph, x, group)) for x, group in by_input.items()]
    names = {id(site): site.name(graph) for site in sites}
    sources = [site.weight for site in sites] + [c for _, p in groups if p for c in p.constants]
    result = ctx.transform(
        graph, ("migrate", tuple(names.values())), list(dict.fromkeys(sources)),
        lambda: _compute(opts, graph, groups, names, input_stats),
    )
    quantized_names = set(names.values())
    report = []
    for (group, producer), group_result in zip(groups, result["groups"]):
        # a producer that is itself quantized here already carries 1/s in its quantized rows
        if producer is not None and not (producer.site is not None and producer.site.name(graph) in quantized_names):
            scale_producer(graph, producer, group_result["scales"])
        report.append(MigrationGroup(
            layers=[names[id(site)] for site in group], alpha=group_result["alpha"],
            scales_into=producer.describe(graph) if producer else None, unclipped=group_result["unclipped"],
        ))
    return result["weights"], report


def _compute(opts, graph: Graph, groups, names: dict, input_stats) -> dict:
    """The cached part: every group's scales, then every scaled weight quantized."""
    weights = {names[id(site)]: site.weight_tensor(graph).to(torch.float32) for group, _ in groups for site in group}
    group_results = [_group_scales(opts, graph, group, producer, names, weights, input_stats) for group, producer in groups]
    quantized = {}
    for (group, _), info in zip(groups, group_results):
        for site in group:
            name = names[id(site)]
            quantized[name] = _quantize_scaled(opts, weights[name], info, clip=name not in info["unclipped"])
    for info in group_results:
        del info["x"], info["stats"]
    return {"groups": group_results, "weights": quantized}


def _group_scales(opts, graph: Graph, group, producer, names: dict, weights: dict, input_stats) -> dict:
    """Search one group's scales and apply them to ``weights`` (the group's columns, and the
    rows of a producing linear that is quantized here too)."""
    stats = input_stats(group[0])
    group_names = [names[id(site)] for site in group]
    if producer is not None:
        group_weights = [weights[n] for n in group_names]
        if opts.smoothquant:
            scales, alpha, _ = search_smoothing(stats.sample, stats.abs_max, group_weights, opts.smooth_alpha)
        else:
            scales, alpha, _ = search_scales(stats.sample, stats.abs_mean, group_weights, opts.group_size, grid=opts.awq_grid)
        for n in group_names:
            weights[n] = weights[n] * scales[None, :]
        if producer.site is not None and producer.site.name(graph) in weights:
            up = producer.site.name(graph)
            weights[up] = weights[up] / scales[:, None]  # rows: the up projection's outputs
    else:
        scales, alpha = torch.ones(stats.width), None
    unclipped = [n for site, n in zip(group, group_names) if feeds_attention_scores(site.node)]
    return {"scales": scales, "alpha": alpha, "unclipped": unclipped, "x": stats.sample / scales, "stats": stats}


def _quantize_scaled(opts, weight: torch.Tensor, info: dict, clip: bool) -> QuantizedWeight:
    """A scaled weight: w8a8 by round to nearest (SmoothQuant); int4 by GPTQ on the scaled inputs'
    Hessian (``awq_gptq``) or by AWQ's clipping search (min/max where ``clip`` is False)."""
    g = opts.group_size
    if opts.smoothquant:
        return quantize_weight(opts, weight)
    if opts.awq_gptq:
        # the inputs are now x / s: their Hessian is diag(1/s) H diag(1/s)
        inv = 1.0 / info["scales"].to(torch.float64)
        hessian = info["stats"].mean_hessian * inv[:, None] * inv[None, :]
        return gptq_weight(opts, weight, info["stats"], hessian=hessian, x=info["x"], clip=clip)
    padded = pad_columns(weight, g)
    if clip:
        group_scales, group_zeros = search_clipping(pad_columns(info["x"], g), padded, g)
    else:
        group_scales, group_zeros = int4_minmax_params(padded, g)
    return quantize_int4(weight, g, group_scales, group_zeros, zero_point=opts.zero_point)
