"""Shape and dtype propagation with FakeTensor.

Every node gets ``node.meta["val"]``: a FakeTensor (or SymInt, or a tuple of them) with the
node's shape, dtype and device. Symbolic dimensions stay symbolic: a graph dynamo captured with a
dynamic sequence length keeps ``s0`` in its shapes, because we reuse dynamo's own FakeTensorMode
and the placeholders' fake values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from .errors import ShapePropagationError
from .graph import Graph


def new_fake_mode() -> FakeTensorMode:
    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


def fake_from_example(mode: FakeTensorMode, value: Any) -> Any:
    """A fake counterpart of an example input: real tensors become static fake tensors."""
    if isinstance(value, FakeTensor):
        return value
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value, static_shapes=True)
    return value


# node.meta[_KEY] = (key, val): the value propagation gave the node, and a hash of everything it
# depends on (op, target, constant arguments, and the shapes, strides and dtypes of its inputs and
# constants). A pass rewrites a few nodes of a graph of thousands: on the next propagation a node
# whose key is unchanged keeps its value (the same op on the same shapes gives the same shapes),
# so only the nodes the pass touched, and those whose inputs' shapes changed, run again.
_KEY = "lqc_shape_key"


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a node argument: a node by its value's metadata, a tensor by its."""
    if isinstance(value, fx.Node):
        return ("node", _frozen(value.meta.get("val")))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _frozen(value.start), _frozen(value.stop), _frozen(value.step))
    if isinstance(value, torch.Tensor):
        return ("tensor", str(tuple(value.shape)), str(value.stride()), value.dtype, str(value.device))
    return (type(value).__name__, repr(value))


class _FakePropagator(fx.Interpreter):
    def __init__(self, graph: Graph, mode: FakeTensorMode, examples: list[Any]):
        super().__init__(graph.gm, garbage_collect_values=True)
        self.mode = mode
        self.fake_constants: dict[int, FakeTensor] = {}
        self.examples = dict(zip(graph.placeholders(), examples))

    def _key(self, node: fx.Node) -> int:
        if node.op == "placeholder":
            depends = (id(self.mode), _frozen(self.examples[node]))
        elif node.op == "get_attr":
            depends = _frozen(getattr(self.module, node.target, None))
        elif node.op == "call_module":
            depends = id(self.module.get_submodule(node.target))
        else:
            depends = None
        return hash((node.op, node.target, depends, _frozen(node.args), _frozen(node.kwargs)))

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            key = id(value)
            if key not in self.fake_constants:
                self.fake_constants[key] = self.mode.from_tensor(value, static_shapes=True)
            return self.fake_constants[key]
        return value

    def run_node(self, node: fx.Node) -> Any:
        key = self._key(node)
        cached = node.meta.get(_KEY)
        if cached is not None and cached[0] == key and node.op not in ("placeholder", "output") and node.meta.get("val") is cached[1]:
            return cached[1]
        try:
            with self.mode:
                result = super().run_node(node)
        except Exception as exc:  # report which node, with its inputs' shapes
            raise ShapePropagationError(
                f"shape propagation failed at node {node.name!r} ({node.format_node()}): "
                f"{type(exc).__name__}: {exc}\n  input shapes: {_describe_inputs(node)}"
            ) from exc
        node.meta["val"] = result
        node.meta[_KEY] = (key, result)
        return result


def _describe_inputs(node: fx.Node) -> str:
    parts = []
    for arg in node.all_input_nodes:
        parts.append(f"{arg.name}: {describe_value(arg.meta.get('val'))}")
    return ", ".join(parts) or "(none)"


def describe_value(value: Any) -> str:
    """``f32[1, s0, 576]`` for a tensor, ``s0`` for a SymInt, a tuple for tuples."""
    if isinstance(value, torch.Tensor):
        dims = ", ".join(str(d) for d in value.shape)
        return f"{dtype_abbrev(value.dtype)}[{dims}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_value(v) for v in value) + ")"
    if value is None:
        return "-"
    return str(value)


_DTYPE_ABBREV = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
}


def dtype_abbrev(dtype: torch.dtype) -> str:
    return _DTYPE_ABBREV.get(dtype, str(dtype).replace("torch.", ""))


def propagate_shapes(graph: Graph) -> None:
    """Set ``node.meta["val"]`` on every node of ``graph``; raise ShapePropagationError naming the
    first node whose op fails on its inputs' shapes."""
    if graph.fake_mode is None:
        graph.fake_mode = new_fake_mode()
    mode = graph.fake_mode
    examples = [fake_from_example(mode, inp.example) for inp in graph.inputs]
    placeholders = graph.placeholders()
    if len(placeholders) != len(examples):
        raise ShapePropagationError(
            f"{graph.name}: {len(placeholders)} placeholders but {len(examples)} recorded inputs"
        )
    for node, example in zip(placeholders, examples):
        node.meta["val"] = example
    # Ops that write into their inputs (index_copy_ on a static cache) must not touch the
    # recorded example values, so propagation runs on copies of the placeholders' fakes.
    with mode:
        run_inputs = [v.clone() if isinstance(v, torch.Tensor) else v for v in examples]
    _FakePropagator(graph, mode, examples).run(*run_inputs)
    for node, example in zip(placeholders, examples):
        node.meta["val"] = example
