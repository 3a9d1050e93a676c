"""Fusion partitioning: which nodes of a compressed graph each generated kernel computes.

The code generator emits one fused kernel per *fusion group*. A group is anchored on one lqc op
that does the heavy work (``lqc::qlinear``, ``lqc::moe_ffn``, or a KV attention op) and takes in
the cheap work around it, so those intermediates never go through memory:

- prologue: a norm whose only reader is a qlinear (the decomposed RMSNorm ``weight * (x *
  rsqrt(mean(x^2) + eps))``, with or without its weight and ``.to`` casts, or one ``rms_norm`` /
  ``layer_norm`` op). The kernel normalizes each row of x as it loads it.
- epilogue, followed from the anchor's output along single-reader chains: a bias add, an
  activation, dtype casts, the SwiGLU multiply, the residual add.

The RMSNorm and SwiGLU shapes are the patterns of ``lqc.ir.patterns`` (written with the pattern
API users write passes with); what this module adds is where each may join a group.

Everything outside the groups is left to Inductor (``Partition.rest``).

Rules, and why:

- *One value out.* A node joins an epilogue only if it is the sole reader of the group's current
  output, and a norm joins a prologue only if its output's sole reader is the anchor. So a group
  writes what its anchor alone would have written (transformed by the epilogue), never an extra
  intermediate: fusing only ever removes memory traffic. Where a value has other readers it stays
  the group's output and the chain stops there.
- *Shared norms stay outside.* A norm read by several qlinears (q/k/v, or gate/up) cannot be in
  three groups. Giving it to the first group would make that kernel also write the normalized
  rows for the others (the traffic the fusion is meant to save, and a GEMM tiled over N would have
  to elect one program per row to store them); so it is left to Inductor, which fuses the norm into
  one reduction kernel. Run ``concat_linears`` before quantizing to fuse it anyway: q/k/v (and
  gate/up) become one qlinear, its norm then has one reader and becomes that group's prologue.
- *SwiGLU across two anchors* (``act(gate) * up``, gate and up separate qlinears): the activation
  and the multiply join the group of whichever anchor comes *later* in graph order, and the other
  anchor's output is read as an input. When the later kernel runs the earlier output already
  exists, so the group depends only on values computed before it (fx order is a topological
  order): no reordering and no cycle. In the earlier group the kernel would have to wait for the
  later anchor, which is a cycle whenever that anchor depends on the earlier one.
- *SwiGLU within one anchor* (concat_linears' gate+up: ``y = qlinear(x)`` split in two halves on
  the last dimension, ``act(y0) * y1``): the split, its getitems, the activation and the multiply
  all join the anchor's group; neither half is ever written.
- *Never a cycle.* Contract every group to one vertex (its anchor) and every other node is its own
  vertex: that quotient graph must stay a DAG, or no order exists in which to launch the kernels.
  Before nodes join a group, the check asks networkx whether some value leaving the enlarged group
  can come back into it through outside nodes (``nx.descendants`` in the quotient graph as built so
  far, groups already contracted, ``nx.contracted_nodes`` when they join). Under the sole-reader
  rules above no absorption can close a cycle (a cycle needs a second value leaving the group), so
  today the check is a guard: it keeps the partition valid when a rule is relaxed (say, absorbing
  through a value with several readers), and it refuses rather than trusting a rule.
- *Pure work only.* Stateful ops (``ir.lqc_ops.STATEFUL_OPS``) and in-place ops are never absorbed.
- ``lqc::hadamard`` is no anchor and is not absorbed: it multiplies each row by a Hadamard matrix,
  mixing the whole row, so it is neither pointwise work for an epilogue nor the GEMM a qlinear
  kernel computes. It stays with Inductor (a later version may make it a prologue, like a norm).
- W8A8 activation quantization needs nothing here: it happens inside qlinear's ``w8a8`` (and
  ``fp8_dyn``) format, so the anchor's kernel does it; lqc graphs hold no separate quantize nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import networkx as nx
import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.lqc_ops import STATEFUL_OPS
from lqc.ir.ops import ACTIVATION_OPS, is_inplace
from lqc.ir.patterns import SWIGLU, is_cast, match_rms_norm, same_shape, shape_of

# lqc op -> the kind of kernel its group becomes. lqc::kv_placeholder computes nothing and
# lqc::hadamard is a row transform (see the module docstring): neither anchors a group.
ANCHOR_KINDS = {
    "lqc::qlinear": "qlinear",
    "lqc::moe_ffn": "moe_ffn",
    "lqc::kv_attention": "kv_attention",
    "lqc::kv_dynamic_attention": "kv_attention",
    "lqc::kv_static_attention": "kv_attention",
}

# Kinds whose kernel can normalize its input rows as it loads them. moe_ffn could too (router and
# experts read the same normalized x), once its kernel exists to say where.
PROLOGUE_KINDS = ("qlinear",)

# why each absorbed node is in its group (FusionGroup.roles)
ROLES = ("rms_norm", "layer_norm", "cast", "bias", "activation", "swiglu", "residual", "unpack")


@dataclass
class FusionGroup:
    """One kernel's worth of the graph: an lqc op and the pointwise work fused around it."""

    anchor: fx.Node
    kind: str  # "qlinear" | "moe_ffn" | "kv_attention"
    prologue: list[fx.Node] = field(default_factory=list)  # computed before the anchor, on its input
    epilogue: list[fx.Node] = field(default_factory=list)  # computed on the anchor's output
    roles: dict[fx.Node, str] = field(default_factory=dict)  # absorbed node -> "rms_norm", "bias", "swiglu"...
    nodes: list[fx.Node] = field(default_factory=list)  # prologue + anchor + epilogue, in graph order
    inputs: list[fx.Node] = field(default_factory=list)  # nodes outside the group it reads (constants too)
    outputs: list[fx.Node] = field(default_factory=list)  # its nodes read outside the group

    def __repr__(self) -> str:
        return f"FusionGroup({self.kind} %{self.anchor.name}, {len(self.nodes)} nodes)"


