"""The prologue of a qlinear fusion group as kernel arguments: an RMSNorm of the GEMM's input.

The partitioner (lqc.codegen.partition) gives a qlinear group the norm whose only reader is the
qlinear: the decomposed ``[weight *] (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))`` of HF
models (with its ``.to`` casts), or one ``rms_norm`` op. The generated kernel computes it as it
loads x (``dequant_gemm_tile``'s HAS_NORM): what it needs from the nodes is the norm's input, its
weight (if any) and eps. ``norm_prologue`` reads those off (the decomposed norm's from the
bindings of ``lqc.ir.patterns``' RMSNorm pattern, the one the partitioner matched), or says why
it cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from lqc.ir import op_name
from lqc.ir.patterns import match_rms_norm


@dataclass
class NormPrologue:
    x: fx.Node  # the norm's input: what the kernel loads
    weight: fx.Node | None  # [K] (a constant), or None: fold_norms moved it into the weights
    eps: float


def norm_prologue(prologue: list[fx.Node], role: str, anchor_x: fx.Node) -> tuple[NormPrologue | None, str]:
    """(the norm's kernel arguments, "") or (None, why it stays outside the kernel)."""
    if role != "rms_norm":
        return None, f"{role} prologue: no kernel template (runs before the kernel)"
    found = _rms_norm_op(prologue) if len(prologue) == 1 else _decomposed(anchor_x)
    if isinstance(found, str):
        return None, found
    x_value, out_value = found.x.meta.get("val"), anchor_x.meta.get("val")
    if not (isinstance(x_value, torch.Tensor) and isinstance(out_value, torch.Tensor)) or x_value.dtype != out_value.dtype:
        return None, "norm prologue changes the dtype (its input and output differ): runs before the kernel"
    return found, ""


def _rms_norm_op(prologue: list[fx.Node]) -> NormPrologue | str:
    (node,) = prologue
    if op_name(node) != "rms_norm":
        return f"{op_name(node)} prologue: no kernel template (runs before the kernel)"
    args = dict(zip(("input", "normalized_shape", "weight", "eps"), node.args)) | dict(node.kwargs)
    shape = args.get("normalized_shape")
    if not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return "rms_norm over more than the last dimension: runs before the kernel"
    x, weight, eps = args["input"], args.get("weight"), args.get("eps")
    if weight is not None and not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return "rms_norm with a computed weight: runs before the kernel"
    if eps is None:  # torch's default: the input dtype's machine epsilon
        eps = torch.finfo(x.meta["val"].dtype).eps
    return NormPrologue(x, weight, float(eps))


def _decomposed(out: fx.Node) -> NormPrologue | str:
    match = match_rms_norm(out)
    if match is None:
        return "norm prologue is no decomposed RMSNorm: runs before the kernel"
    return NormPrologue(match["x"], match.bindings.get("weight"), float(match["eps"]))
