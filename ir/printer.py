"""A readable listing of a Graph: one line per node with its shape, region and provenance.

This is what the pass manager writes into the debug directory after each pass, so it favours
what a person debugging a pass wants to see over round-tripping.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from .graph import Graph
from .ops import op_name
from .shapes import describe_value


def format_arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(format_arg(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {format_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, slice):
        return ":".join("" if v is None else format_arg(v) for v in (arg.start, arg.stop, arg.step)).rstrip(":") or ":"
    return repr(arg)


def format_call(node: fx.Node) -> str:
    args = [format_arg(a) for a in node.args] + [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    return f"{op_name(node)}({', '.join(args)})"


def format_node(graph: Graph, node: fx.Node) -> list[str]:
    """[name, what it computes, value, where/whence] for one node."""
    if node.op == "placeholder":
        inp = next((i for i in graph.inputs if i.name == node.name), None)
        what = f"input {inp.role}" if inp else "input"
    elif node.op == "get_attr":
        fqns = graph.fqns(node)
        what = "const " + (", ".join(fqns) if fqns else str(node.target))
    elif node.op == "output":
        what = "return " + format_arg(node.args[0])
    else:
        what = format_call(node)
    region = node.meta.get("lqc_region")
    notes = [str(region)] if region is not None else []
    prov = node.meta.get("lqc_provenance")
    if prov:
        sources = ", ".join(prov["from"]) or "-"
        notes.append(f"+{prov['pass']} from {sources}")
    return [f"%{node.name}", what, describe_value(node.meta.get("val")), "  ".join(notes)]


def format_graph(graph: Graph) -> str:
    rows = [format_node(graph, n) for n in graph.nodes]
    widths = [min(max((len(r[i]) for r in rows), default=0), cap) for i, cap in enumerate((48, 90, 28))]
    lines = [
        f"# {graph.name}: {len(rows)} nodes, {len(graph.inputs)} inputs, "
        f"{sum(1 for _ in graph.constants())} constants ({graph.param_bytes():,} bytes)"
    ]
    for name, what, value, notes in rows:
        lines.append(f"{name:<{widths[0]}}  {what:<{widths[1]}}  {value:<{widths[2]}}  {notes}".rstrip())
    return "\n".join(lines) + "\n"