@dataclass
class Partition:
    """The fusion groups of a graph, in graph order of their anchors, and what is left to Inductor."""

    graph: Graph
    groups: list[FusionGroup]
    rest: list[fx.Node]  # computing nodes in no group (placeholders, constants and the output excluded)
    _group_of: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._group_of = {node: group for group in self.groups for node in group.nodes}

    def __iter__(self) -> Iterator[FusionGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, node: fx.Node) -> FusionGroup | None:
        return self._group_of.get(node)

    def quotient_graph(self) -> nx.DiGraph:
        """The dataflow graph with every group contracted to one vertex (its anchor). A DAG."""
        vertex = {node: group.anchor for group in self.groups for node in group.nodes}
        quotient = nx.DiGraph()
        quotient.add_nodes_from(vertex.get(node, node) for node in self.graph.nodes)
        for source, target in dataflow_graph(self.graph).edges:
            if vertex.get(source, source) is not vertex.get(target, target):
                quotient.add_edge(vertex.get(source, source), vertex.get(target, target))
        return quotient


def dataflow_graph(graph: Graph) -> nx.DiGraph:
    """Every fx node of ``graph`` as a vertex, an edge from each node to each node that reads it."""
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((source, node) for node in graph.nodes for source in node.all_input_nodes)
    return dag


def creates_cycle(quotient: nx.DiGraph, vertex: fx.Node, nodes: list[fx.Node]) -> bool:
    """Whether contracting ``nodes`` into ``vertex`` (a group, already contracted to one vertex, or
    any node) makes the DAG ``quotient`` cyclic: some value leaves the enlarged group and comes back
    into it through vertices outside it. ``y = qlinear(x); w = y + softmax(y)``: joining ``w`` to
    ``y``'s group is a cycle (``y -> softmax -> w``), joining ``softmax`` and ``w`` together is not."""
    merged = {vertex, *nodes}
    leaving = {succ for member in merged for succ in quotient.successors(member)} - merged
    return any(not merged.isdisjoint(nx.descendants(quotient, succ)) for succ in leaving)


def partition(graph: Graph) -> Partition:
    """Partition a compressed lqc Graph into fusion groups (see the module docstring)."""
    return _Partitioner(graph).run()


def describe(partition: Partition) -> str:
    """One line per group (kind, anchor, module path, absorbed ops by role) and what Inductor gets."""
    lines = [f"{partition.graph.name}: {len(partition.groups)} fusion groups, "
             f"{len(partition.rest)} nodes left to Inductor"]
    names = [f"%{group.anchor.name}" for group in partition.groups]
    paths = [Graph.module_path(group.anchor) or "-" for group in partition.groups]
    name_width, path_width = max(map(len, names), default=0), max(map(len, paths), default=0)
    for group, name, path in zip(partition.groups, names, paths):
        parts = [f"  {group.kind:<12} {name:<{name_width}}  {path:<{path_width}}"]
        for where, nodes in (("prologue", group.prologue), ("epilogue", group.epilogue)):
            if nodes:
                parts.append(f"{where}: {_by_role(group, nodes)}")
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _by_role(group: FusionGroup, nodes: list[fx.Node]) -> str:
    """``rms_norm(pow mean add rsqrt mul mul) residual(add)``: op names grouped by role, in order."""
    runs: list[tuple[str, list[str]]] = []
    for node in nodes:
        role = group.roles[node]
        if not runs or runs[-1][0] != role:
            runs.append((role, []))
        runs[-1][1].append(op_name(node))
    return " ".join(f"{role}({' '.join(ops)})" for role, ops in runs)


