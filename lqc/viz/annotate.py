"""What the report adds to a compiled graph's pass records: fusion groups and per-node error.

Called by the pipeline (lqc.pipeline) after the recipe and the lowering, on the compressed graph,
while the graph's inputs are at hand (``viz=True`` or a ``debug_dir``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from lqc.codegen.groups import describe_groups
from lqc.codegen.partition import partition
from lqc.ir import Graph
from lqc.ir.lqc_ops import STATEFUL_OPS
from lqc.passes.numerics import node_errors
from lqc.passes.report import GraphReport

log = logging.getLogger("lqc")


def annotate_for_viz(compilation, inputs: Sequence[Any], debug_dir: Path | None) -> None:
    """Fusion groups and per-node error for lqc.viz; with a debug_dir, the report page itself.

    They describe the graph the target runs (after the lowering), except where lower_triton
    replaced the groups by kernel calls: there the compressed graph, whose nodes the groups name."""
    report = compilation.report
    triton = any(r.name == "lower_triton" for r in report.records)
    graph = compilation.graph if triton else compilation.lowered
    report.annotated_step = sum(1 for r in report.records if r.stage == "recipe") if triton else len(report.records)
    annotate_kernels(report, graph)
    shapes = ", ".join(f"{i.name} {list(x.shape)}" for i, x in zip(graph.inputs, inputs)
                       if isinstance(x, torch.Tensor) and i.role != "size")
    annotate_errors(report, graph, compilation.reference, inputs, f"measured on the inputs this graph was compiled with ({shapes})")
    if debug_dir is not None:
        from .html import write_html

        try:
            write_html([report], debug_dir / "report.html", title=f"lqc: {graph.name}")
        except Exception as exc:  # noqa: BLE001 - a debugging aid must not fail the compile
            warnings.warn(f"lqc: could not write {debug_dir / 'report.html'}: {type(exc).__name__}: {exc}", stacklevel=2)


def annotate_kernels(report: GraphReport, graph: Graph) -> None:
    """``report.kernels``: each node's fusion group (codegen.groups). Taken from the lowering's
    record where lower_triton partitioned the graph already, else partitioned here: once either way."""
    lowered = next((r.details for r in report.records if r.name == "lower_triton"), None)
    described = lowered.groups if lowered is not None else describe_groups(partition(graph))
    report.kernels.update(described.kernels)
    for key, source in described.sources.items():
        report.kernel_sources.setdefault(key, source)


def annotate_errors(report: GraphReport, graph: Graph, reference: Graph, inputs: Sequence[Any], described: str) -> None:
    """``report.node_errors``: each node's output against the reference graph's, on ``inputs``."""
    if any(n.target in STATEFUL_OPS for n in graph.nodes):
        report.error_inputs = "not measured: the graph updates a compressed KV cache, so running it again would store its tokens twice"
        return
    sources: dict[str, list[str]] = {}
    for record in report.records:
        sources.update(record.provenance)
    try:
        report.node_errors = node_errors(graph, reference, inputs, sources)
        report.error_inputs = described
    except Exception as exc:  # noqa: BLE001 - the report is a debugging aid; it must not fail a compile
        log.debug("lqc: per-node errors of %s failed", graph.name, exc_info=True)
        report.error_inputs = f"not measured: {type(exc).__name__}: {exc}"
