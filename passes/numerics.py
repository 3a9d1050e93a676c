"""Running a graph on check inputs and comparing its outputs (or every node's) with the reference graph's."""

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


class _NodeValues(torch.fx.Interpreter):
    """Runs a GraphModule node by node and hands each node's output to ``on_value``."""

    def __init__(self, gm: torch.fx.GraphModule, on_value):
        super().__init__(gm)
        self.on_value = on_value

    def run_node(self, node: torch.fx.Node) -> Any:
        value = super().run_node(node)
        self.on_value(node, value)
        return value


def reference_names(name: str, sources: dict[str, list[str]], in_reference: set[str]) -> list[str]:
    """The reference nodes a node stands for: itself if the reference has it (a kept node), else
    what the passes created it from (``sources``: created node -> its sources), followed back
    through every pass until names of the reference graph are reached. Nearest first."""
    found, frontier, seen = [], [name], {name}
    while frontier:
        current = frontier.pop(0)
        if current in in_reference:
            found.append(current)
            continue
        for source in sources.get(current, ()):
            if source not in seen:
                seen.add(source)
                frontier.append(source)
    return found


# The reference's activations are held until the compressed graph has run: past this, stop.
NODE_ERRORS_MAX_BYTES = 2 << 30


class ActivationBudgetExceeded(RuntimeError):
    pass


@torch.no_grad()
def node_errors(
    graph: Graph, reference: Graph, inputs: Sequence[Any], sources: dict[str, list[str]],
    *, max_bytes: int = NODE_ERRORS_MAX_BYTES,
) -> dict[str, dict[str, Any]]:
    """Each floating-point node's output against the reference node it stands for, on ``inputs``.

    The counterpart is the nearest of :func:`reference_names` whose output has the same shape (a
    quantized linear stands for the linear it replaced; a kept node for itself, its inputs now
    compressed). Returns ``{name: {"reference": ref name, "sqnr_db": float | None, "cosine": float,
    "rel_error": float}}``; ``sqnr_db`` is None where the output is exact. Nodes without a
    same-shaped counterpart (new reshapes of packed weights, say) are left out.

    Every reference activation is kept until the graph has run; ``ActivationBudgetExceeded`` is
    raised once they pass ``max_bytes`` (long inputs: measure on fewer tokens).
    """
    in_reference = {n.name for n in reference.nodes}
    candidates = {
        node.name: names
        for node in graph.nodes
        if node.op not in ("placeholder", "get_attr", "output")
        and (names := reference_names(node.name, sources, in_reference))
    }
    wanted = {name for names in candidates.values() for name in names}
    stored: dict[str, torch.Tensor] = {}
    held = 0

    def keep(node, value):
        nonlocal held
        if node.name in wanted and isinstance(value, torch.Tensor) and value.is_floating_point():
            stored[node.name] = value.detach()
            held += value.numel() * value.element_size()
            if held > max_bytes:
                raise ActivationBudgetExceeded(
                    f"the reference graph's activations on these inputs pass {max_bytes / 2**30:.1f} GiB; "
                    f"measure on fewer tokens (lqc viz --tokens, or shorter example_inputs)"
                )

    _NodeValues(reference.gm, keep).run(*clone_inputs(inputs))

    errors: dict[str, dict[str, Any]] = {}

    def compare(node, value):
        if node.name not in candidates or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        for name in candidates[node.name]:
            ref = stored.get(name)
            if ref is not None and ref.shape == value.shape:
                errors[node.name] = {"reference": name, **tensor_error(value, ref)}
                return

    _NodeValues(graph.gm, compare).run(*clone_inputs(inputs))
    return errors


def tensor_error(value: torch.Tensor, ref: torch.Tensor) -> dict[str, float | None]:
    """SQNR in dB (None when exact), cosine and relative error of ``value`` against ``ref``, in float64."""
    y, r = value.double().flatten(), ref.double().flatten()
    noise = float((y - r).pow(2).sum())
    signal = float(r.pow(2).sum())
    norms = math.sqrt(signal * float(y.pow(2).sum()))
    cosine = float((y * r).sum()) / norms if norms > 0 else (1.0 if noise == 0 else 0.0)
    if noise == 0:
        sqnr = None
    elif signal == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(signal / noise)
    rel = math.sqrt(noise / signal) if signal > 0 else math.sqrt(noise)
    return {"sqnr_db": sqnr if sqnr is None or math.isfinite(sqnr) else -999.0, "cosine": cosine, "rel_error": rel}
