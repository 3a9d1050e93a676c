"""``cleanup``: remove nodes that compute nothing, so later patterns see the real structure.

HF models trace with many no-ops: ``.to(torch.float32)`` on float32 tensors around every norm,
``cos * 1.0`` (attention scaling of 1), ``.float()`` on floats, and a
``torch._C._log_api_usage_once`` call. Each is replaced by its input when that is exact: same
dtype, shape and device, and nothing later writes into the result in place (a no-op ``.to``
returns its input itself, but ``x * 1.0`` returns a copy, and an in-place write to the copy
must not reach ``x``). Then pure nodes without users are deleted. Ops that write into their
inputs (the static cache's ``index_copy_``) are never deleted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.ops import is_inplace

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
    same = out.dtype == inp.dtype and out.device == inp.device and tuple(out.shape) == tuple(inp.shape)
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


def _written_in_place(node: fx.Node) -> bool:
    return any(is_inplace(user) and user.args and user.args[0] is node for user in node.users)


@dataclass
class CleanupReport:
    identities: int  # no-op nodes replaced by their input
    dead: int  # nodes without users deleted


@register_pass
class Cleanup(Pass):
    name = "cleanup"
    description = "remove no-op conversions and arithmetic (x.to(same dtype), x*1.0, x+0) and dead code"
    Options = CleanupOptions

    def run(self, graph: Graph, ctx) -> PassResult:
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
