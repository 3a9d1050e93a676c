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

import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from lqc.ir import Graph, op_name
from lqc.ir.graph import sanitize
from lqc.ir.provenance import derived_from

from lqc.passes.base import Pass, PassResult
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass
from lqc.passes.reparam.affine import (
    CASTS,
    RESHAPES,
    VALUE_IDENTITIES,
    AffineRegion,
    AffineTerm,
    ConstantFolder,
    argument,
    is_number,
    tensor_of,
)

_NORMS = frozenset({"linalg_norm", "linalg_vector_norm", "norm", "vector_norm"})


@dataclass
class MergeAdaptersOptions(PassOptions):
    pass


@dataclass
class MergeAdaptersReport:
    merged: dict[str, dict]  # layer -> {"kinds", "absorbed": the constants merged in, "nodes_replaced"}
    unmerged: dict[str, str]  # layer -> why it was left as it is


# -- composing a layer into one matrix --------------------------------------------------------------
# Each rule maps its affine operands' (M, c), with ``operand = x @ M.T + c``, to its own; M None is
# the identity and c None no offset, so a plain linear composes to its weight without products.
Affine = tuple[torch.Tensor | None, torch.Tensor | None]


def _matrix(m: torch.Tensor | None, width: int) -> torch.Tensor:
    return torch.eye(width, dtype=torch.float64) if m is None else m


def _const64(region: AffineRegion, value, size: int) -> torch.Tensor:
    if is_number(value):
        return torch.full((size,), float(value), dtype=torch.float64)
    vec = region.folder.value(value).to(torch.float64).reshape(-1)
    return vec.expand(size).clone() if vec.numel() == 1 else vec


def _compose_linear(region: AffineRegion, term: AffineTerm, operands: dict, size: int, width: int) -> Affine:
    m, c = operands[term.inputs[0]]
    w = region.folder.value(term.params["weight"]).to(torch.float64)
    w = w.T if term.params["transposed"] else w
    m, c = (w if m is None else w @ m), (None if c is None else w @ c)
    if term.params["bias"] is not None:
        bias = region.folder.value(term.params["bias"]).to(torch.float64)
        c = bias if c is None else c + bias
    return m, c


def _compose_add(region: AffineRegion, term: AffineTerm, operands: dict, size: int, width: int) -> Affine:
    m_sum = torch.zeros(size, width, dtype=torch.float64)
    c_sum = None
    for coef, value in term.params["parts"]:
        if region.affine(value):
            m, c = operands[value]
            m_sum = m_sum + coef * _matrix(m, width)
        else:
            c = _const64(region, value, size)
        if c is not None:
            c_sum = coef * c if c_sum is None else c_sum + coef * c
    return m_sum, c_sum


def _compose_scale(region: AffineRegion, term: AffineTerm, operands: dict, size: int, width: int) -> Affine:
    m, c = operands[term.inputs[0]]
    k = _const64(region, term.params["factor"], size)
    k = 1 / k if term.params["invert"] else k
    return k[:, None] * _matrix(m, width), None if c is None else k * c


def _compose_block_sum(region: AffineRegion, term: AffineTerm, operands: dict, size: int, width: int) -> Affine:
    m, c = operands[term.inputs[0]]
    n, r = term.params["blocks"], term.params["r"]
    # output channel j sums input channels j, r + j, 2r + j, ...
    summing = torch.eye(r, dtype=torch.float64).repeat(1, n)
    return summing @ _matrix(m, width), None if c is None else summing @ c


def _compose_pad(region: AffineRegion, term: AffineTerm, operands: dict, size: int, width: int) -> Affine:
    m, c = operands[term.inputs[0]]
    left, right = term.params["pad"]
    return F.pad(_matrix(m, width), (0, 0, left, right)), None if c is None else F.pad(c, (left, right))


_COMPOSE = {
    "identity": lambda region, term, operands, size, width: operands[term.inputs[0]],
    "linear": _compose_linear,
    "add": _compose_add,
    "scale": _compose_scale,
    "block_sum": _compose_block_sum,
    "pad": _compose_pad,
}


