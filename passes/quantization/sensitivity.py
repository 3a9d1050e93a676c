"""Layer sensitivity: how far the model's output moves when one linear alone is quantized.

For each linear, its weight constant is swapped for the quantized-then-dequantized weight, the
graph runs on calibration inputs, and the relative error of the final outputs against the
float graph's is that layer's sensitivity. One forward per layer: a few minutes for a 135M model
on 2 cores, so ``quantize`` caches the ranking per model (every recompiled graph keeps the same
layers). Quantization here is round-to-nearest of the target format: a proxy that ranks layers
by how much they suffer, not a preview of a calibrated method's error. ``keep_sensitive`` is the
quantize pass's use of it: the k worst layers stay in int8 or float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lqc.ir import Graph
from lqc.ir.linear import LinearSite

from lqc.passes.numerics import clone_inputs, compare_outputs, run_graph
from lqc.passes.quantization.weights import fake_quantize, round_to_nearest


@torch.no_grad()
def layer_sensitivity(
    graph: Graph,
    sites: Sequence[LinearSite],
    inputs: Sequence[Sequence[Any]],
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    progress: bool = False,
) -> list[dict]:
    """[{"layer", "rel_error"}] for each site, most sensitive first. ``fake_quantize`` maps a
    [N, K] float weight to its quantized-then-dequantized value."""
    reference = [run_graph(graph, clone_inputs(i)) for i in inputs]
    rows = []
    for site in tqdm(sites, desc="sensitivity", disable=not progress, leave=False):
        attr = site.weight.target
        original = getattr(graph.gm, attr)
        approx = fake_quantize(site.weight_tensor(graph).to(torch.float32)).to(original.dtype)
        setattr(graph.gm, attr, approx.T.contiguous() if site.transposed else approx)
        try:
            error = max(compare_outputs(run_graph(graph, clone_inputs(i)), ref)[0] for i, ref in zip(inputs, reference))
        finally:
            setattr(graph.gm, attr, original)
        rows.append({"layer": site.name(graph), "rel_error": error})
    return sorted(rows, key=lambda row: -row["rel_error"])


def kept_format(opts) -> str:
    """The format ``keep_sensitive`` keeps its layers in: int8 under int4 for ``auto``, else float."""
    return opts.keep_format if opts.keep_format != "auto" else ("int8" if opts.format == "int4" else "float")


def keep_sensitive(opts, graph: Graph, ctx, sites: list[LinearSite]) -> tuple[list[dict], dict[str, tuple[LinearSite, Any]]]:
    """(the ranking, {layer: (site, its int8 QuantizedWeight, or None to stay float)}) for the
    ``opts.keep_sensitive`` layers whose lone quantization moves the output most."""
    names = [site.name(graph) for site in sites]
    ranking = ctx.transform(
        graph, ("sensitivity", tuple(names)), [site.weight for site in sites],
        lambda: layer_sensitivity(graph, sites, ctx.calibration_inputs(graph, tokens=opts.sensitivity_tokens),
                                  lambda weight: fake_quantize(opts, weight), progress=ctx.progress),
    )
    by_name = dict(zip(names, sites))
    kept = {}
    for row in ranking[: opts.keep_sensitive]:
        site = by_name[row["layer"]]
        keep = None
        if kept_format(opts) == "int8":
            weight = site.weight_tensor(graph)
            keep = ctx.transform(graph, ("kept-int8", row["layer"]), [site.weight], lambda: round_to_nearest("int8", weight, 0))
        kept[row["layer"]] = (site, keep)
    return ranking, kept
