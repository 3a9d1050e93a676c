"""Scale migration between a producer and the linears consuming its output: ``x' = x / s``,
``W' = W diag(s)`` for every consumer. Exact: ``W' x' = W x``.

It moves difficulty between activations and weights: SmoothQuant divides activation outliers
into the weights before int8 quantization; AWQ multiplies salient input channels up before int4
quantization so their weights are represented more precisely. Reparameterization uses it too.

A migration is possible when the producer can absorb ``1 / s`` per channel exactly:

- a norm's elementwise weight (RMSNorm's ``weight * h``, LayerNorm's weight and bias);
- the ``up`` operand of a gated product ``act(gate) * up`` where ``up`` is a linear: its rows
  (and bias) are divided, so the product, and the down projection's input, is divided by s;

and when every user of ``x`` is one of the consuming linears (else they would see ``x / s``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.linear import LinearSite, linear_site


@dataclass
class Producer:
    """Where ``1 / s`` goes. ``kind``: "norm" (constant vectors) or "linear_rows" (a linear's rows)."""

    kind: str
    node: fx.Node  # the node computing x
    constants: list[fx.Node]  # norm weight (and bias); or the up linear's weight (and bias)
    site: LinearSite | None = None  # the linear whose rows absorb 1/s (kind "linear_rows")

    def describe(self, graph: Graph) -> str:
        if self.site is not None:
            return f"rows of {self.site.name(graph)}"
        return ", ".join(graph.fqns(c)[0] if graph.fqns(c) else c.name for c in self.constants)


def find_producer(graph: Graph, x: fx.Node, consumers: list[LinearSite]) -> Producer | None:
    """The producer of ``x`` that can absorb a per-channel scale, or None."""
    consumer_nodes = {site.node for site in consumers}
    if any(user not in consumer_nodes for user in x.users):
        return None
    width = x.meta["val"].shape[-1] if isinstance(x.meta.get("val"), torch.Tensor) else None
    # GPT-2's Conv1D flattens its input first, and a causal LM's head reads only the positions it
    # scores (``h[:, -k:, :]``): look through reshapes and row selections that keep the last dimension
    while op_name(x) in ("view", "reshape", "contiguous", "getitem") and len(x.args[0].users) == 1 and _keeps_last_dim(x) \
            and (op_name(x) != "getitem" or _leaves_channels(x)):
        x = x.args[0]
    name = op_name(x)
    if name == "mul" and len(x.args) == 2:
        for vec, other in (x.args, x.args[::-1]):
            if _is_vector_constant(graph, vec, width):
                return Producer("norm", x, [vec])
            # gated product act(gate) * up: the up linear's rows absorb the scale
            if isinstance(vec, fx.Node) and (up := linear_site(vec)) is not None and len(vec.users) == 1:
                if isinstance(other, fx.Node) and op_name(other) in ("silu", "gelu", "relu", "sigmoid"):
                    return Producer("linear_rows", x, [up.weight] + ([up.bias] if up.bias is not None else []), up)
    if name == "layer_norm" and len(x.args) >= 3 and _is_vector_constant(graph, x.args[2], width):
        bias = x.args[3] if len(x.args) > 3 and _is_vector_constant(graph, x.args[3], width) else None
        return Producer("norm", x, [x.args[2]] + ([bias] if bias is not None else []))
    return None


def migrate_scales(graph: Graph, producer: Producer, consumers: list[LinearSite], scales: torch.Tensor) -> None:
    """Apply ``x' = x / s`` at ``producer`` and ``W' = W diag(s)`` at every consumer, in float64."""
    scale_producer(graph, producer, scales)
    scale_consumers(graph, consumers, scales)


def scale_producer(graph: Graph, producer: Producer, scales: torch.Tensor) -> None:
    """``x' = x / s``: the producer's constants absorb ``1 / s``."""
    s = scales.to(torch.float64)
    for constant in producer.constants:
        current = graph.constant(constant)
        old = current.to(torch.float64)
        if producer.kind == "linear_rows" and old.dim() == 2:
            new = old / s[None, :] if producer.site.transposed else old / s[:, None]
        else:
            new = old / s
        _replace_constant(graph, constant, new.to(current.dtype))


def scale_consumers(graph: Graph, consumers: list[LinearSite], scales: torch.Tensor) -> None:
    """``W' = W diag(s)`` for every consumer linear."""
    s = scales.to(torch.float64)
    for site in consumers:
        dtype = graph.constant(site.weight).dtype
        weight = (site.weight_tensor(graph).to(torch.float64) * s[None, :]).to(dtype)
        stored = weight.T.contiguous() if site.transposed else weight
        site.weight = _replace_constant(graph, site.weight, stored, only_user=site.node)


def _replace_constant(graph: Graph, constant: fx.Node, value: torch.Tensor, only_user: fx.Node | None = None) -> fx.Node:
    """Point the users of ``constant`` (or just ``only_user``) at a new constant holding ``value``."""
    new = graph.add_constant(value, f"{constant.target}_migrated", graph.fqns(constant), before=constant)
    new.meta.update({k: v for k, v in constant.meta.items() if k != "val"})
    users = [only_user] if only_user is not None else list(constant.users)
    for user in users:
        user.replace_input_with(constant, new)
    return new


def _keeps_last_dim(node: fx.Node) -> bool:
    source, out = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) and source.shape[-1] == out.shape[-1]


def _leaves_channels(node: fx.Node) -> bool:
    """A ``getitem`` whose index does not touch the last dimension (no channel permutation or slice)."""
    index, source = node.args[1], node.args[0].meta.get("val")
    if not isinstance(index, tuple) or not isinstance(source, torch.Tensor) or any(i is Ellipsis for i in index):
        return False
    return len(index) < source.dim() or index[source.dim() - 1] == slice(None)


def _is_vector_constant(graph: Graph, value, width) -> bool:
    if not (isinstance(value, fx.Node) and value.op == "get_attr"):
        return False
    tensor = graph.constant(value)
    return tensor.dim() == 1 and (width is None or tensor.shape[0] == width)
