"""What the report adds to a compiled graph's pass records: fusion groups and per-node error.

Called by the backend after the pass manager, on the final graph, while the reference graph and
the graph's inputs are still at hand (``viz=True`` or a ``debug_dir``).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from lqc.codegen.epilogue import epilogue_program
from lqc.codegen.kernel_cache import source_key
from lqc.codegen.partition import partition
from lqc.codegen.qlinear_kernels import qlinear_source
from lqc.codegen.templates import kernel_template
from lqc.ir import Graph
from lqc.ir.lqc_ops import STATEFUL_OPS, qlinear_args
from lqc.passes.numerics import node_errors
from lqc.passes.report import GraphReport

log = logging.getLogger("lqc")


def annotate_kernels(report: GraphReport, graph: Graph) -> None:
    """``report.kernels``: for every node in a fusion group, the group, its role and its kernel
    template; for qlinear groups also the kernel target="triton" generates for it (its cache key,
    the source in ``report.kernel_sources``: the same text whichever target this graph runs on)."""
    for index, group in enumerate(partition(graph)):
        template = _template(group)
        generated = _generated_source(group)
        if generated is not None:
            key, source, steps = generated
            report.kernel_sources.setdefault(key, source)
        for node in group.nodes:
            role = "anchor" if node is group.anchor else group.roles.get(node, "fused")
            entry = {
                "group": index,
                "kind": group.kind,
                "anchor": group.anchor.name,
                "role": role,
                "members": [n.name for n in group.nodes],
                "template": template,
            }
            if generated is not None:
                entry["source"] = key
                entry["in_kernel"] = node is group.anchor or node.name in steps
            report.kernels[node.name] = entry


def _template(group) -> str:
    fmt = size = None
    if group.kind == "qlinear":
        args = qlinear_args(group.anchor)
        fmt, size = args["fmt"], args["group_size"]
    template = kernel_template(group.kind, fmt, size)
    return template or f"no lqc template yet for {group.kind}{f' {fmt}' if fmt else ''}: Inductor compiles it"


def _generated_source(group) -> tuple[str, str, set[str]] | None:
    """(cache key, source, names of the epilogue nodes it computes) of a qlinear group's kernel."""
    if group.kind != "qlinear" or kernel_template(group.kind, qlinear_args(group.anchor)["fmt"]) is None:
        return None
    program = epilogue_program(group.anchor, [n for n in group.epilogue if group.roles.get(n) != "unpack"])
    source = qlinear_source(program)
    return source_key(source), source, {n.name for n in program.nodes}


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
