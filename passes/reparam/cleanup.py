"""``cleanup``: remove nodes that compute nothing, so later patterns see the real structure.

HF models trace with many no-ops: ``.to(torch.float32)`` on float32 tensors around every norm,
``cos * 1.0`` (attention scaling of 1), ``.float()`` on floats, and a
``torch._C._log_api_usage_once`` call. Each is replaced by its input when that is exact: same
dtype, shape and device, and nothing later writes into the result in place (a no-op ``.to``
returns its input itself, but ``x * 1.0`` returns a copy, and an in-place write to the copy
must not reach ``x``). Then pure nodes without users are deleted. Ops that write into their
inputs (the static cache's ``index_copy_``) are never deleted.

Regions are preserved: the pass only deletes nodes, so it drops their names from the regions
(``ir.regions``) instead of having the manager re-annotate the graph. When a deleted node could
change what annotate_regions finds (an op it classifies regions by, a module left with no nodes,
or a graph with softmax attention, which it finds within a few nodes of a matmul) the pass
re-annotates itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lqc.ir import Graph, annotate_regions, op_name
from lqc.ir.ops import ACTIVATION_OPS, LINEAR_OPS, is_inplace

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass


@dataclass
class CleanupOptions(PassOptions):
    pass


def _is_identity(node: fx.Node) -> bool:
    name = op_name(node)
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    out, inp = node.meta.get("val"), source.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    same = out.dtype == inp.dtype and out.device == inp.device and _same_shape(out.shape, inp.shape)
    if not same:
        return False
    if name == "to":
        # only dtype/device conversions; copy=True or a memory_format asks for a new tensor.
        return not node.kwargs.get("copy", False) and "memory_format" not in node.kwargs
    if name in ("float", "half", "bfloat16", "double") and len(node.args) == 1:
        return True
    if name == "mul" and len(node.args) == 2:
        return node.args[1] == 1 and not isinstance(node.args[1], bool)
    if name in ("add", "sub") and len(node.args) == 2:
        return node.args[1] == 0 and not isinstance(node.args[1], bool) and "alpha" not in node.kwargs
    if name == "div" and len(node.args) == 2:
        return node.args[1] == 1 and not isinstance(node.args[1], bool)
    return False


def _same_shape(a, b) -> bool:
    """Equal for every value of the graph's symbolic sizes. ``s0 == 2`` on a SymInt is decided by
    its example value and guarded on it: a dynamic graph traced at sequence length 2 had its
    length specialized to 2 (the number of KV heads of a broadcast operand), and fell back."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _written_in_place(node: fx.Node) -> bool:
    return any(is_inplace(user) and user.args and user.args[0] is node for user in node.users)


@dataclass
class CleanupReport:
    identities: int  # no-op nodes replaced by their input
    dead: int  # nodes without users deleted


# ops annotate_regions classifies regions by: deleting one may move a region boundary
_REGION_OPS = LINEAR_OPS | ACTIVATION_OPS | {
    "embedding", "rsqrt", "mean", "layer_norm", "rms_norm", "group_norm", "batch_norm",
    "scaled_dot_product_attention", "softmax", "_softmax", "matmul", "bmm", "baddbmm",
}


def _forget_deleted(graph: Graph, deleted: list[fx.Node]) -> None:
    """Make the region annotations those annotate_regions would compute after ``deleted`` left the graph."""
    if not deleted:
        return
    alive = set(graph.nodes)
    gone_paths = {path for node in deleted for path, _ in graph.module_stack(node)}
    still_there = {path for node in alive for path, _ in graph.module_stack(node)}
    if (
        any(op_name(node) in _REGION_OPS for node in deleted)
        or not gone_paths <= still_there
        or any(op_name(node) in ("softmax", "_softmax") for node in alive)
    ):
        annotate_regions(graph)
        return
    names = {node.name for node in deleted}
    current = {region: dataclasses.replace(region, nodes=tuple(n for n in region.nodes if n not in names))
               for region in graph.regions}
    graph.regions = [region for region in current.values() if region.nodes]
    for node in alive:
        region = node.meta.get("lqc_region")
        if region is not None:
            node.meta["lqc_region"] = current.get(region, region)


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    description = "remove no-op conversions and arithmetic (x.to(same dtype), x*1.0, x+0) and dead code"
    Options = CleanupOptions
    preserves = frozenset({"regions"})

    def run(self, graph: Graph, ctx) -> PassResult:
        before = list(graph.nodes)
        removed_identities = 0
        for node in list(graph.nodes):
            if node.op not in ("call_function", "call_method") or not self.selects(node):
                continue
            if _is_identity(node) and not _written_in_place(node):
                node.replace_all_uses_with(node.args[0])
                graph.gm.graph.erase_node(node)
                removed_identities += 1
        removed_dead = 0
        for node in reversed(list(graph.nodes)):
            if node.op in ("call_function", "call_method") and not node.users and self._is_droppable(node):
                graph.gm.graph.erase_node(node)
                removed_dead += 1
        graph.prune_constants()  # what the manager prunes next: its names leave the regions too
        alive = set(graph.nodes)
        _forget_deleted(graph, [node for node in before if node not in alive])
        return PassResult(
            matches=removed_identities + removed_dead,
            details=CleanupReport(identities=removed_identities, dead=removed_dead),
        )

    @staticmethod
    def _is_droppable(node: fx.Node) -> bool:
        if is_inplace(node):
            return False
        if node.target is torch._C._log_api_usage_once:
            return True  # telemetry only: no value, no effect on the computation
        return not node.is_impure()
