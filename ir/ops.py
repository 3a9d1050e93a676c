"""One name per operation, whatever spelling the graph used.

Dynamo graphs mix spellings of the same operation: ``x * y`` (``operator.mul``), ``torch.mul``,
``x.mul(y)`` (a ``call_method``), and after AOT tracing ``aten.mul.Tensor``. Regions, patterns and
passes all ask "is this node a mul?", so they ask it here, through :func:`op_name`.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

_OPERATOR_NAMES: dict[Callable, str] = {
    operator.add: "add",
    operator.sub: "sub",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.floordiv: "floordiv",
    operator.neg: "neg",
    operator.pow: "pow",
    operator.matmul: "matmul",
    operator.getitem: "getitem",
    operator.iadd: "add_",
    operator.imul: "mul_",
}

# Operand order does not change the result; the pattern matcher tries both orders.
COMMUTATIVE_OPS = frozenset({"add", "mul"})

# Ops that compute y = x @ W.T (+ b) with W a weight: what quantization and region detection call "linear".
LINEAR_OPS = frozenset({"linear", "addmm", "conv1d", "conv2d"})

ACTIVATION_OPS = frozenset({"silu", "gelu", "relu", "tanh", "sigmoid", "gelu_new", "quick_gelu", "softplus"})

ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "softmax"})

# Ops that only change how a tensor is viewed or typed, not which values it holds.
SHAPE_ONLY_OPS = frozenset({"view", "reshape", "unsqueeze", "squeeze", "contiguous", "to", "long", "int", "flatten"})

NORM_OPS = frozenset({"layer_norm", "rms_norm", "group_norm", "batch_norm", "rsqrt"})


def op_name(node: fx.Node) -> str:
    """Canonical name of what ``node`` computes: ``"mul"``, ``"linear"``, ``"lqc::qlinear"``...

    Placeholders, get_attr and output nodes are named by their fx opcode.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_module":
        return f"module:{node.target}"
    if node.op != "call_function":
        return node.op
    return target_name(node.target)


def target_name(target: Callable | str) -> str:
    """Canonical name of a call_function target (see :func:`op_name`)."""
    if isinstance(target, str):
        return target
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._opname
        return name if ns == "aten" else f"{ns}::{name}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, name = target._qualified_op_name.split("::")
        return name if ns == "aten" else f"{ns}::{name}"
    name = getattr(target, "__name__", None) or str(target)
    return name


def is_inplace(node: fx.Node) -> bool:
    """True for ops that write into their first operand (``add_``, ``index_copy_``, ``copy_``)."""
    name = op_name(node)
    return node.op in ("call_function", "call_method") and name.endswith("_") and not name.endswith("__")


def is_linear(node: fx.Node) -> bool:
    return op_name(node) in LINEAR_OPS
