"""Lowering passes: what turns a compressed graph into the one a target runs. The pipeline runs
them after the recipe, in the same pass manager (verify, provenance, snapshots); they are not
recipe entries."""

from lqc.passes.lowering.cpu_layouts import PackCpuLayouts, PackReport, cpu_layout, packed_layout

__all__ = ["PackCpuLayouts", "PackReport", "cpu_layout", "packed_layout"]
