"""``merge_adapters``: fold PEFT adapters (LoRA, DoRA, Bone) into the weights of the linears they adapt.

A fine-tuned model often reaches the compiler still wrapped in its adapters: every adapted linear
computes its base projection plus an adapter branch on the same input. When the branch is a fixed
linear function of that input, the whole layer is one linear ``y = W' x + b'``, and this pass
replaces the base linear, the branch and their sum by that one linear. It recognises the layers
from the captured graph's dataflow, whatever the module classes (PEFT's eval-mode forwards):

- LoRA: ``base(x) + s * B(A(dropout(x)))``, s = alpha / r  ->  ``W' = W + s B A``;
- DoRA: ``base(x) + (g - 1) * (base(x) - b) + g * s * B(A(x))`` with the per-output-channel
  ``g = m / ||W + s B A||`` (row norms) computed in the graph from constants
  ->  ``W' = diag(g) (W + s B A)``, ``b' = b`` (PEFT rescales the bias-free part only);
- Bone: ``base(x) + sum_k x_k @ bone``, x_k the k-th block of r input channels (x zero-padded to a
  multiple of r)  ->  ``W'[:, k r + j] = W[:, k r + j] + bone[j, :]``, as Bone's own merge;
- Bone "bat" (or any weight computed in the forward from constants): the weight expression is
  evaluated once and becomes a constant.

How. From the input x of each linear with a constant weight, the pass follows the nodes that are
affine functions of x along the last dimension: linears and matmuls with constant weights, sums
and differences of such, products with constant scalars or per-channel vectors, value-preserving
casts, eval-mode dropout, reshapes that keep the last dimension, zero padding, and Bone's block
sum (a reshape to [..., n, r] summed over n). Operands computed only from constants (DoRA's
``g``, bat's weight) are evaluated with the graph's own ops and dtypes. A maximal affine expression
is merged when it contains a base linear on x as wide as the result (so the merged weight is no
larger than the base weight) and it is an adapted layer: x feeds two branches, or a weight is
computed in the graph. A plain linear, a linear times a constant, or a chain of linears (a
factorised layer) is left alone.

Exact: the merged linear computes the same affine map. W' and b' are composed in float64 from the
constants and cast once to the base weight's dtype, so what differs from the unmerged graph is
that one rounding and the summation order of one matmul instead of several.

Left unmerged, with a warning naming the layer: an adapted layer whose intermediate values are also
used outside it, or whose adapter branch is not a fixed linear function of x (dropout in training
mode, a scale read from an input, a cast to another dtype).
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.graph import sanitize
from lqc.ir.ops import is_inplace
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass

_CASTS = frozenset({"to", "type", "float", "double", "half", "bfloat16"})
_VALUE_IDENTITIES = frozenset({"clone", "contiguous", "detach", "alias"})
_RESHAPES = frozenset({"view", "reshape"})
_NORMS = frozenset({"linalg_norm", "linalg_vector_norm", "norm", "vector_norm"})
# Ops whose value is not a function of their inputs: never folded into a constant.
_NONDETERMINISTIC = frozenset({
    "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal", "bernoulli",
    "multinomial", "poisson", "empty", "empty_like", "empty_strided", "dropout", "feature_dropout", "alpha_dropout",
})


@dataclass
class MergeAdaptersOptions(PassOptions):
    pass


@dataclass
class _Term:
    """How an affine node combines its operands. ``inputs``: its operands that are x or affine in x."""

    rule: str  # identity | linear | add | scale | block_sum | pad
    inputs: list[fx.Node]
    params: dict[str, Any] = field(default_factory=dict)
    extra: list[fx.Node] = field(default_factory=list)  # non-affine nodes it consumes (block sum's reshape)


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class _Folder:
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


def _tensor(node: Any, graph: Graph) -> torch.Tensor | None:
    """The node's tensor metadata (a fake tensor; a new constant's own value)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val
    if node.op == "get_attr":
        return graph.constant(node)
    return None