class _Partitioner:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.position = {node: i for i, node in enumerate(graph.nodes)}
        # Groups are contracted into their anchor's vertex as they grow, so the cycle check sees
        # paths through other groups too (two nodes of one group count as connected).
        self.quotient = dataflow_graph(graph)
        self.group_of: dict[fx.Node, FusionGroup] = {}
        self.groups: list[FusionGroup] = []

    def run(self) -> Partition:
        for node in self.graph.nodes:
            if node.op == "call_function" and op_name(node) in ANCHOR_KINDS:
                group = FusionGroup(anchor=node, kind=ANCHOR_KINDS[op_name(node)])
                self.groups.append(group)
                self.group_of[node] = group
        by_anchor = {group.anchor: group for group in self.groups}
        for group in self.groups:
            self._absorb_unpacking(group)
        # SwiGLU between two anchors first: otherwise the gate's own epilogue would take the
        # activation, and the multiply could not join the later anchor's group.
        for node in self.graph.nodes:
            if (match := _two_anchor_swiglu(node, self.group_of)) is not None:
                act, gate, up = match
                later = max(gate, up, key=self.position.__getitem__)
                self._absorb(by_anchor[later], [act, node], "epilogue", "swiglu")
        for group in self.groups:
            if group.kind in PROLOGUE_KINDS:
                self._absorb_prologue(group)
        for group in self.groups:
            self._absorb_epilogue(group)
        for group in self.groups:
            self._finish(group)
        rest = [n for n in self.graph.nodes
                if n.op in ("call_function", "call_method", "call_module") and n not in self.group_of]
        return Partition(self.graph, self.groups, rest)

    # -- growing a group -------------------------------------------------------------------------
    def _absorb(self, group: FusionGroup, nodes: list[fx.Node], where: str, role: str) -> bool:
        """Add ``nodes`` to ``group``'s prologue or epilogue, all or none; False if they may not join."""
        if not all(self._absorbable(node) for node in nodes) or creates_cycle(self.quotient, group.anchor, nodes):
            return False
        for node in nodes:
            nx.contracted_nodes(self.quotient, group.anchor, node, self_loops=False, copy=False)
            self.group_of[node] = group
            group.roles[node] = role
            getattr(group, where).append(node)
        return True

    def _absorbable(self, node: fx.Node) -> bool:
        return (
            node.op in ("call_function", "call_method")
            and node not in self.group_of
            and not is_inplace(node)
            and not node.kwargs.get("inplace", False)  # F.relu(x, inplace=True) writes into x
            and node.target not in STATEFUL_OPS
        )

    def _absorb_unpacking(self, group: FusionGroup) -> None:
        # kv_dynamic_attention returns (attention, key handle, value handle): the getitems only
        # name the kernel's outputs, so they belong to it.
        if isinstance(group.anchor.meta.get("val"), (tuple, list)):
            getitems = sorted((u for u in group.anchor.users if op_name(u) == "getitem"), key=self.position.__getitem__)
            for getitem in getitems:
                self._absorb(group, [getitem], "epilogue", "unpack")

    def _absorb_prologue(self, group: FusionGroup) -> None:
        x = group.anchor.args[0]
        if not isinstance(x, fx.Node) or list(x.users) != [group.anchor] or x in group.anchor.args[1:]:
            return  # a norm with other readers stays outside (see "Shared norms" above)
        match = _match_norm(x)
        if match is not None:
            nodes, role = match
            self._absorb(group, sorted(nodes, key=self.position.__getitem__), "prologue", role)

    def _absorb_epilogue(self, group: FusionGroup) -> None:
        if isinstance(group.anchor.meta.get("val"), (tuple, list)):
            return  # several outputs: no single value to follow
        tail = group.epilogue[-1] if group.epilogue else group.anchor
        while (user := _sole_user(tail)) is not None:
            step = _epilogue_step(self.graph, tail, user)
            if step is None or not self._absorb(group, *step):
                return
            tail = group.epilogue[-1]

    def _finish(self, group: FusionGroup) -> None:
        members = {group.anchor, *group.prologue, *group.epilogue}
        group.nodes = sorted(members, key=self.position.__getitem__)
        group.inputs = sorted({i for n in group.nodes for i in n.all_input_nodes if i not in members},
                              key=self.position.__getitem__)
        group.outputs = [n for n in group.nodes if any(user not in members for user in n.users)]


