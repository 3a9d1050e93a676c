"""Graph edits behind ``drop_layers``: zeros where a dropped attention's states meet the KV cache,
dead-code removal that never touches in-place writes, and the bookkeeping of what was removed."""

from __future__ import annotations

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.ops import LINEAR_OPS, is_inplace


def cut_cache_writes(graph: Graph, tainted: set[fx.Node], stream: fx.Node) -> bool:
    """Where the sublayer's values meet a cache (a ``cat`` or an in-place write that also has an
    operand not computed by the sublayer), put zeros of the same shape in their place."""
    complete = True
    for node in [n for n in graph.nodes if n in tainted]:
        if op_name(node) != "cat" and not is_inplace(node):
            continue
        operands = list(node.args[0]) if op_name(node) == "cat" else list(node.args)
        tensors = [a for a in operands if isinstance(a, fx.Node)]
        if not any(a not in tainted for a in tensors):
            continue  # computed only from the sublayer (rope's cat): dies with it
        for operand in tensors:
            if operand not in tainted:
                continue
            zeros = _zeros_like(graph, operand, stream, before=node)
            if zeros is None:
                complete = False
                continue
            node.replace_input_with(operand, zeros)
    return complete


def _zeros_like(graph: Graph, value: fx.Node, stream: fx.Node, *, before: fx.Node) -> fx.Node | None:
    """``stream.new_zeros(shape of value)``, its symbolic sizes read off ``stream`` (batch and
    sequence length); None when a size is symbolic and not one of the stream's."""
    val, ref = value.meta.get("val"), stream.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return None
    g = graph.gm.graph
    with g.inserting_before(before):
        sizes: list = []
        for size in val.shape:
            if isinstance(size, int):
                sizes.append(size)
                continue
            match = next((j for j, s in enumerate(ref.shape) if not isinstance(s, int) and str(s) == str(size)), None)
            if match is None:
                return None
            sizes.append(g.call_method("size", (stream, match)))
        zeros = g.call_method("new_zeros", (stream, tuple(sizes)), {"dtype": val.dtype})
    zeros.meta["nn_module_stack"] = dict(value.meta.get("nn_module_stack") or {})
    return zeros


def eliminate_dead_code(graph: Graph, keep: set[fx.Node]) -> None:
    """Erase pure nodes without users, repeatedly; never in-place writes or nodes in ``keep``."""
    for node in reversed(list(graph.nodes)):
        if node in keep or node.users or node.op not in ("call_function", "call_method"):
            continue
        if is_inplace(node) or node.is_impure():
            continue
        graph.gm.graph.erase_node(node)


def constant_sizes(graph: Graph) -> dict[tuple, tuple[int, int, set[str]]]:
    """Storage -> (elements, bytes, constant names): a storage shared by several names (a tied
    weight) counts once, and goes only when no name uses it."""
    sizes: dict[tuple, tuple[int, int, set[str]]] = {}
    for name, tensor in graph.constants():
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key in sizes:
            sizes[key][2].add(name)
            continue
        nbytes = tensor.untyped_storage().nbytes()
        sizes[key] = (nbytes // tensor.element_size(), nbytes, {name})
    return sizes


def linear_weights(graph: Graph) -> set[str]:
    """Names of constants used as the weight of a linear."""
    names = set()
    for node in graph.nodes:
        name = op_name(node)
        if name not in LINEAR_OPS:
            continue
        index = 2 if name == "addmm" else 1
        weight = node.args[index] if len(node.args) > index else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            names.add(weight.target)
    return names
