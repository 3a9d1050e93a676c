"""Graph verification, run by the pass manager after every pass.

Checks, in order: fx's own lint (topological order, unique names); every constant exists; shapes
propagate; the graph still returns what dynamo expects (same number of outputs, same shapes and
dtypes as before any pass); and every lqc op satisfies its registered invariants.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .errors import VerificationError
from .graph import Graph
from .ops import op_name
from .shapes import describe_value, propagate_shapes

# op name (as ir.ops.op_name spells it) -> check(graph, node) raising VerificationError.
_OP_VERIFIERS: dict[str, Callable[[Graph, fx.Node], None]] = {}


def register_op_verifier(name: str, check: Callable[[Graph, fx.Node], None]) -> None:
    """Register the invariants of an lqc op, e.g. ``register_op_verifier("lqc::qlinear", check)``."""
    _OP_VERIFIERS[name] = check


def output_signature(graph: Graph) -> list[str]:
    """What the graph returns, as text (``f32[1, 8, 128]`` per output), for comparing graphs."""
    out = graph.output_node().args[0]
    values = out if isinstance(out, (list, tuple)) else [out]
    return [describe_value(v.meta.get("val")) if isinstance(v, fx.Node) else repr(v) for v in values]


def verify_graph(graph: Graph, expected_outputs: list[str] | None = None, *, after: str = "") -> None:
    """Raise VerificationError (naming the pass in ``after``) if ``graph`` is malformed."""
    where = f" after pass {after!r}" if after else ""
    try:
        graph.gm.graph.lint()
    except Exception as exc:
        raise VerificationError(f"graph lint failed{where}: {exc}") from exc
    for node in graph.gm.graph.find_nodes(op="get_attr"):
        if not hasattr(graph.gm, node.target):
            raise VerificationError(f"node {node.name!r}{where} reads constant {node.target!r}, which does not exist")
        value = getattr(graph.gm, node.target)
        if not isinstance(value, (torch.Tensor, torch.nn.Module)):
            raise VerificationError(f"constant {node.target!r}{where} is a {type(value).__name__}, not a tensor")
    try:
        propagate_shapes(graph)
    except Exception as exc:
        raise VerificationError(f"shapes do not propagate{where}: {exc}") from exc
    if expected_outputs is not None:
        actual = output_signature(graph)
        if actual != expected_outputs:
            raise VerificationError(
                f"the graph's outputs changed{where}: dynamo expects {expected_outputs}, the graph now returns {actual}"
            )
    for node in graph.nodes:
        check = _OP_VERIFIERS.get(op_name(node))
        if check is None:
            continue
        try:
            check(graph, node)
        except VerificationError as exc:
            raise VerificationError(f"invalid lqc op{where}: {exc}") from exc
