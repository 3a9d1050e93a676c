"""Fusion groups as plain data: what lqc.viz shows of a partition, and what lower_triton records.

``describe_groups(partition)`` gives, for every node in a fusion group, the group, its role, its
kernel template and, for qlinear groups, the kernel target="triton" generates for it (its cache
key; the source itself in ``sources``: the same text whichever target the graph runs on). It
reads the partition only (node names, roles), so it can be taken before lowering rewrites the
graph, and the page can draw it after.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lqc.ir.lqc_ops import qlinear_args

from .epilogue import epilogue_program
from .kernel_cache import source_key
from .qlinear_kernels import qlinear_source
from .templates import kernel_template


@dataclass
class GroupDescription:
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)  # node name -> its group entry
    sources: dict[str, str] = field(default_factory=dict)  # generated kernel key -> its source


def describe_groups(partition) -> GroupDescription:
    described = GroupDescription()
    for index, group in enumerate(partition):
        template = _template(group)
        generated = _generated_source(group)
        if generated is not None:
            key, source, steps = generated
            described.sources.setdefault(key, source)
        for node in group.nodes:
            entry = {
                "group": index,
                "kind": group.kind,
                "anchor": group.anchor.name,
                "role": "anchor" if node is group.anchor else group.roles.get(node, "fused"),
                "members": [n.name for n in group.nodes],
                "template": template,
            }
            if generated is not None:
                entry["source"] = key
                entry["in_kernel"] = node is group.anchor or node.name in steps
            described.kernels[node.name] = entry
    return described


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
