"""Lowering: the passes that turn a compressed graph into what a target runs.

They run after the recipe, in the same pass manager (verify-each, provenance, snapshots: lqc.viz
shows them as more steps on the timeline), on a copy of the compressed graph, so the graph the
recipe produced stays canonical (``lqc.save`` writes it). They are not recipe entries: the
target picks them.

- ``eager`` / ``inductor``: ``pack_cpu_layouts`` (lqc.passes.lowering): quantized linears on CPU
  weights move to torch's packed CPU matmul layouts where the quantize pass asked for kernels.
- ``triton``: ``lower_triton``: fusion groups become calls to generated Triton kernels
  (lqc.codegen.triton_target.lower_to_triton).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lqc.codegen.triton_target import check_triton_runs_here, lower_to_triton
from lqc.ir import Graph
from lqc.passes import Pass, PassContext, PassResult
from lqc.passes.lowering import PackCpuLayouts


class LowerTriton(Pass):
    """Fusion groups -> ``lqc::fused_qlinear`` / ``lqc::moe_ffn_grouped`` calls on generated kernels.
    Its details are the ``Lowering`` (kernels, the nodes each fused call replaced, the groups as
    partitioned, what was left and why) that ``TritonProgram`` and lqc.viz read."""

    name = "lower_triton"
    stage = "lowering"
    description = "fusion groups to generated Triton kernels (target triton)"

    def __init__(self, debug_dir: str | Path | None = None, autotune: bool = False):
        super().__init__()
        self.debug_dir = debug_dir
        self.autotune = autotune

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        lowering = lower_to_triton(graph, self.debug_dir, autotune=self.autotune)
        return PassResult(matches=len(lowering.fused_nodes), details=lowering,
                          message=f"{len(lowering.kernels)} generated kernels, {len(lowering.fused_nodes)} fused calls")


def lowering_passes(target: str, example_inputs: Sequence[Any], debug_dir: str | Path | None = None,
                    autotune: bool | None = None) -> list[Pass]:
    """The lowering of ``target`` ("eager", "inductor" or "triton") for a graph with these inputs."""
    if target == "triton":
        on_cpu = check_triton_runs_here(example_inputs)
        return [LowerTriton(debug_dir, autotune=not on_cpu if autotune is None else autotune)]
    return [PackCpuLayouts()]