class _Region:
    """The nodes affine in one input ``x`` (along the last dimension), found from x forwards."""

    def __init__(self, graph: Graph, folder: _Folder, x: fx.Node, order: dict[fx.Node, int]):
        self.graph, self.folder, self.x = graph, folder, x
        self.terms: dict[fx.Node, _Term] = {}
        x_val = _tensor(x, graph)
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
            elif not (op_name(node) in _RESHAPES and self.affine(node.args[0])):
                continue  # a reshape that splits the last dimension may feed Bone's block sum
            for user in node.users:
                heapq.heappush(heap, (order[user], user))

    def affine(self, value: Any) -> bool:
        return value is self.x or value in self.terms

    def _const(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.folder(value)

    def _channel_vector(self, value: Any, out: torch.Tensor) -> bool:
        """A number, or a constant broadcasting along the last dimension only ([out], [1, out], [1])."""
        if _is_number(value):
            return True
        if not self._const(value):
            return False
        val = _tensor(value, self.graph)
        if val is None or val.dim() > out.dim() or any(d != 1 for d in val.shape[:-1]):
            return False
        return val.dim() == 0 or val.shape[-1] in (1, out.shape[-1])

    def _term(self, node: fx.Node) -> _Term | None:
        if node.op not in ("call_function", "call_method") or is_inplace(node) or not node.args:
            return None
        out = _tensor(node, self.graph)
        if out is None or out.dtype != self.dtype:
            return None
        name, args = op_name(node), node.args
        first = args[0]

        if name in _CASTS or name in _VALUE_IDENTITIES:
            source = _tensor(first, self.graph)
            if self.affine(first) and source is not None and (source.shape, source.device) == (out.shape, out.device):
                return _Term("identity", [first])
            return None
        if name == "dropout":
            p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
            if self.affine(first) and (training is False or p == 0):
                return _Term("identity", [first])
            return None
        if name in _RESHAPES:
            source = _tensor(first, self.graph)
            # rows stay whole when the last dimension is kept: the map per row commutes with it
            if self.affine(first) and source is not None and source.shape[-1] == out.shape[-1]:
                return _Term("identity", [first])
            return None
        if name in ("linear", "matmul", "addmm"):
            return self._linear_term(node, name)
        if name in ("add", "sub"):
            return self._add_term(node, name)
        if name in ("mul", "div") and len(args) == 2 and not node.kwargs:  # (div's rounding_mode is not linear)
            a, b = args
            if name == "mul" and not self.affine(a):
                a, b = b, a
            if self.affine(a) and _tensor(a, self.graph).shape == out.shape and self._channel_vector(b, out):
                return _Term("scale", [a], {"factor": b, "invert": name == "div"})
            return None
        if name == "neg" and self.affine(first):
            return _Term("scale", [first], {"factor": -1, "invert": False})
        if name == "sum":
            return self._block_sum_term(node, out)
        if name == "pad":
            pad, mode, value = _arg(node, 1, "pad", None), _arg(node, 2, "mode", "constant"), _arg(node, 3, "value", None)
            if self.affine(first) and isinstance(pad, (list, tuple)) and len(pad) == 2 and mode == "constant":
                if value in (None, 0) and all(isinstance(p, int) and p >= 0 for p in pad):
                    return _Term("pad", [first], {"pad": tuple(pad)})
            return None
        return None

    def _linear_term(self, node: fx.Node, name: str) -> _Term | None:
        args = node.args
        if name == "linear":
            x, weight, bias = args[0], _arg(node, 1, "weight", None), _arg(node, 2, "bias", None)
            transposed = False
        elif name == "matmul" and len(args) == 2:
            x, weight, bias, transposed = args[0], args[1], None, True
        elif name == "addmm" and len(args) == 3 and not node.kwargs:
            bias, x, weight, transposed = args[0], args[1], args[2], True
        else:
            return None
        if not (self.affine(x) and self._const(weight) and _tensor(weight, self.graph).dim() == 2):
            return None
        if bias is not None and not (self._const(bias) and _tensor(bias, self.graph).dim() == 1):
            return None
        return _Term("linear", [x], {"weight": weight, "bias": bias, "transposed": transposed})

    def _add_term(self, node: fx.Node, name: str) -> _Term | None:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        if not _is_number(alpha) or len(node.args) > 2:
            return None
        out = _tensor(node, self.graph)
        sign = -1 if name == "sub" else 1
        parts = [(1, a), (sign * alpha, b)]
        affine = [v for _, v in parts if self.affine(v)]
        if not affine or any(_tensor(v, self.graph).shape != out.shape for v in affine):
            return None  # an affine operand broadcast to a larger shape is not a per-row map
        if any(not self.affine(v) and not self._channel_vector(v, out) for _, v in parts):
            return None
        return _Term("add", affine, {"parts": parts})

    def _block_sum_term(self, node: fx.Node, out: torch.Tensor) -> _Term | None:
        """Bone: ``x.reshape(..., n, r).sum(dim=-2)``, the sum of the n blocks of r channels."""
        split = node.args[0]
        dim, keepdim = _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False)
        if isinstance(dim, (list, tuple)) and len(dim) == 1:
            dim = dim[0]
        if not (isinstance(split, fx.Node) and op_name(split) in _RESHAPES and self.affine(split.args[0])):
            return None
        source, blocks = _tensor(split.args[0], self.graph), _tensor(split, self.graph)
        if keepdim or node.kwargs.get("dtype") is not None or blocks is None or dim not in (-2, blocks.dim() - 2):
            return None
        n, r = blocks.shape[-2], blocks.shape[-1]
        if tuple(blocks.shape[:-2]) != tuple(source.shape[:-1]) or n * r != source.shape[-1]:
            return None
        return _Term("block_sum", [split.args[0]], {"blocks": n, "r": r}, extra=[split])

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
        shape = tuple(_tensor(term.params["weight"], self.graph).shape)
        return shape[::-1] if term.params["transposed"] else shape

    @torch.no_grad()
    def compose(self, root: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M, c) in float64 with ``root = x @ M.T + c`` (c None: no bias)."""
        width = _tensor(self.x, self.graph).shape[-1]
        memo: dict[fx.Node, tuple] = {self.x: (None, None)}  # None: the identity / no offset

        def matrix(m):
            return torch.eye(width, dtype=torch.float64) if m is None else m

        def const64(value, size):
            if _is_number(value):
                return torch.full((size,), float(value), dtype=torch.float64)
            vec = self.folder.value(value).to(torch.float64).reshape(-1)
            return vec.expand(size).clone() if vec.numel() == 1 else vec

        def affine(node):
            if node in memo:
                return memo[node]
            term = self.terms[node]
            size = _tensor(node, self.graph).shape[-1]
            if term.rule == "identity":
                result = affine(term.inputs[0])
            elif term.rule == "linear":
                m, c = affine(term.inputs[0])
                w = self.folder.value(term.params["weight"]).to(torch.float64)
                w = w.T if term.params["transposed"] else w
                m, c = (w if m is None else w @ m), (None if c is None else w @ c)
                if term.params["bias"] is not None:
                    bias = self.folder.value(term.params["bias"]).to(torch.float64)
                    c = bias if c is None else c + bias
                result = (m, c)
            elif term.rule == "add":
                m_sum = torch.zeros(size, width, dtype=torch.float64)
                c_sum = None
                for coef, value in term.params["parts"]:
                    if self.affine(value):
                        m, c = affine(value)
                        m_sum = m_sum + coef * matrix(m)
                    else:
                        c = const64(value, size)
                    if c is not None:
                        c_sum = coef * c if c_sum is None else c_sum + coef * c
                result = (m_sum, c_sum)
            elif term.rule == "scale":
                m, c = affine(term.inputs[0])
                k = const64(term.params["factor"], size)
                k = 1 / k if term.params["invert"] else k
                result = (k[:, None] * matrix(m), None if c is None else k * c)
            elif term.rule == "block_sum":
                m, c = affine(term.inputs[0])
                n, r = term.params["blocks"], term.params["r"]
                # output channel j sums input channels j, r + j, 2r + j, ...
                summing = torch.eye(r, dtype=torch.float64).repeat(1, n)
                result = (summing @ matrix(m), None if c is None else summing @ c)
            elif term.rule == "pad":
                m, c = affine(term.inputs[0])
                left, right = term.params["pad"]
                m = F.pad(matrix(m), (0, 0, left, right))
                result = (m, None if c is None else F.pad(c, (left, right)))
            else:
                raise AssertionError(term.rule)
            memo[node] = result
            return result

        m, c = affine(root)
        return matrix(m), c


@dataclass
class _Layer:
    """A candidate layer: the affine expression computing ``root`` from x."""

    root: fx.Node
    nodes: set[fx.Node]
    escaping: list[fx.Node]  # nodes of the expression whose value is also used outside it
    base: fx.Node | None  # a linear reading x, with a weight as large as the whole layer's
    adapted: bool  # x feeds two branches, or a weight is computed in the graph


@register_pass
class MergeAdapters(Pass):
    name = "merge_adapters"
    description = "fold LoRA, DoRA and Bone adapters into their base linear's weight (exact)"
    Options = MergeAdaptersOptions

    def run(self, graph: Graph, ctx) -> PassResult:
        folder = _Folder(graph)
        merged: dict[str, dict] = {}
        unmerged: dict[str, str] = {}
        done_inputs: set[fx.Node] = set()
        erased: set[fx.Node] = set()
        order = {n: i for i, n in enumerate(graph.nodes)}

        def leave(layer: str, reason: str) -> None:
            if layer not in unmerged:
                unmerged[layer] = reason
                warnings.warn(f"merge_adapters: {layer} left unmerged: {reason}", stacklevel=3)

        for node in list(graph.nodes):
            if node in erased or op_name(node) not in ("linear", "matmul", "addmm"):
                continue
            weight = node.args[2] if op_name(node) == "addmm" else _arg(node, 1, "weight", None)
            if not (isinstance(weight, fx.Node) and folder(weight)):
                continue  # not a layer: attention's q @ k.T, for one
            x = self._layer_input(graph, node, folder)
            if x is None or x in done_inputs:
                continue
            done_inputs.add(x)
            region = _Region(graph, folder, x, order)
            for top in region.roots():
                layers = self._layers(region, top)
                mergeable = [layer for layer in layers if layer.base is not None and layer.adapted and not layer.escaping]
                for layer in layers:  # outermost first: nothing is merged before its enclosing candidates are checked
                    if layer.base is None or not self.selects(layer.root):
                        continue
                    branch = self._unmergeable_branch(region, layer, order)
                    if branch is not None:
                        leave(*branch)
                        continue
                    name = graph.module_path(layer.root) or layer.root.name
                    if not layer.adapted:
                        continue  # a plain linear (maybe scaled, or a factorised chain): nothing to merge
                    if layer.escaping:
                        if not any(m.nodes < layer.nodes for m in mergeable):
                            # (else it reaches past an adapted layer into what follows: that layer merges on its own)
                            escaping = ", ".join(f"%{n.name}" for n in sorted(layer.escaping, key=order.get))
                            leave(name, f"{escaping} inside the adapted layer also feed other nodes")
                        continue
                    info = self._merge(graph, ctx, folder, region, layer, order)
                    if isinstance(info, str):
                        leave(name, info)
                        continue
                    erased.update(info.pop("erased"))
                    merged[name] = info
            order = {n: i for i, n in enumerate(graph.nodes)}
        if merged:
            graph.prune_constants()
            graph.recompile()
        return PassResult(
            matches=len(merged),
            details={"merged": merged, "unmerged": unmerged},
            message=f"{len(merged)} adapted layers merged, {len(unmerged)} left unmerged",
        )

    @staticmethod
    def _layer_input(graph: Graph, node: fx.Node, folder: _Folder) -> fx.Node | None:
        """The input of a linear-like node, before value-preserving casts and eval dropout."""
        x = node.args[1] if op_name(node) == "addmm" else node.args[0]
        if not isinstance(x, fx.Node) or folder(x):
            return None
        while op_name(x) in _CASTS | _VALUE_IDENTITIES | {"dropout"} and isinstance(x.args[0], fx.Node):
            if op_name(x) == "dropout" and not (_arg(x, 2, "training", True) is False or _arg(x, 1, "p", 0.5) == 0):
                break
            source, out = _tensor(x.args[0], graph), _tensor(x, graph)
            if source is None or out is None or (source.dtype, source.shape, source.device) != (out.dtype, out.shape, out.device):
                break
            x = x.args[0]
        return x

    @staticmethod
    def _layers(region: _Region, top: fx.Node) -> list[_Layer]:
        """Candidate layers under a maximal affine node, outermost first. An expression whose inner
        values are used elsewhere is no layer as a whole; the nodes that escape it may be (an
        adapted linear followed by GELU's ``0.5 * h``: the expression reaches into the GELU, the
        adapted linear's output escapes it and is the layer)."""
        width = _tensor(region.x, region.graph).shape[-1]
        layers, stack, seen = [], [top], set()
        while stack:
            root = stack.pop(0)
            if root in seen:
                continue
            seen.add(root)
            nodes = region.closure(root)
            escaping = [n for n in nodes - {root} if any(u not in nodes for u in n.users)]
            size = _tensor(root, region.graph).shape[-1]
            linears = [n for n in nodes if n in region.terms and region.terms[n].rule == "linear"]
            base = next((n for n in linears if region.reads_x(n) and region.weight_shape(n) == (size, width)), None)
            computed = any(region.terms[n].params["weight"].op != "get_attr" for n in linears)
            adapted = base is not None and (region.branches(nodes) >= 2 or computed)
            layers.append(_Layer(root, nodes, escaping, base, adapted))
            stack.extend(n for n in escaping if n in region.terms)
        return layers

    def _merge(self, graph: Graph, ctx, folder: _Folder, region: _Region, layer: _Layer, order) -> dict | str:
        """Replace the layer by one linear: its details, or why it stays."""
        root, nodes = layer.root, layer.nodes
        name = graph.module_path(root) or root.name
        if tuple(_tensor(root, graph).shape[:-1]) != tuple(_tensor(region.x, graph).shape[:-1]):
            return "its output is reshaped relative to its input"
        dtype = folder.value(region.terms[layer.base].params["weight"]).dtype
        constants = self._constant_inputs(folder, region, nodes)

        def compose():
            matrix, offset = region.compose(root)
            return matrix.to(dtype).contiguous(), (offset.to(dtype) if offset is not None else None)

        try:
            # once per model: every graph dynamo captures (prefill, decode) shares the merged weights
            matrix, offset = ctx.transform(graph, ("merged", name), [c for c in constants if c.op == "get_attr"], compose)
        except Exception as exc:  # noqa: BLE001 - a constant that does not evaluate: leave the layer as it is
            return f"its constants do not evaluate ({type(exc).__name__}: {exc})"
        info = {
            "kinds": self._kinds(folder, region, nodes),
            "absorbed": sorted({fqn for c in constants if c.op == "get_attr" for fqn in graph.fqns(c)[:1]}),
            "nodes_replaced": len(nodes),
        }
        fx_graph = graph.gm.graph
        with derived_from(graph, [root, layer.base]):
            # named as PEFT's merge_and_unload names them: the adapted module's own weight and bias
            weight = graph.add_constant(
                matrix, f"{sanitize(name)}_merged_weight", (f"{name}.weight",), before=root
            )
            args = (region.x, weight)
            if offset is not None:
                bias = graph.add_constant(offset, f"{sanitize(name)}_merged_bias", (f"{name}.bias",), before=root)
                args += (bias,)
            with fx_graph.inserting_before(root):
                linear = fx_graph.call_function(F.linear, args)
        linear.meta["val"] = root.meta.get("val")
        root.replace_all_uses_with(linear)

        # The expression, then the constant expressions only it used (get_attr nodes: prune_constants).
        erased = []
        for n in sorted(nodes | {c for c in constants if c.op != "get_attr"}, key=order.get, reverse=True):
            if not n.users:
                fx_graph.erase_node(n)
                erased.append(n)
        info["erased"] = erased
        return info

    @staticmethod
    def _unmergeable_branch(region: _Region, layer: _Layer, order) -> tuple[str, str] | None:
        """If the layer's output is added to a branch that depends on x other than through the
        layer, but not affinely (an adapter that cannot be merged): (layer name, where it stops)."""
        for user in layer.root.users:
            if op_name(user) not in ("add", "sub"):
                continue
            for other in user.args[:2]:
                if other is layer.root or not isinstance(other, fx.Node) or region.affine(other) or region.folder(other):
                    continue
                # walk the branch back towards x, not into the layer's own expression
                stack, seen = [other], set()
                while stack and len(seen) < 256:
                    n = stack.pop()
                    if n in seen or n in layer.nodes or order.get(n, -1) <= order[region.x]:
                        continue
                    seen.add(n)
                    if any(region.affine(i) and i not in layer.nodes for i in n.all_input_nodes):
                        name = Graph.module_path(user) or user.name
                        return name, (
                            f"the branch added to it at %{user.name} is not a fixed linear function of its input "
                            f"(%{n.name}: {op_name(n)})"
                        )
                    stack.extend(n.all_input_nodes)
        return None

    @staticmethod
    def _constant_inputs(folder: _Folder, region: _Region, nodes: set[fx.Node]) -> list[fx.Node]:
        """Every constant or constant expression the expression reads, with what those are computed from."""
        found: dict[fx.Node, None] = {}
        for n in nodes:
            for i in n.all_input_nodes:
                if i is not region.x and folder(i):
                    found.update(dict.fromkeys(folder.ancestors(i)))
        return list(found)

    @staticmethod
    def _kinds(folder: _Folder, region: _Region, nodes: set[fx.Node]) -> list[str]:
        """What the layer was adapted with, read off the expression's structure."""
        terms = {n: region.terms[n] for n in nodes if n in region.terms}
        kinds = []
        scales = [t.params["factor"] for t in terms.values() if t.rule == "scale" and isinstance(t.params["factor"], fx.Node)]
        if any(op_name(a) in _NORMS for s in scales for a in folder.ancestors(s)):
            kinds.append("dora")  # a per-channel rescale by a norm of the weights
        elif any(t.rule == "linear" and region.source(n) in terms and terms[region.source(n)].rule == "linear"
                 for n, t in terms.items()):
            kinds.append("lora")  # a linear of a linear of x: a low-rank branch
        if any(t.rule == "block_sum" for t in terms.values()):
            kinds.append("bone")
        if any(t.rule == "linear" and t.params["weight"].op != "get_attr" for t in terms.values()):
            kinds.append("computed-weight")
        return kinds or ["affine"]
