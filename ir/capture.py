"""From the graph dynamo hands a backend to an lqc Graph.

Dynamo lifts every parameter and buffer into a placeholder and passes the real tensors as example
inputs, each marked ``_dynamo_static_input_type == "unguarded"``. Capture freezes those into named
constants (buffers of a fresh GraphModule named by their module path) and keeps the rest (token
ids, positions, cache tensors) as inputs. Dynamo's own graph is never modified: dynamo builds its
call of the compiled graph from that graph's placeholders after the backend returns.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .errors import CaptureError
from .graph import FrozenInput, Graph, GraphInput, fqn_from_source, sanitize
from .ops import SHAPE_ONLY_OPS, is_inplace, op_name
from .regions import annotate_regions
from .shapes import propagate_shapes


def capture(gm: fx.GraphModule, example_inputs: Sequence[Any], *, name: str = "graph") -> Graph:
    """Freeze the parameters of a dynamo graph, propagate shapes and annotate regions."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(example_inputs):
        raise CaptureError(f"{len(placeholders)} placeholders but {len(example_inputs)} example inputs")

    new_graph = copy.deepcopy(gm.graph)
    root = torch.nn.Module()
    graph = Graph(gm=fx.GraphModule(root, new_graph), inputs=[], num_args=len(example_inputs), name=name)
    new_placeholders = list(new_graph.find_nodes(op="placeholder"))

    # Tied weights reach dynamo as one tensor; freeze it once and remember every path to it.
    attr_of_tensor: dict[int, str] = {}
    for index, (node, new_node, value) in enumerate(zip(placeholders, new_placeholders, example_inputs)):
        source = _source_name(node)
        if _is_frozen_weight(node, value):
            fqn = fqn_from_source(source) if source else node.name
            attr = attr_of_tensor.get(id(value))
            if attr is None:
                attr = graph._unique_attr(sanitize(fqn))
                graph.gm.register_buffer(attr, value.detach())
                graph.constant_fqns[attr] = (fqn,)
                attr_of_tensor[id(value)] = attr
            elif fqn not in graph.constant_fqns[attr]:
                graph.constant_fqns[attr] += (fqn,)
            graph.frozen.append(FrozenInput(index, attr, value, value._version))
            with new_graph.inserting_before(new_node):
                const = new_graph.get_attr(attr)
            const.meta.update(new_node.meta)
            const.meta.pop("grapharg", None)
            new_node.replace_all_uses_with(const)
            new_graph.erase_node(new_node)
        else:
            example = node.meta.get("example_value", value)
            graph.inputs.append(
                GraphInput(name=new_node.name, source=source, role=_input_role(node, source, value), index=index, example=example)
            )
            new_node.meta.pop("grapharg", None)

    # Constants dynamo already installed as attributes (inline_inbuilt_nn_modules=False).
    flat_to_fqn = gm.meta.get("dynamo_flat_name_to_original_fqn", {})
    for node in list(new_graph.find_nodes(op="get_attr")):
        if node.target in graph.constant_fqns:
            continue
        value = _get_attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            raise CaptureError(f"get_attr {node.target!r} is a {type(value).__name__}, not a tensor")
        attr = graph._unique_attr(sanitize(str(node.target)))
        graph.gm.register_buffer(attr, value.detach())
        graph.constant_fqns[attr] = (flat_to_fqn.get(node.target, str(node.target)),)
        node.target = attr

    graph.fake_mode = _fake_mode_of(placeholders)
    graph.recompile()
    propagate_shapes(graph)
    annotate_regions(graph)
    return graph


def trace(fn: Callable, *args, **kwargs) -> Graph:
    """Capture ``fn(*args, **kwargs)`` (a module or function) as one lqc Graph, through dynamo.

    For tests, `lqc.compress` and scripts: the same capture the backend does, without compiling.
    Raises CaptureError if dynamo splits the call into more than one graph.
    """
    graphs: list[Graph] = []

    def capturing_backend(gm, example_inputs):
        graphs.append(capture(gm, example_inputs, name=f"graph{len(graphs)}"))
        return gm.forward

    compiled = torch.compile(fn, backend=capturing_backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            compiled(*args, **kwargs)
    except torch._dynamo.exc.Unsupported as exc:
        raise CaptureError(f"dynamo could not capture {fn!r} as one graph: {exc}") from exc
    if len(graphs) != 1:
        raise CaptureError(f"expected one graph, dynamo produced {len(graphs)}")
    return graphs[0]


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name if source is not None else ""


def _is_frozen_weight(node: fx.Node, value: Any) -> bool:
    """A parameter or module buffer the graph only reads: safe to freeze into a constant."""
    if not isinstance(value, torch.Tensor):
        return False
    if getattr(value, "_dynamo_static_input_type", None) != "unguarded":
        return False
    source = _source_name(node)
    if not (isinstance(value, torch.nn.Parameter) or "._buffers[" in source or "._parameters[" in source):
        return False
    # A buffer the graph writes (BatchNorm running stats in training) stays an input.
    for user in node.users:
        if is_inplace(user) and user.args and user.args[0] is node:
            return False
    return True


def _input_role(node: fx.Node, source: str, value: Any) -> str:
    if isinstance(value, (int, torch.SymInt)):
        return "size"
    for key, role in (
        ("cumulative_length", "cache_length"),
        ("cache_position", "cache_position"),
        ("position_ids", "position_ids"),
        ("attention_mask", "attention_mask"),
        ("input_ids", "token_ids"),
        ("past_key_values", "kv_cache"),
        ("['cache']", "kv_cache"),  # transformers >= 5.24 renamed past_key_values to cache
    ):
        if key in source:
            return role
    # Positional token ids (model(ids)): an integer tensor read by an embedding, maybe reshaped first.
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and _feeds_embedding(node):
        return "token_ids"
    return "other"


def _feeds_embedding(node: fx.Node, depth: int = 4) -> bool:
    for user in node.users:
        if op_name(user) == "embedding" and user.args[0] is node:
            return True
        if depth and op_name(user) in SHAPE_ONLY_OPS and user.args and user.args[0] is node:
            if _feeds_embedding(user, depth - 1):
                return True
    return False


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fake_mode_of(placeholders: list[fx.Node]):
    # The placeholders' fake values belong to dynamo's tracing FakeTensorMode (not the fresh one
    # TracingContext holds for the backend); propagation must use theirs to keep their symbols.
    for node in placeholders:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and hasattr(value, "fake_mode"):
            return value.fake_mode
    return None
