"""Layer sensitivity: how far the model's output moves when one linear alone is quantized.

For each linear, its weight constant is swapped for the quantized-then-dequantized weight, the
graph runs on calibration inputs, and the relative error of the final outputs against the
float graph's is that layer's sensitivity. One forward per layer: a few minutes for a 135M model
on 2 cores, so ``quantize`` caches the ranking per model (every recompiled graph keeps the same
layers). Quantization here is round-to-nearest of the target format: a proxy that ranks layers
by how much they suffer, not a preview of a calibrated method's error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lqc.ir import Graph
from lqc.ir.linear import LinearSite

from lqc.passes.numerics import clone_inputs, compare_outputs, run_graph


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
