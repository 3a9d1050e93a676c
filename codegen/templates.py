"""Which lqc ops have a Triton kernel template, and for which formats; the float32 precision
their ``tl.dot`` calls use (``dot_input_precision``).

Kept apart from the templates themselves so that code describing a graph (the viz report, the
partitioner's users) can ask without importing triton: a template module must be imported after
TRITON_INTERPRET is set (see dequant_gemm's docstring).
"""

from __future__ import annotations

import torch

# lqc.codegen.dequant_gemm: lqc::qlinear with these weight formats (w8a8 / fp8_dyn quantizing x per
# token in the kernel), and the packed CPU layouts, which target="triton" rebuilds in these from
# the canonical codes
DEQUANT_GEMM_FORMATS = ("int8", "int4", "fp8", "w8a8", "fp8_dyn")
CPU_LAYOUT_BASE = {"int8_cpu": "int8", "int4_cpu": "int4", "int4_vnni": "int4", "w8a8_vnni": "w8a8"}


def kernel_template(kind: str, fmt: str | None = None, group_size: int | None = None) -> str | None:
    """The template that computes a fusion group anchored on ``kind`` (None where there is none yet)."""
    if kind == "qlinear" and CPU_LAYOUT_BASE.get(fmt, fmt) in DEQUANT_GEMM_FORMATS:
        return (f"lqc.codegen.qlinear_kernels: the dequant-GEMM ({CPU_LAYOUT_BASE.get(fmt, fmt)}, group size "
                f"{group_size}) with the group's epilogue")
    if kind == "moe_ffn":
        return "lqc.codegen.moe_gemm: grouped GEMM over tokens permuted by expert"
    if kind == "kv_attention":
        return "lqc.codegen.kv_decode: flash decoding over the compressed cache"
    return None


def dot_input_precision() -> str:
    """``tl.dot``'s ``input_precision`` for float32 operands, following torch's float32 matmul
    setting at the time of the call (the launchers read it at every launch):

    - ``"tf32"`` where the user allowed TF32: ``torch.backends.cuda.matmul.allow_tf32 = True``,
      ``torch.set_float32_matmul_precision("high")`` or ``("medium")``, or (torch >= 2.9's API)
      ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` (or the global
      ``torch.backends.fp32_precision``, which it inherits);
    - ``"ieee"`` otherwise: full float32 products, as torch's default ("highest") computes a
      float32 matmul and as the kernels' reference (``qlinear_reference``) does.

    Only float32 operands are affected: bf16 / fp16 / int8 operands multiply in their own type.
    The Triton interpreter ignores it (its dot is numpy's, in float32).
    """
    matmul = torch.backends.cuda.matmul
    # The newer API reflects the legacy calls too (allow_tf32 / set_float32_matmul_precision set it);
    # "none" means nothing was set. Reading the legacy flags after the new API was used raises.
    new = getattr(matmul, "fp32_precision", "none")
    if new != "none":
        return "tf32" if new == "tf32" else "ieee"
    try:
        allowed = bool(matmul.allow_tf32) or torch.get_float32_matmul_precision() in ("high", "medium")
    except RuntimeError:
        return "ieee"
    return "tf32" if allowed else "ieee"
