"""Linear sites: every place a graph computes ``x @ W.T (+ b)`` with W a constant.

Three spellings reach us: ``linear(x, W, b)`` (nn.Linear), ``addmm(b, x, W)`` with W stored
[in, out] (GPT-2's Conv1D), and ``matmul(x, W)`` / ``x @ W`` with a constant [in, out] W. Passes that
transform weights (quantization, scale migration, layer dropping, MoE) see them all as a
LinearSite with the weight in nn.Linear's [out, in] orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph import Graph
from .ops import op_name


@dataclass
class LinearSite:
    node: fx.Node
    x: fx.Node
    weight: fx.Node  # the get_attr node
    bias: fx.Node | None
    transposed: bool  # the constant is stored [in, out] (addmm, matmul)

    @property
    def module_path(self) -> str:
        return Graph.module_path(self.node)

    def weight_tensor(self, graph: Graph) -> torch.Tensor:
        """The weight as a contiguous [out_features, in_features] tensor."""
        w = graph.constant(self.weight)
        return w.T.contiguous() if self.transposed else w

    def name(self, graph: Graph) -> str:
        """A readable name: the module path, else the weight's path, else the node."""
        fqns = graph.fqns(self.weight)
        return self.module_path or (fqns[0].rsplit(".", 1)[0] if fqns else self.node.name)


def linear_site(node: fx.Node) -> LinearSite | None:
    name = op_name(node)
    args = node.args
    if name == "linear" and len(args) >= 2 and _const(args[1]):
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if bias is not None and not _const(bias):
            return None
        return LinearSite(node, args[0], args[1], bias, transposed=False)
    if name == "addmm" and len(args) == 3 and _const(args[2]) and _const(args[0]) and not node.kwargs:
        return LinearSite(node, args[1], args[2], args[0], transposed=True)
    if name == "matmul" and len(args) == 2 and _const(args[1]) and _rank(args[1]) == 2:
        return LinearSite(node, args[0], args[1], None, transposed=True)
    return None


def linear_sites(graph: Graph) -> list[LinearSite]:
    return [site for node in graph.nodes if (site := linear_site(node)) is not None]


def _const(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr"


def _rank(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return val.dim() if isinstance(val, torch.Tensor) else None


def feeds_attention_scores(node: fx.Node, depth: int = 12) -> bool:
    """Whether ``node`` flows (through reshapes, rotary embedding...) into the query or key of an
    attention: an sdpa's first two operands, or a matmul followed by a softmax."""
    frontier, seen = [(node, 0)], set()
    while frontier:
        current, d = frontier.pop()
        for user in current.users:
            if user in seen:
                continue
            seen.add(user)
            name = op_name(user)
            if name == "scaled_dot_product_attention" and current in user.args[:2]:
                return True
            if name in ("matmul", "bmm") and any(op_name(u) in ("softmax", "_softmax") for u in _downstream(user, 3)):
                return True
            if d + 1 < depth and name != "scaled_dot_product_attention":
                frontier.append((user, d + 1))
    return False


def _downstream(node: fx.Node, depth: int) -> list[fx.Node]:
    out, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        out += frontier
    return out
