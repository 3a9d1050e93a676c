"""Running a graph on check inputs and comparing its outputs with the reference graph's."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from lqc.ir import Graph


def clone_inputs(inputs: Sequence[Any]) -> list[Any]:
    # Graphs write into their inputs (static cache buffers, cache counters): run each on copies.
    return [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]


@torch.no_grad()
def run_graph(graph: Graph, inputs: Sequence[Any]) -> list[torch.Tensor]:
    """The graph's floating-point outputs on ``inputs`` (flattened)."""
    out = graph.gm(*clone_inputs(inputs))
    flat = out if isinstance(out, (list, tuple)) else [out]
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare_outputs(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(relative error ||y - y_ref|| / ||y_ref||, cosine) over all outputs together, in float64."""
    if len(outputs) != len(reference):
        return math.nan, math.nan
    diff_sq = ref_sq = dot = out_sq = 0.0
    for y, r in zip(outputs, reference):
        if y.shape != r.shape:
            return math.nan, math.nan
        y, r = y.double(), r.double()
        diff_sq += float((y - r).pow(2).sum())
        ref_sq += float(r.pow(2).sum())
        out_sq += float(y.pow(2).sum())
        dot += float((y * r).sum())
    rel = math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else math.sqrt(diff_sq)
    cos = dot / math.sqrt(ref_sq * out_sq) if ref_sq > 0 and out_sq > 0 else (1.0 if diff_sq == 0 else 0.0)
    return rel, cos


def graph_error(graph: Graph, inputs_list: Sequence[Sequence[Any]], reference_outputs: list[list[torch.Tensor]]) -> tuple[float, float]:
    """Worst relative error and cosine of ``graph`` over several input sets."""
    worst_rel, worst_cos = 0.0, 1.0
    for inputs, ref in zip(inputs_list, reference_outputs):
        rel, cos = compare_outputs(run_graph(graph, inputs), ref)
        if math.isnan(rel):
            return rel, cos
        worst_rel, worst_cos = max(worst_rel, rel), min(worst_cos, cos)
    return worst_rel, worst_cos
