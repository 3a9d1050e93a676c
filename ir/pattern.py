"""Pattern matching for passes and for users.

A pattern is a small torch function; its arguments are wildcards::

    def rms_norm(x, weight, eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    pattern = Pattern(rms_norm)
    for match in pattern.find(graph):
        match["weight"]          # the graph node (or literal) bound to `weight`
    print(explain(pattern, node))  # why `node` does not match

Matching starts at the node that corresponds to the pattern's return value (the anchor) and
walks the operands backwards. Ops are compared by their canonical name (ir.ops.op_name), so
``x * y``, ``torch.mul(x, y)`` and ``x.mul(y)`` are the same op; ``add`` and ``mul`` match with
their operands in either order. A wildcard used twice must bind the same node both times, and
a wildcard binds literals too (``eps`` above binds ``1e-6``). By default every matched node but
the anchor must be used only inside the match (``single_use``), so a rewrite can delete it.

Arguments are compared positionally; a trailing argument the pattern leaves out matches only
if the graph passes ``None`` there (``F.linear(x, w)`` matches ``linear(x, w, None)``). Keyword
arguments the pattern names must be equal; keywords only the graph passes must be ``None``.

Three things say more than example code can:

- ``constraints={"weight": is_vector_constant}``: a wildcard binds only what the predicate accepts
  (checked as it binds, so the other operand order is still tried).
- ``OneOf(ops, name)``, called in the pattern like an op: any op named in ``ops`` applied to one
  tensor (``activation = OneOf(ACTIVATION_OPS, "activation")``; ``activation(gate) * up``).
- ``ZeroOrMore(predicate, name)``: a chain of zero or more graph nodes that each satisfy
  ``predicate`` and read one node (``casts = ZeroOrMore(is_cast, "casts")``; ``casts(x)`` matches
  ``x``, ``x.to(f32)``, ``x.float().half()``). The longest chain is tried first. In a single-use
  pattern a chain stops below a value read outside the match, and the pattern continues there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from .ops import COMMUTATIVE_OPS, op_name
from .pattern_ops import OneOf, ZeroOrMore
from .provenance import derived_from


class _Failure(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Match:
    """A successful match: ``match[name]`` is what the wildcard ``name`` bound."""

    pattern: "Pattern"
    anchor: fx.Node
    nodes: dict[fx.Node, fx.Node]  # pattern node -> graph node
    bindings: dict[str, Any] = field(default_factory=dict)
    runs: dict[fx.Node, tuple[fx.Node, ...]] = field(default_factory=dict)  # ZeroOrMore node -> its chain

    def __getitem__(self, name: str) -> Any:
        return self.bindings[name]

    @property
    def graph_nodes(self) -> list[fx.Node]:
        """The matched graph nodes, ZeroOrMore chains included (wildcard bindings excluded)."""
        return [*self.nodes.values(), *(n for chain in self.runs.values() for n in chain)]

    def replace_with(self, replacement: Callable, **extra: Any) -> fx.Node:
        """Replace the matched nodes by ``replacement``, a torch function whose arguments are named
        like the pattern's wildcards or like the keywords in ``extra`` (new constants, say).
        Returns the node that now stands for the anchor.

        Matched nodes left without users are erased. New nodes are marked as derived from the
        matched ones (see ir.provenance).
        """
        replacement_graph = _trace(replacement)
        values = {**self.bindings, **extra}
        graph = self.anchor.graph
        val_map: dict[fx.Node, Any] = {}
        for ph in replacement_graph.find_nodes(op="placeholder"):
            if ph.target not in values:
                name = getattr(replacement, "__name__", "replacement")
                raise KeyError(
                    f"{name} takes {ph.target!r}, which pattern {self.pattern.name!r} does not bind; "
                    f"pass it as a keyword to replace_with"
                )
            val_map[ph] = values[ph.target]
        with derived_from(graph.owning_module, self.graph_nodes), graph.inserting_before(self.anchor):
            result = graph.graph_copy(replacement_graph, val_map)
        if not isinstance(result, fx.Node):
            raise TypeError(f"replacement returned {type(result).__name__}; it must return one tensor")
        self.anchor.replace_all_uses_with(result)
        matched = set(self.graph_nodes)
        for node in reversed(list(graph.nodes)):
            if node in matched and not node.users:
                graph.erase_node(node)
        return result


class Pattern:
    """A pattern written as a torch function (see the module docstring)."""

    def __init__(self, fn: Callable, *, name: str | None = None, single_use: bool = True,
                 constraints: dict[str, Callable[[Any], bool]] | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "pattern")
        self.single_use = single_use
        self.graph = _trace(fn)
        outputs = self.graph.output_node().args[0]
        if not isinstance(outputs, fx.Node):
            raise ValueError(f"pattern {self.name!r} must return exactly one tensor")
        self.output = outputs
        self.wildcards = [n.target for n in self.graph.find_nodes(op="placeholder")]
        self.constraints = dict(constraints or {})
        if unknown := set(self.constraints) - set(self.wildcards):
            raise ValueError(f"pattern {self.name!r} has no wildcard {', '.join(sorted(unknown))} to constrain")

    def __repr__(self) -> str:
        return f"Pattern({self.name})"

    # -- matching ------------------------------------------------------------------------------
    def match(self, node: fx.Node) -> Match | None:
        try:
            return self._match(node)
        except _Failure:
            return None

    def explain(self, node: fx.Node) -> str:
        """Why ``node`` does (not) match, in one readable paragraph."""
        try:
            match = self._match(node)
        except _Failure as failure:
            return f"{self.name} does not match at %{node.name}: {failure.reason}"
        bound = ", ".join(f"{k}={_show(v)}" for k, v in match.bindings.items())
        return f"{self.name} matches at %{node.name} ({len(match.graph_nodes)} nodes; {bound})"

    def find(self, graph, *, where: Callable[[Match], bool] | None = None) -> list[Match]:
        """All non-overlapping matches in ``graph`` (an lqc Graph, GraphModule or fx.Graph),
        in graph order. ``where`` filters matches (e.g. by the anchor's module path)."""
        fx_graph = _fx_graph(graph)
        claimed: set[fx.Node] = set()
        matches = []
        for node in fx_graph.nodes:
            if node in claimed or node.op in ("placeholder", "output", "get_attr"):
                continue
            match = self.match(node)
            if match is None or claimed.intersection(match.graph_nodes):
                continue
            if where is not None and not where(match):
                continue
            claimed.update(match.graph_nodes)
            matches.append(match)
        return matches

    def _match(self, node: fx.Node) -> Match:
        state = _State({}, {}, {})
        state = self._match_node(self.output, node, state)
        match = Match(self, node, state.nodes, state.bindings, {p: chain for p, (_, chain) in state.runs.items()})
        if self.single_use:
            inside = set(match.graph_nodes)
            pairs = [*match.nodes.items(), *((p, g) for p, chain in match.runs.items() for g in chain)]
            for p_node, g_node in pairs:
                if g_node is node:
                    continue
                outside = [u.name for u in g_node.users if u not in inside]
                if outside:
                    raise _Failure(
                        f"%{g_node.name} (pattern's {p_node.name}) is also used outside the pattern, "
                        f"by {', '.join('%' + n for n in outside)}; pass single_use=False to allow it"
                    )
        return match

    def _match_node(self, p: fx.Node, g: Any, state: "_State") -> "_State":
        if p.op == "placeholder":
            check = self.constraints.get(p.target)
            if check is not None and p.target not in state.bindings and not check(g):
                raise _Failure(f"wildcard {p.target!r} would bind {_show(g)}, which fails {check.__name__}")
            return state.bind(p.target, g)
        if isinstance(p.target, ZeroOrMore):
            return self._match_run(p, g, state)
        if not isinstance(g, fx.Node):
            raise _Failure(f"pattern expects {_op(p)} but the graph has the literal {g!r}")
        if p in state.nodes:
            if state.nodes[p] is not g:
                raise _Failure(f"pattern node {p.name} would match both %{state.nodes[p].name} and %{g.name}")
            return state
        if g in state.matched():
            raise _Failure(f"%{g.name} is already matched by another pattern node")
        if isinstance(p.target, OneOf):
            return self._match_one_of(p, g, state)
        expected, found = op_name(p), op_name(g)
        if expected != found:
            raise _Failure(f"at %{g.name}: pattern expects {expected!r}, the graph has {found!r}")
        state = state.with_node(p, g)
        state = self._match_kwargs(p, g, state)
        if expected in COMMUTATIVE_OPS and len(p.args) == 2 and len(g.args) == 2:
            try:
                return self._match_args(p, list(p.args), list(g.args), state)
            except _Failure as first:
                try:
                    return self._match_args(p, list(p.args), [g.args[1], g.args[0]], state)
                except _Failure as second:
                    raise _Failure(
                        f"at %{g.name} ({expected}, tried both operand orders): {first.reason}; swapped: {second.reason}"
                    )
        return self._match_args(p, list(p.args), list(g.args), state)

    def _match_one_of(self, p: fx.Node, g: fx.Node, state: "_State") -> "_State":
        ops = p.target.ops
        if op_name(g) not in ops:
            raise _Failure(f"at %{g.name}: pattern expects one of {sorted(ops)}, the graph has {op_name(g)!r}")
        if not g.args or g.all_input_nodes != ([g.args[0]] if isinstance(g.args[0], fx.Node) else []):
            raise _Failure(f"at %{g.name}: {p.target.__name__} reads one tensor, its first argument")
        return self._match_value(p.args[0], g.args[0], state.with_node(p, g), f"argument 0 of %{g.name}")

    def _match_run(self, p: fx.Node, g: Any, state: "_State") -> "_State":
        if p in state.runs:
            if state.runs[p][0] is not g:
                raise _Failure(f"pattern node {p.name} would match both {_show(state.runs[p][0])} and {_show(g)}")
            return state
        chain: list[fx.Node] = []
        node, matched = g, state.matched()
        while (isinstance(node, fx.Node) and node not in matched and node.op in ("call_function", "call_method")
               and len(node.all_input_nodes) == 1 and p.target.predicate(node) and self._may_chain(p, node, chain)):
            chain.append(node)
            node = node.all_input_nodes[0]
        failures = []
        for length in range(len(chain), -1, -1):  # longest first
            below = chain[length - 1].all_input_nodes[0] if length else g
            try:
                return self._match_value(p.args[0], below, state.with_run(p, g, tuple(chain[:length])),
                                         f"below {p.target.__name__} at {_show(g)}")
            except _Failure as failure:
                failures.append(failure.reason)
        raise _Failure(failures[0])

    def _may_chain(self, p: fx.Node, node: fx.Node, chain: list[fx.Node]) -> bool:
        """Whether a single-use match may take ``node`` into ``p``'s chain: the nodes below the top
        have one reader (the next in the chain); the top has as many as the pattern gives ``p``
        (which the match then makes sure are its own), unless it is the anchor."""
        if not self.single_use:
            return True
        if chain:
            return len(node.users) == 1
        return p is self.output or len(node.users) == len(p.users)

    def _match_args(self, p: fx.Node, p_args: list, g_args: list, state: "_State") -> "_State":
        if len(g_args) < len(p_args):
            raise _Failure(f"at %{self._g(state, p)}: pattern passes {len(p_args)} arguments, the graph {len(g_args)}")
        for extra in g_args[len(p_args) :]:
            if extra is not None:
                raise _Failure(f"at %{self._g(state, p)}: the graph passes the extra argument {_show(extra)}")
        for i, (pa, ga) in enumerate(zip(p_args, g_args)):
            state = self._match_value(pa, ga, state, f"argument {i} of %{self._g(state, p)}")
        return state

    def _match_kwargs(self, p: fx.Node, g: fx.Node, state: "_State") -> "_State":
        for key, pv in p.kwargs.items():
            if key not in g.kwargs:
                if _is_default(p.target, key, pv):
                    continue
                raise _Failure(f"at %{g.name}: pattern passes {key}={_show(pv)}, the graph does not")
            state = self._match_value(pv, g.kwargs[key], state, f"{key}= of %{g.name}")
        for key, gv in g.kwargs.items():
            if key not in p.kwargs and not _is_default(g.target, key, gv):
                raise _Failure(f"at %{g.name}: the graph passes {key}={_show(gv)}, the pattern does not")
        return state

    def _match_value(self, pv: Any, gv: Any, state: "_State", where: str) -> "_State":
        if isinstance(pv, fx.Node):
            return self._match_node(pv, gv, state)
        if isinstance(pv, (list, tuple)):
            if not isinstance(gv, (list, tuple)) or len(pv) != len(gv):
                raise _Failure(f"{where}: pattern expects {_show(pv)}, the graph has {_show(gv)}")
            for a, b in zip(pv, gv):
                state = self._match_value(a, b, state, where)
            return state
        if isinstance(gv, fx.Node) or not _literal_equal(pv, gv):
            raise _Failure(f"{where}: pattern expects {_show(pv)}, the graph has {_show(gv)}")
        return state

    @staticmethod
    def _g(state: "_State", p: fx.Node) -> str:
        node = state.nodes.get(p)
        return node.name if node is not None else p.name


@dataclass
class _State:
    """Bindings so far; copied on write so a failed operand order leaves no trace."""

    nodes: dict[fx.Node, fx.Node]
    bindings: dict[str, Any]
    runs: dict[fx.Node, tuple[Any, tuple[fx.Node, ...]]]  # ZeroOrMore node -> (top, chain)

    def matched(self) -> set[fx.Node]:
        return {*self.nodes.values(), *(n for _, chain in self.runs.values() for n in chain)}

    def bind(self, name: str, value: Any) -> "_State":
        if name in self.bindings:
            if not _same(self.bindings[name], value):
                raise _Failure(
                    f"wildcard {name!r} would bind both {_show(self.bindings[name])} and {_show(value)}"
                )
            return self
        return _State(self.nodes, {**self.bindings, name: value}, self.runs)

    def with_node(self, p: fx.Node, g: fx.Node) -> "_State":
        return _State({**self.nodes, p: g}, self.bindings, self.runs)

    def with_run(self, p: fx.Node, top: Any, chain: tuple[fx.Node, ...]) -> "_State":
        return _State(self.nodes, self.bindings, {**self.runs, p: (top, chain)})


def explain(pattern: Pattern, node: fx.Node) -> str:
    """Why ``node`` does (not) match ``pattern``."""
    return pattern.explain(node)


def _trace(fn: Callable) -> fx.Graph:
    if isinstance(fn, fx.Graph):
        return fn
    names = list(inspect.signature(fn).parameters)
    gm = fx.symbolic_trace(fn, concrete_args=None)
    for ph, name in zip(gm.graph.find_nodes(op="placeholder"), names):
        ph.target = name
    return gm.graph


def _fx_graph(graph) -> fx.Graph:
    if isinstance(graph, fx.Graph):
        return graph
    if isinstance(graph, fx.GraphModule):
        return graph.graph
    return graph.gm.graph


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return _literal_equal(a, b)


def _literal_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    try:
        return type(a) is type(b) and a == b
    except Exception:
        return False


def _is_default(target: Any, key: str, value: Any) -> bool:
    """Whether ``key=value`` is what ``target`` does when the keyword is left out."""
    if value is None:
        return True
    schema = getattr(target, "_schema", None)
    if schema is not None:
        for arg in schema.arguments:
            if arg.name == key and arg.has_default_value():
                return _literal_equal(arg.default_value, value)
        return False
    try:
        parameter = inspect.signature(target).parameters.get(key) if callable(target) else None
    except (TypeError, ValueError):
        parameter = None
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return _literal_equal(parameter.default, value)
    return value is False  # builtins without a signature: flags default to off


def _op(p: fx.Node) -> str:
    return repr(op_name(p))


def _show(value: Any) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)