@torch.no_grad()
def compose_affine(region: AffineRegion, root: fx.Node) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M, c) in float64 with ``root = x @ M.T + c`` (c None: no bias)."""
    width = tensor_of(region.x, region.graph).shape[-1]
    memo: dict[fx.Node, Affine] = {region.x: (None, None)}

    def affine(node: fx.Node) -> Affine:
        if node not in memo:
            term = region.terms[node]
            operands = {i: affine(i) for i in term.inputs}
            memo[node] = _COMPOSE[term.rule](region, term, operands, tensor_of(node, region.graph).shape[-1], width)
        return memo[node]

    m, c = affine(root)
    return _matrix(m, width), c


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
        folder = ConstantFolder(graph)
        merged: dict[str, dict] = {}
        unmerged: dict[str, str] = {}
        done_inputs: set[fx.Node] = set()
        erased: set[fx.Node] = set()
        order = {n: i for i, n in enumerate(graph.nodes)}

        def leave(layer: str, reason: str) -> None:
            if layer not in unmerged:
                unmerged[layer] = reason
                warnings.warn(f"lqc merge_adapters: {layer} left unmerged: {reason}", stacklevel=3)

        for node in list(graph.nodes):
            if node in erased or op_name(node) not in ("linear", "matmul", "addmm"):
                continue
            weight = node.args[2] if op_name(node) == "addmm" else argument(node, 1, "weight", None)
            if not (isinstance(weight, fx.Node) and folder(weight)):
                continue  # not a layer: attention's q @ k.T, for one
            x = self._layer_input(graph, node, folder)
            if x is None or x in done_inputs:
                continue
            done_inputs.add(x)
            region = AffineRegion(graph, folder, x, order)
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
            details=MergeAdaptersReport(merged=merged, unmerged=unmerged),
            message=f"{len(merged)} adapted layers merged, {len(unmerged)} left unmerged",
        )

    @staticmethod
    def _layer_input(graph: Graph, node: fx.Node, folder: ConstantFolder) -> fx.Node | None:
        """The input of a linear-like node, before value-preserving casts and eval dropout."""
        x = node.args[1] if op_name(node) == "addmm" else node.args[0]
        if not isinstance(x, fx.Node) or folder(x):
            return None
        while op_name(x) in CASTS | VALUE_IDENTITIES | {"dropout"} and isinstance(x.args[0], fx.Node):
            if op_name(x) == "dropout" and not (argument(x, 2, "training", True) is False or argument(x, 1, "p", 0.5) == 0):
                break
            source, out = tensor_of(x.args[0], graph), tensor_of(x, graph)
            if source is None or out is None or (source.dtype, source.shape, source.device) != (out.dtype, out.shape, out.device):
                break
            x = x.args[0]
        return x

    @staticmethod
    def _layers(region: AffineRegion, top: fx.Node) -> list[_Layer]:
        """Candidate layers under a maximal affine node, outermost first. An expression whose inner
        values are used elsewhere is no layer as a whole; the nodes that escape it may be (an
        adapted linear followed by GELU's ``0.5 * h``: the expression reaches into the GELU, the
        adapted linear's output escapes it and is the layer)."""
        width = tensor_of(region.x, region.graph).shape[-1]
        layers, stack, seen = [], [top], set()
        while stack:
            root = MergeAdapters._before_head_split(region, stack.pop(0))
            if root in seen:
                continue
            seen.add(root)
            nodes = region.closure(root)
            escaping = [n for n in nodes - {root} if any(u not in nodes for u in n.users)]
            size = tensor_of(root, region.graph).shape[-1]
            linears = [n for n in nodes if n in region.terms and region.terms[n].rule == "linear"]
            base = next((n for n in linears if region.reads_x(n) and region.weight_shape(n) == (size, width)), None)
            computed = any(region.terms[n].params["weight"].op != "get_attr" for n in linears)
            adapted = base is not None and (region.branches(nodes) >= 2 or computed)
            layers.append(_Layer(root, nodes, escaping, base, adapted))
            stack.extend(n for n in escaping if n in region.terms)
        return layers

    @staticmethod
    def _before_head_split(region: AffineRegion, root: fx.Node) -> fx.Node:
        """The node a trailing reshape of the leading dimensions reads. With one attention head,
        ``q_proj(x).view(B, S, 1, head_dim)`` keeps the last dimension, so the view is affine in x
        too and the expression would end there; a layer must keep x's leading shape (one linear
        replaces it), so it ends before the view, which stays and reads the merged linear."""
        lead = tuple(tensor_of(region.x, region.graph).shape[:-1])
        while (op_name(root) in RESHAPES and isinstance(root.args[0], fx.Node) and root.args[0] in region.terms
               and len(root.args[0].users) == 1 and tuple(tensor_of(root, region.graph).shape[:-1]) != lead):
            root = root.args[0]
        return root

    def _merge(self, graph: Graph, ctx, folder: ConstantFolder, region: AffineRegion, layer: _Layer, order) -> dict | str:
        """Replace the layer by one linear: its details, or why it stays."""
        root, nodes = layer.root, layer.nodes
        name = graph.module_path(root) or root.name
        if tuple(tensor_of(root, graph).shape[:-1]) != tuple(tensor_of(region.x, graph).shape[:-1]):
            return "its output is reshaped relative to its input"
        dtype = folder.value(region.terms[layer.base].params["weight"]).dtype
        constants = self._constant_inputs(folder, region, nodes)

        def compose():
            matrix, offset = compose_affine(region, root)
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
    def _unmergeable_branch(region: AffineRegion, layer: _Layer, order) -> tuple[str, str] | None:
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
    def _constant_inputs(folder: ConstantFolder, region: AffineRegion, nodes: set[fx.Node]) -> list[fx.Node]:
        """Every constant or constant expression the expression reads, with what those are computed from."""
        found: dict[fx.Node, None] = {}
        for n in nodes:
            for i in n.all_input_nodes:
                if i is not region.x and folder(i):
                    found.update(dict.fromkeys(folder.ancestors(i)))
        return list(found)

    @staticmethod
    def _kinds(folder: ConstantFolder, region: AffineRegion, nodes: set[fx.Node]) -> list[str]:
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
