"""A plain-data picture of a Graph at one moment: what the visualization report draws.

The pass manager takes one after capture and one after every pass (``PassManager(snapshots=True)``),
so the report can show each pass's before and after without keeping a copy of every graph. A
snapshot holds no tensors: names, ops, shapes, module paths, constant bytes and provenance, in
JSON-ready dicts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .graph import Graph
from .ops import op_name
from .printer import format_call
from .shapes import describe_value

_CALL_TEXT_LIMIT = 240  # characters of the call shown in the node panel


def snapshot(graph: Graph) -> dict[str, Any]:
    """``{"nodes": [...], "modules": {path: class}, "blocks": {path: index}}`` for ``graph``.

    Each node: name, op (fx opcode), target (``op_name``), call text, shape (``f32[1, 8, 64]``),
    module path, block index (``None`` outside decoder blocks), the child of the block it lies in
    (``self_attn``, ``mlp``...), region, input node names, constant bytes (a get_attr's own bytes;
    for an op, those of the constants it reads), the constants it reads, and provenance (the pass
    that created it and from which nodes).
    """
    blocks = {r.path: r.block for r in graph.regions if r.kind == "block"}
    modules: dict[str, str] = {}
    constant_info: dict[str, tuple[str, str, int]] = {}  # get_attr node name -> (attr, shape, bytes)
    nodes = []
    for node in graph.nodes:
        for path, cls in graph.module_stack(node):
            modules.setdefault(path, getattr(cls, "__name__", str(cls)))
        module = _module_of(graph, node)
        block, child = _block_of(module, blocks)
        entry: dict[str, Any] = {
            "name": node.name,
            "op": node.op,
            "target": op_name(node),
            "call": _call_text(node),
            "shape": describe_value(node.meta.get("val")),
            "module": module,
            "block": block,
            "child": child,
            "region": str(node.meta["lqc_region"]) if node.meta.get("lqc_region") is not None else "",
            "inputs": [n.name for n in node.all_input_nodes],
            "bytes": 0,
            "constants": [],
            "provenance": node.meta.get("lqc_provenance"),
        }
        if node.op == "get_attr":
            value = getattr(graph.gm, node.target, None)
            nbytes = value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
            entry["bytes"] = nbytes
            entry["fqns"] = list(graph.fqns(node))
            constant_info[node.name] = (str(node.target), describe_value(value), nbytes)
        else:
            reads = [constant_info[n.name] for n in node.all_input_nodes if n.name in constant_info]
            entry["constants"] = [list(c) for c in reads]
            entry["bytes"] = sum(c[2] for c in reads)
        nodes.append(entry)
    return {"name": graph.name, "nodes": nodes, "modules": modules, "blocks": blocks}


def _module_of(graph: Graph, node: fx.Node) -> str:
    """Where a node ran; for a constant, the module that owns it (``...mlp.up_proj.weight`` -> ``...mlp.up_proj``)."""
    if node.op == "get_attr":
        fqns = graph.fqns(node)
        return fqns[0].rsplit(".", 1)[0] if fqns and "." in fqns[0] else ""
    return graph.module_path(node)


def _block_of(module: str, blocks: dict[str, int]) -> tuple[int | None, str]:
    """(block index, the block's child the module lies in) for a module path."""
    for path, index in blocks.items():
        if module == path:
            return index, ""
        if module.startswith(path + "."):
            return index, module[len(path) + 1 :].split(".", 1)[0]
    return None, ""


def _call_text(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr"):
        return str(node.target)
    text = format_call(node) if node.op != "output" else "return"
    return text if len(text) <= _CALL_TEXT_LIMIT else text[: _CALL_TEXT_LIMIT - 1] + "…"