# -- what may join ----------------------------------------------------------------------------------
def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _is_activation(node: fx.Node, x: fx.Node) -> bool:
    return op_name(node) in ACTIVATION_OPS and bool(node.args) and node.args[0] is x and node.all_input_nodes == [x]


def _epilogue_step(graph: Graph, tail: fx.Node, user: fx.Node) -> tuple[list[fx.Node], str, str] | None:
    """(nodes, "epilogue", role) when ``user``, the sole reader of the group's output ``tail``, may
    join the epilogue; None when the chain stops there."""
    name = op_name(user)
    if is_cast(user):
        return [user], "epilogue", "cast"
    if _is_activation(user, tail):
        return [user], "epilogue", "activation"
    if name == "add" and len(user.args) == 2 and not user.kwargs and tail in user.args:
        other = user.args[1] if user.args[0] is tail else user.args[0]
        if not isinstance(other, fx.Node) or other is tail:
            return None
        shape = shape_of(tail)
        if graph.is_constant(other) and shape and same_shape(shape_of(other), shape[-1:]):
            return [user], "epilogue", "bias"  # a per-output-channel vector, broadcast over rows
        if same_shape(shape_of(other), shape) and same_shape(shape_of(user), shape):
            return [user], "epilogue", "residual"
        return None
    if name in ("split", "chunk") and (nodes := _split_swiglu(tail, user)) is not None:
        return nodes, "epilogue", "swiglu"
    return None


def _two_anchor_swiglu(mul: fx.Node, group_of: dict) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(act, gate, up) when ``mul`` is ``act(gate) * up`` (ir.patterns.SWIGLU) with gate and up two
    qlinear anchors whose outputs nothing else reads."""
    match = SWIGLU.match(mul) if not mul.kwargs else None
    if match is None:
        return None
    gate, up, act = match["gate"], match["up"], _sole_user(match["gate"])
    anchors = _is_qlinear_anchor(gate, group_of) and _is_qlinear_anchor(up, group_of)
    return (act, gate, up) if anchors and act in match.graph_nodes and _sole_user(up) is mul else None


def _is_qlinear_anchor(node, group_of: dict) -> bool:
    group = group_of.get(node) if isinstance(node, fx.Node) else None
    return group is not None and group.anchor is node and group.kind == "qlinear"


def _split_swiglu(tail: fx.Node, split: fx.Node) -> list[fx.Node] | None:
    """[split, getitem, getitem, act, mul] when ``split`` cuts ``tail`` into two halves on the last
    dimension and the halves meet as ``act(half) * other_half`` (concat_linears' gate+up)."""
    halves, shape = split.meta.get("val"), shape_of(tail)
    if not (isinstance(halves, (tuple, list)) and len(halves) == 2 and shape and split.all_input_nodes == [tail]):
        return None
    first, second = (tuple(h.shape) for h in halves)
    halves_of_tail = same_shape(first[:-1], shape[:-1]) and str(first[-1] * 2) == str(shape[-1])
    if not (same_shape(first, second) and halves_of_tail):
        return None
    getitems = {u.args[1]: u for u in split.users if op_name(u) == "getitem" and len(u.args) == 2}
    if len(split.users) != 2 or set(getitems) != {0, 1}:
        return None
    for half in getitems.values():
        act = _sole_user(half)
        mul = _sole_user(act) if act is not None else None
        match = SWIGLU.match(mul) if mul is not None and not mul.kwargs else None
        if match is not None and {match["gate"], match["up"]} == set(getitems.values()) \
                and _sole_user(match["gate"]) is act and _sole_user(match["up"]) is mul:
            return [split, getitems[0], getitems[1], act, mul]
    return None


def _match_norm(out: fx.Node) -> tuple[list[fx.Node], str] | None:
    """(nodes, role) of the norm that computes ``out``: one ``rms_norm`` / ``layer_norm`` op, or the
    decomposed RMSNorm of ir.patterns (every node but ``out`` read only inside it)."""
    if op_name(out) in ("rms_norm", "layer_norm") and out.args and isinstance(out.args[0], fx.Node):
        return [out], op_name(out)
    match = match_rms_norm(out)
    return (match.graph_nodes, "rms_norm") if match is not None else None
