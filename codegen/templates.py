"""Which lqc ops have a Triton kernel template, and for which formats.

Kept apart from the templates themselves so that code describing a graph (the viz report, the
partitioner's users) can ask without importing triton: a template module must be imported after
TRITON_INTERPRET is set (see dequant_gemm's docstring).
"""

from __future__ import annotations

# lqc.codegen.dequant_gemm: lqc::qlinear with these weight formats (w8a8 / fp8_dyn quantizing x per
# token in the kernel), and the packed CPU layouts, which target="triton" rebuilds in these from
# the canonical codes
DEQUANT_GEMM_FORMATS = ("int8", "int4", "fp8", "w8a8", "fp8_dyn")
CPU_LAYOUT_BASE = {"int8_cpu": "int8", "int4_cpu": "int4"}


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
