"""Affine expressions of one input: the nodes that are affine functions of ``x`` along its last
dimension, found from x forwards, and the constants they read.

What lqc.passes.reparam.merge_adapters builds on: an adapted linear is such an expression (a base
linear on x plus a LoRA, DoRA or Bone branch on the same x), and merging it is composing the
expression into one matrix. The rules, per node (``AffineTerm.rule``): value-preserving casts,
eval-mode dropout and reshapes that keep the last dimension (identity); linears and matmuls with
constant weights (linear); sums and differences with affine or per-channel constant operands (add);
products with constant scalars or per-channel vectors (scale); Bone's block sum, a reshape to
[..., n, r] summed over n (block_sum); zero padding of the last dimension (pad). Operands computed
only from constants (DoRA's scale, Bone-bat's weight) are found by ``ConstantFolder`` and evaluated
with the graph's own ops and dtypes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.ops import is_inplace

CASTS = frozenset({"to", "type", "float", "double", "half", "bfloat16"})
VALUE_IDENTITIES = frozenset({"clone", "contiguous", "detach", "alias"})
RESHAPES = frozenset({"view", "reshape"})
# Ops whose value is not a function of their inputs: never folded into a constant.
_NONDETERMINISTIC = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "empty", "empty_like", "empty_strided", "dropout", "feature_dropout", "alpha_dropout",
})


@dataclass
class AffineTerm:
    """How an affine node combines its operands. ``inputs``: its operands that are x or affine in x."""

    rule: str  # identity | linear | add | scale | block_sum | pad
    inputs: list[fx.Node]
    params: dict[str, Any] = field(default_factory=dict)
    extra: list[fx.Node] = field(default_factory=list)  # non-affine nodes it consumes (block sum's reshape)


def argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class ConstantFolder:
    """Which nodes are computed from constants only, and their values (computed on demand)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.is_const: dict[fx.Node, bool] = {}
        self.values: dict[fx.Node, torch.Tensor] = {}
        for node in graph.nodes:
            self.is_const[node] = self._computes_constant(node)

    def _computes_constant(self, node: fx.Node) -> bool:
        if node.op == "get_attr":
            return True
        if node.op not in ("call_function", "call_method") or node.is_impure() or is_inplace(node):
            return False
        if op_name(node) in _NONDETERMINISTIC:
            return False
        return all(self.is_const.get(n, False) for n in node.all_input_nodes)

    def __call__(self, node: fx.Node) -> bool:
        if node not in self.is_const:  # created by this pass
            self.is_const[node] = self._computes_constant(node)
        return self.is_const[node]

    @torch.no_grad()
    def value(self, node: fx.Node) -> torch.Tensor:
        """The node's value, computed with the graph's own op and dtypes (what the graph computes)."""
        if node not in self.values:
            if node.op == "get_attr":
                self.values[node] = self.graph.constant(node)
            else:
                args = fx.node.map_arg(node.args, self.value)
                kwargs = fx.node.map_arg(node.kwargs, self.value)
                if node.op == "call_method":
                    self.values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    self.values[node] = node.target(*args, **kwargs)
        return self.values[node]

    def ancestors(self, node: fx.Node) -> list[fx.Node]:
        """``node`` and the nodes it is computed from (all constant expressions)."""
        out, stack, seen = [], [node], set()
        while stack:
            n = stack.pop()
            if n not in seen:
                seen.add(n)
                out.append(n)
                stack.extend(n.all_input_nodes)
        return out


