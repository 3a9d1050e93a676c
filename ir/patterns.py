"""Common transformer patterns, written with ir.pattern: the ones lqc's own codegen matches.

- RMSNorm as HF models decompose it: ``[weight *] (x * rsqrt(x.pow(2).mean(-1, keepdim=True) +
  eps))``, with the ``.to`` casts around it (x to float32, the result back to the model's dtype).
  ``fold_norms`` may have moved the weight into the next linear, so there are two patterns.
- SwiGLU's product ``act(gate) * up``, any activation (``silu`` in Llama, ``gelu`` in Gemma).

Residual and bias adds are not here: structurally they are any ``add``; what tells them apart is
the operands' shapes, which the partitioner checks (lqc.codegen.partition).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .ops import ACTIVATION_OPS, op_name
from .pattern import Match, OneOf, Pattern, ZeroOrMore

# dtype conversions a kernel can do in registers
CAST_OPS = frozenset({"to", "float", "half", "bfloat16"})


def shape_of(node) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def same_shape(a: tuple | None, b: tuple | None) -> bool:
    # compared as text: symbolic sizes (s0) are equal when they print the same, and comparing
    # SymInts directly would record a guard in dynamo's shape environment
    return a is not None and b is not None and len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def is_cast(node: fx.Node) -> bool:
    """A dtype conversion of one tensor that keeps its shape and device."""
    if op_name(node) not in CAST_OPS or len(node.all_input_nodes) != 1 or "memory_format" in node.kwargs:
        return False
    out, inp = node.meta.get("val"), node.all_input_nodes[0].meta.get("val")
    return (isinstance(out, torch.Tensor) and isinstance(inp, torch.Tensor) and out.device == inp.device
            and same_shape(tuple(out.shape), tuple(inp.shape)))


def is_vector_constant(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "get_attr" and len(shape_of(value) or ()) == 1


def from_weights(node, depth: int = 4) -> bool:
    """A frozen weight (get_attr), or computed from frozen weights and numbers alone (Gemma's
    ``1 + weight.float()``), within ``depth`` ops."""
    if node.op == "get_attr":
        return True
    return depth > 0 and node.op in ("call_function", "call_method") and bool(node.all_input_nodes) and all(
        from_weights(a, depth - 1) for a in node.all_input_nodes)


def is_number(value) -> bool:
    return isinstance(value, (int, float))


def is_last_dim(dim) -> bool:
    return dim in (-1, [-1], (-1,))


casts = ZeroOrMore(is_cast, "casts")
activation = OneOf(ACTIVATION_OPS, "activation")


def rms_norm(x, weight, eps, dim):
    h = casts(x)
    h = h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps)
    return casts(weight * casts(h))


def rms_norm_unweighted(x, eps, dim):
    h = casts(x)
    return casts(h * torch.rsqrt(h.pow(2).mean(dim, keepdim=True) + eps))


def swiglu(gate, up):
    return activation(gate) * up


_NORM_CONSTRAINTS = {"eps": is_number, "dim": is_last_dim}
RMS_NORM = Pattern(rms_norm, constraints={**_NORM_CONSTRAINTS, "weight": is_vector_constant})
RMS_NORM_UNWEIGHTED = Pattern(rms_norm_unweighted, constraints=_NORM_CONSTRAINTS)
SWIGLU = Pattern(swiglu)


def match_rms_norm(out: fx.Node) -> Match | None:
    """The decomposed RMSNorm computing ``out``, weighted if it can be, or None."""
    return RMS_NORM.match(out) or RMS_NORM_UNWEIGHTED.match(out)


def explain_rms_norm(out: fx.Node) -> str:
    """Why ``out`` is (not) a decomposed RMSNorm, with and without its weight."""
    return f"{RMS_NORM.explain(out)}\n{RMS_NORM_UNWEIGHTED.explain(out)}"
