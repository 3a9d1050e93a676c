"""``rotate``: QuaRot-style rotation of the residual stream by an orthogonal Q, and an online
Hadamard before each FFN down projection.

Rotating every residual-stream value h into ``h Q`` changes no output, provided everything that
writes the stream and everything that reads it is rotated with it:

- the embedding table: ``E' = E Q``;
- writers (o_proj, down_proj: linears whose output is added into the stream):
  ``W' = Q^T W``, ``b' = Q^T b``;
- readers (q/k/v, gate/up, lm_head: linears fed by a normalized stream): ``W' = W Q``;
- RMSNorm in between: ``h / rms(h)`` commutes with Q (an orthogonal Q keeps the norm of every
  row), once its weight is folded into the readers (lqc.passes.reparam.fold_norms, run first here).
  LayerNorm subtracts the mean first, which Q does not preserve: such models are not rotated.

The rotation spreads outlier channels over all channels, so activations and weights quantize
with less error (QuaRot, Ashkboos et al. 2024). Q is a randomized Hadamard matrix
``diag(+-1) H / sqrt(d)`` when one of order d is known (lqc.runtime.quantization.hadamard: Sylvester, or a
Paley matrix Kronecker a power of two), else a seeded random orthogonal matrix; the report says
which. The online Hadamard rotates the FFN's intermediate activations, the input of the down
projection, the same way (``x' = x H`` as an ``lqc::hadamard`` op, ``W_down' = W_down H``).

Which nodes are writers and readers is found by following the stream from the embedding through
the graph, not by module names: each use of a rotated value must be one the rotation commutes
with (adds, dtype and shape changes that keep the last dimension, ``h * per-token scalar``,
``h^2`` summed over the channels, a linear reading it). Anything else makes the pass decline with
a warning naming the node, leaving the graph unchanged. The arithmetic is float64, cast back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.linear import LinearSite, linear_site
from lqc.ir.provenance import derived_from
from lqc.runtime.quantization.hadamard import hadamard_matrix, hadamard_pair

from lqc.passes.base import Pass, PassResult
from lqc.passes.reparam.fold_norms import fold_norm, foldable_norms
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass

# ops a rotated value may pass through unchanged (the last dimension kept)
_SAME = {"to", "float", "contiguous", "clone", "dropout", "type_as", "detach", "alias"}
_RESHAPES = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand"}
_ACTIVATIONS = {"silu", "gelu", "relu", "sigmoid", "tanh", "gelu_new"}


class NotRotatable(Exception):
    pass


@dataclass
class RotateOptions(PassOptions):
    rotation: Literal["hadamard", "random"] = field(default="hadamard", metadata={"help": "randomized Hadamard (random orthogonal where no Hadamard of the width is known), or always random orthogonal"})
    seed: int = field(default=0, metadata={"help": "seed of the random signs (or matrix)"})
    online_hadamard: bool = field(default=True, metadata={"help": "rotate each FFN down projection's input with an lqc::hadamard op"})


@dataclass
class RotateReport:
    rotated: bool
    folded_norms: int  # norms folded into their readers (done even when the stream is not rotated)
    reason: str = ""  # why the stream was not rotated
    width: int | None = None
    rotation: str = ""  # how Q was built
    embeddings: int = 0
    readers: list[str] = field(default_factory=list)
    writers: list[str] = field(default_factory=list)
    online_hadamard: list[str] = field(default_factory=list)  # down projections with an online Hadamard
    online_hadamard_matrix: str | None = None  # how that Hadamard was built, when there is one


@dataclass
class StreamPlan:
    width: int
    embeddings: list[tuple[fx.Node, fx.Node]]  # (embedding node, its table constant)
    readers: list[LinearSite]
    writers: list[LinearSite]


def plan_rotation(graph: Graph) -> StreamPlan:
    """Follow the residual stream from the embeddings; raise NotRotatable naming a use it cannot rotate."""
    rotated: set[fx.Node] = set()
    squared: set[fx.Node] = set()
    embeddings, readers, writers = [], [], []
    width = None
    for node in graph.nodes:
        name = op_name(node)
        if name == "embedding" and node.op == "call_function":
            table_at = 0 if node.target is torch.ops.aten.embedding.default else 1
            table = node.args[table_at]
            if graph.is_constant(table):
                w = graph.constant(table).shape[1]
                if width is not None and w != width:
                    raise NotRotatable(f"embeddings of different widths ({width}, {w})")
                width = w
                embeddings.append((node, table))
                rotated.add(node)
            continue
        inputs = [a for a in node.all_input_nodes]
        touched = [a for a in inputs if a in rotated or a in squared]
        if not touched:
            continue
        where = f"%{node.name} ({name}, in {graph.module_path(node) or 'the model'})"
        if node.op == "output":
            raise NotRotatable(f"the graph returns a residual-stream value at {where}")
        site = linear_site(node)
        if site is not None and site.x in rotated and not any(a in rotated for a in inputs if a is not site.x):
            readers.append(site)
            continue
        if name in ("add", "sub") and len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args):
            for operand in node.args:
                if operand not in rotated:
                    writer = _writer(operand)
                    if writer is None:
                        raise NotRotatable(f"{where} adds something that is not a linear's output to the stream")
                    writers.append(writer)
            rotated.add(node)
            continue
        if any(a in squared for a in inputs):
            if name in ("mean", "sum") and _reduces_last_dim(node):
                continue  # sum of squares over the channels: rotation-invariant
            raise NotRotatable(f"{where} uses a squared stream value other than summing it over the channels")
        carried = _carried(node, name, rotated, width)
        if carried == "rotated":
            rotated.add(node)
        elif carried == "squared":
            squared.add(node)
        elif name == "layer_norm":
            raise NotRotatable(f"{where} is a LayerNorm: it subtracts the mean, which a rotation does not preserve (rotate needs RMSNorm models)")
        else:
            raise NotRotatable(f"{where} reads the residual stream in a way a rotation does not commute with")
    if not embeddings:
        raise NotRotatable("no embedding lookup of a constant table starts a residual stream")
    return StreamPlan(width, embeddings, readers, writers)


def _carried(node: fx.Node, name: str, rotated: set[fx.Node], width) -> str | None:
    """What ``node`` makes of a rotated input that it neither reads as a linear nor adds to the
    stream: still a rotated value ("rotated"), its square ("squared"), or None when the rotation
    does not commute with it."""
    source = node.args[0] if node.args else None
    binary = len(node.args) == 2
    if name in _SAME and source in rotated:
        return "rotated"
    if name in _RESHAPES and source in rotated and _last_dim(node) == width:
        return "rotated"
    if name == "getitem" and source in rotated and _keeps_last_dim_index(node, width):
        return "rotated"
    if name == "pow" and source in rotated and node.args[1] == 2:
        return "squared"
    if name == "mul" and binary and node.args[0] is node.args[1]:
        return "squared"
    if name in ("mul", "div") and binary and node.args[0] in rotated and _per_token(node.args[1], rotated):
        return "rotated"
    if name == "mul" and binary and node.args[1] in rotated and _per_token(node.args[0], rotated):
        return "rotated"
    return None


def _writer(node: fx.Node) -> LinearSite | None:
    """The linear whose output ``node`` is, through dtype changes, reshapes and dropout."""
    while True:
        site = linear_site(node)
        if site is not None:
            return site if len(node.users) == 1 else None
        if op_name(node) in _SAME | _RESHAPES and node.args and isinstance(node.args[0], fx.Node) and len(node.users) == 1:
            node = node.args[0]
            continue
        return None


def _last_dim(node: fx.Node):
    val = node.meta.get("val")
    return val.shape[-1] if isinstance(val, torch.Tensor) and val.dim() else None


def _reduces_last_dim(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    source = node.args[0].meta.get("val")
    rank = source.dim() if isinstance(source, torch.Tensor) else None
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return rank is not None and len(dims) == 1 and dims[0] in (-1, rank - 1)


def _per_token(value, rotated: set) -> bool:
    """A python scalar, or a tensor with one value per row (last dimension 1) not itself rotated."""
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, fx.Node) and value not in rotated and _last_dim(value) == 1


def _keeps_last_dim_index(node: fx.Node, width) -> bool:
    index = node.args[1]
    if not isinstance(index, tuple) or any(i is Ellipsis for i in index):
        return False
    rank = node.args[0].meta["val"].dim()
    return _last_dim(node) == width and (len(index) < rank or index[rank - 1] == slice(None))


def rotation_matrix(width: int, rotation: str, seed: int) -> tuple[torch.Tensor, str]:
    """An orthogonal [width, width] float64 Q and how it was built."""
    generator = torch.Generator().manual_seed(seed)
    found = hadamard_matrix(width) if rotation == "hadamard" else None
    if found is not None:
        h, description = found
        signs = torch.randint(0, 2, (width,), generator=generator).to(torch.float64) * 2 - 1
        return signs[:, None] * h, f"randomized Hadamard: {description}, random signs (seed {seed})"
    q, r = torch.linalg.qr(torch.randn(width, width, generator=generator, dtype=torch.float64))
    why = "no Hadamard matrix of this order is known here" if rotation == "hadamard" else "rotation: random"
    return q * torch.sign(torch.diagonal(r))[None, :], f"seeded random orthogonal (seed {seed}; {why})"


def _down_projection(site: LinearSite) -> bool:
    """An FFN's second linear: its input is an activation, or a product with one (SwiGLU)."""
    x = site.x
    if op_name(x) in _ACTIVATIONS:
        return True
    return op_name(x) == "mul" and any(isinstance(a, fx.Node) and op_name(a) in _ACTIVATIONS for a in x.args)


