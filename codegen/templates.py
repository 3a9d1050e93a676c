"""Which lqc ops have a Triton kernel template, and for which formats.

Kept apart from the templates themselves so that code describing a graph (the viz report, the
partitioner's users) can ask without importing triton: a template module must be imported after
TRITON_INTERPRET is set (see dequant_gemm's docstring).
"""

from __future__ import annotations

# lqc.codegen.dequant_gemm: lqc::qlinear with these weight formats
DEQUANT_GEMM_FORMATS = ("int8", "int4")


def kernel_template(kind: str, fmt: str | None = None, group_size: int | None = None) -> str | None:
    """The template that computes a fusion group anchored on ``kind`` (None where there is none yet)."""
    if kind == "qlinear" and fmt in DEQUANT_GEMM_FORMATS:
        return f"lqc.codegen.dequant_gemm ({fmt}, group size {group_size})"
    return None