def tensor_of(node: Any, graph: Graph) -> torch.Tensor | None:
    """The node's tensor metadata (a fake tensor; a new constant's own value)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val
    if node.op == "get_attr":
        return graph.constant(node)
    return None


class AffineRegion:
    """The nodes affine in one input ``x`` (along the last dimension), found from x forwards."""

    def __init__(self, graph: Graph, folder: ConstantFolder, x: fx.Node, order: dict[fx.Node, int]):
        self.graph, self.folder, self.x = graph, folder, x
        self.terms: dict[fx.Node, AffineTerm] = {}
        x_val = tensor_of(x, graph)
        self.dtype = x_val.dtype if x_val is not None and x_val.is_floating_point() else None
        if self.dtype is None:
            return
        # Operands come before their users, so visiting in graph order decides every operand first.
        heap = [(order[u], u) for u in x.users]
        heapq.heapify(heap)
        seen = set()
        while heap:
            _, node = heapq.heappop(heap)
            if node in seen:
                continue
            seen.add(node)
            term = self._term(node)
            if term is not None:
                self.terms[node] = term
            elif not (op_name(node) in RESHAPES and self.affine(node.args[0])):
                continue  # a reshape that splits the last dimension may feed Bone's block sum
            for user in node.users:
                heapq.heappush(heap, (order[user], user))

    def affine(self, value: Any) -> bool:
        return value is self.x or value in self.terms

    def _const(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.folder(value)

    def _channel_vector(self, value: Any, out: torch.Tensor) -> bool:
        """A number, or a constant broadcasting along the last dimension only ([out], [1, out], [1])."""
        if is_number(value):
            return True
        if not self._const(value):
            return False
        val = tensor_of(value, self.graph)
        if val is None or val.dim() > out.dim() or any(d != 1 for d in val.shape[:-1]):
            return False
        return val.dim() == 0 or val.shape[-1] in (1, out.shape[-1])

    def _term(self, node: fx.Node) -> AffineTerm | None:
        if node.op not in ("call_function", "call_method") or is_inplace(node) or not node.args:
            return None
        out = tensor_of(node, self.graph)
        if out is None or out.dtype != self.dtype:
            return None
        name, args = op_name(node), node.args
        first = args[0]

        if name in CASTS or name in VALUE_IDENTITIES:
            source = tensor_of(first, self.graph)
            if self.affine(first) and source is not None and (source.shape, source.device) == (out.shape, out.device):
                return AffineTerm("identity", [first])
            return None
        if name == "dropout":
            p, training = argument(node, 1, "p", 0.5), argument(node, 2, "training", True)
            if self.affine(first) and (training is False or p == 0):
                return AffineTerm("identity", [first])
            return None
        if name in RESHAPES:
            source = tensor_of(first, self.graph)
            # rows stay whole when the last dimension is kept: the map per row commutes with it
            if self.affine(first) and source is not None and source.shape[-1] == out.shape[-1]:
                return AffineTerm("identity", [first])
            return None
        if name in ("linear", "matmul", "addmm"):
            return self._linear_term(node, name)
        if name in ("add", "sub"):
            return self._add_term(node, name)
        if name in ("mul", "div") and len(args) == 2 and not node.kwargs:  # (div's rounding_mode is not linear)
            a, b = args
            if name == "mul" and not self.affine(a):
                a, b = b, a
            if self.affine(a) and tensor_of(a, self.graph).shape == out.shape and self._channel_vector(b, out):
                return AffineTerm("scale", [a], {"factor": b, "invert": name == "div"})
            return None
        if name == "neg" and self.affine(first):
            return AffineTerm("scale", [first], {"factor": -1, "invert": False})
        if name == "sum":
            return self._block_sum_term(node, out)
        if name == "pad":
            pad, mode, value = argument(node, 1, "pad", None), argument(node, 2, "mode", "constant"), argument(node, 3, "value", None)
            if self.affine(first) and isinstance(pad, (list, tuple)) and len(pad) == 2 and mode == "constant":
                if value in (None, 0) and all(isinstance(p, int) and p >= 0 for p in pad):
                    return AffineTerm("pad", [first], {"pad": tuple(pad)})
            return None
        return None

    def _linear_term(self, node: fx.Node, name: str) -> AffineTerm | None:
        args = node.args
        if name == "linear":
            x, weight, bias = args[0], argument(node, 1, "weight", None), argument(node, 2, "bias", None)
            transposed = False
        elif name == "matmul" and len(args) == 2:
            x, weight, bias, transposed = args[0], args[1], None, True
        elif name == "addmm" and len(args) == 3 and not node.kwargs:
            bias, x, weight, transposed = args[0], args[1], args[2], True
        else:
            return None
        if not (self.affine(x) and self._const(weight) and tensor_of(weight, self.graph).dim() == 2):
            return None
        if bias is not None and not (self._const(bias) and tensor_of(bias, self.graph).dim() == 1):
            return None
        return AffineTerm("linear", [x], {"weight": weight, "bias": bias, "transposed": transposed})

    def _add_term(self, node: fx.Node, name: str) -> AffineTerm | None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        if not is_number(alpha) or len(node.args) > 2:
            return None
        out = tensor_of(node, self.graph)
        sign = -1 if name == "sub" else 1
        parts = [(1, a), (sign * alpha, b)]
        affine = [v for _, v in parts if self.affine(v)]
        if not affine or any(tensor_of(v, self.graph).shape != out.shape for v in affine):
            return None  # an affine operand broadcast to a larger shape is not a per-row map
        if any(not self.affine(v) and not self._channel_vector(v, out) for _, v in parts):
            return None
        return AffineTerm("add", affine, {"parts": parts})

    def _block_sum_term(self, node: fx.Node, out: torch.Tensor) -> AffineTerm | None:
        """Bone: ``x.reshape(..., n, r).sum(dim=-2)``, the sum of the n blocks of r channels."""
        split = node.args[0]
        dim, keepdim = argument(node, 1, "dim", None), argument(node, 2, "keepdim", False)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if not (isinstance(split, fx.Node) and op_name(split) in RESHAPES and self.affine(split.args[0])):
            return None
        source, blocks = tensor_of(split.args[0], self.graph), tensor_of(split, self.graph)
        if keepdim or node.kwargs.get("dtype") is not None or blocks is None or dim not in (-2, blocks.dim() - 2):
            return None
        n, r = blocks.shape[-2], blocks.shape[-1]
        if tuple(blocks.shape[:-2]) != tuple(source.shape[:-1]) or n * r != source.shape[-1]:
            return None
        return AffineTerm("block_sum", [split.args[0]], {"blocks": n, "r": r}, extra=[split])

    # -- expressions -------------------------------------------------------------------------------
    def roots(self) -> list[fx.Node]:
        """Maximal affine nodes: no other affine node reads them."""
        consumed = {n for term in self.terms.values() for n in term.inputs}
        return [n for n in self.terms if n not in consumed]

    def closure(self, root: fx.Node) -> set[fx.Node]:
        """The nodes of the expression computing ``root`` from x (x itself excluded)."""
        nodes, stack = set(), [root]
        while stack:
            n = stack.pop()
            if n is self.x or n in nodes:
                continue
            nodes.add(n)
            stack.extend(self.terms[n].inputs)
            nodes.update(self.terms[n].extra)
        return nodes

    def resolve(self, value: Any) -> Any:
        """``value`` looking through value-preserving ops: x, another affine node, or ``value``."""
        while value is not self.x and value in self.terms and self.terms[value].rule == "identity":
            value = self.terms[value].inputs[0]
        return value

    def source(self, node: fx.Node) -> fx.Node:
        """What a node's first operand is, looking through value-preserving ops: x or an affine node."""
        return self.resolve(self.terms[node].inputs[0])

    def branches(self, nodes: set[fx.Node]) -> int:
        """How many nodes of an expression read x itself (through value-preserving ops)."""
        readers = [n for n in nodes if not (n in self.terms and self.terms[n].rule == "identity")]
        return sum(1 for n in readers if any(self.resolve(i) is self.x for i in n.all_input_nodes))

    def reads_x(self, node: fx.Node) -> bool:
        """Whether a linear's input is x itself, through value-preserving ops only."""
        return self.source(node) is self.x

    def weight_shape(self, node: fx.Node) -> tuple[int, int]:
        term = self.terms[node]
        shape = tuple(tensor_of(term.params["weight"], self.graph).shape)
        return shape[::-1] if term.params["transposed"] else shape