@register_pass
class Rotate(Pass):
    name = "rotate"
    description = "QuaRot: fold norms, rotate the residual stream by a randomized Hadamard, online Hadamard before down projections"
    Options = RotateOptions

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        if self.options.targets or self.options.ignore:
            raise LqcConfigError("rotate turns the whole residual stream; it cannot rotate some layers and not others "
                                 "(remove targets/ignore from the rotate entry)")

    def run(self, graph: Graph, ctx) -> PassResult:
        opts = self.options
        cached = lambda key, sources, fn: ctx.transform(graph, key, sources, fn)  # noqa: E731
        folded = [fold_norm(graph, fold, cached) for fold in foldable_norms(graph)]
        graph.recompile()
        try:
            plan = plan_rotation(graph)
        except NotRotatable as exc:
            warnings.warn(f"lqc rotate: not rotating: {exc}. Norms were folded (exact); the graph is otherwise unchanged.", stacklevel=2)
            return PassResult(details=RotateReport(rotated=False, reason=str(exc), folded_norms=len(folded)))
        q, description = rotation_matrix(plan.width, opts.rotation, opts.seed)

        for node, table in plan.embeddings:
            name = (graph.fqns(table) or (table.name,))[0]
            rotated = ctx.transform(graph, ("embedding", name), [table],
                                    lambda table=table: (graph.constant(table).to(torch.float64) @ q).to(graph.constant(table).dtype))
            with derived_from(graph, [node, table]):
                new = graph.add_constant(rotated, f"{name}_rotated", graph.fqns(table), before=node)
            node.replace_input_with(table, new)

        online, online_matrix = [], None
        for site in plan.readers:
            self._set_weight(graph, ctx, site, "reader", lambda w: w @ q)
        for site in plan.writers:
            pair = hadamard_pair(site.weight_tensor(graph).shape[1]) if opts.online_hadamard and _down_projection(site) else None
            if opts.online_hadamard and _down_projection(site) and pair is None:
                warnings.warn(f"lqc rotate: no Hadamard of order {site.weight_tensor(graph).shape[1]} for {site.name(graph)}'s input; no online rotation there", stacklevel=2)
            if pair is None:
                self._set_weight(graph, ctx, site, "writer", lambda w: q.T @ w)
                continue
            h = torch.kron(pair[0], pair[1])
            self._set_weight(graph, ctx, site, "writer+hadamard", lambda w, h=h: q.T @ w @ h)
            self._insert_hadamard(graph, site, pair)
            online.append(site.name(graph))
            online_matrix = pair[2]
        for site in plan.writers:
            if site.bias is not None:
                self._set_bias(graph, ctx, site, lambda b: q.T @ b)

        details = RotateReport(
            rotated=True, width=plan.width, rotation=description, folded_norms=len(folded),
            embeddings=len(plan.embeddings), readers=[s.name(graph) for s in plan.readers],
            writers=[s.name(graph) for s in plan.writers], online_hadamard=online, online_hadamard_matrix=online_matrix,
        )
        return PassResult(matches=len(plan.readers) + len(plan.writers), details=details)

    @staticmethod
    def _set_weight(graph: Graph, ctx, site: LinearSite, role: str, transform) -> None:
        name = site.name(graph)

        def compute():
            stored = graph.constant(site.weight)
            new = transform(site.weight_tensor(graph).to(torch.float64)).to(stored.dtype)
            return new.T.contiguous() if site.transposed else new

        new = ctx.transform(graph, (role, name), [site.weight], compute)
        with derived_from(graph, [site.node, site.weight]):
            node = graph.add_constant(new, f"{name}.weight_rotated", graph.fqns(site.weight), before=site.node)
        site.node.replace_input_with(site.weight, node)
        site.weight = node

    @staticmethod
    def _set_bias(graph: Graph, ctx, site: LinearSite, transform) -> None:
        name = site.name(graph)
        stored = graph.constant(site.bias)
        new = ctx.transform(graph, ("bias", name), [site.bias], lambda: transform(stored.to(torch.float64)).to(stored.dtype))
        with derived_from(graph, [site.node, site.bias]):
            node = graph.add_constant(new, f"{name}.bias_rotated", graph.fqns(site.bias), before=site.node)
        site.node.replace_input_with(site.bias, node)
        site.bias = node

    @staticmethod
    def _insert_hadamard(graph: Graph, site: LinearSite, pair) -> None:
        dtype = site.x.meta["val"].dtype if isinstance(site.x.meta.get("val"), torch.Tensor) else torch.float32
        name = site.name(graph)
        g = graph.gm.graph
        with derived_from(graph, [site.node]):
            left = graph.add_constant(pair[0].to(dtype), f"{name}.hadamard_left", (), before=site.node)
            right = graph.add_constant(pair[1].to(dtype), f"{name}.hadamard_right", (), before=site.node)
            with g.inserting_before(site.node):
                rotated = g.call_function(torch.ops.lqc.hadamard.default, (site.x, left, right))
        rotated.meta["nn_module_stack"] = dict(site.node.meta.get("nn_module_stack", {}))
        site.node.replace_input_with(site.x, rotated)
        site.x = rotated

