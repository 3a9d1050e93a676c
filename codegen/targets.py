"""Target selection: turn a compressed Graph into the function that runs it.

- ``eager``: run the fx GraphModule as is (lqc ops through their reference/ATen implementations).
- ``inductor``: hand the graph to Inductor (``compile_fx``); lqc ops with CPU implementations
  run inside Inductor's code as extern calls. A static graph of four or more decoder blocks is
  compiled a block at a time, each distinct block once (``codegen.shared_blocks``), unless the
  caller asks for the whole graph (``share_blocks=False``).
- ``triton``: generated Triton kernels for the fusion groups (lqc.codegen.triton_target), the
  rest of the graph compiled by Inductor around them; on CPU under ``TRITON_INTERPRET=1`` only
  (for checking).
- ``auto``: the best target that exists for this graph's device: Inductor today.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError

TARGETS = ("auto", "inductor", "eager", "triton")


def resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise LqcConfigError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    return "inductor" if target == "auto" else target


def compile_graph(graph: Graph, target: str, example_inputs: Sequence[Any], debug_dir: str | Path | None = None,
                  autotune: bool | None = None, inductor: bool = True, share_blocks: bool = True) -> Callable:
    """A function of the graph's user inputs that runs it on ``target``. ``debug_dir``: where
    target="triton" writes its kernels' sources; ``autotune``: whether its kernels tune their
    launch configs (None: on a GPU, not under the interpreter); ``inductor=False``: at target
    triton, the nodes outside the kernels run eagerly instead of through Inductor."""
    target = resolve_target(target)
    if target == "eager":
        return graph.gm.forward
    if target == "triton":
        from .triton_target import TritonProgram, check_triton_runs_here, lower_to_triton

        on_cpu = check_triton_runs_here(example_inputs)
        lowered = graph.copy()  # the compressed graph itself stays as the passes left it (lqc.save reads it)
        lowering = lower_to_triton(lowered, debug_dir, autotune=not on_cpu if autotune is None else autotune)
        return TritonProgram(lowered.gm, lowering, example_inputs, inductor=inductor)
    from torch._inductor.compile_fx import compile_fx

    if share_blocks:
        from .shared_blocks import compile_shared_blocks

        program = compile_shared_blocks(graph, example_inputs, compile_fx)
        if program is not None:
            return program
    _mark_example_values(graph)
    return compile_fx(graph.gm, list(example_inputs))


def _mark_example_values(graph: Graph) -> None:
    """Give every node dynamo's ``example_value`` (our shape propagation's ``val``). AOTAutograd's
    cache only accepts a method call on a node it knows is a tensor, and it knows that from this
    field, which the nodes our passes create lack: without it a repeat compile re-traces the whole
    graph instead of loading it (SmolLM2's prefill graph with Inductor's cache warm: 27 s -> 13 s)."""
    for node in graph.gm.graph.nodes:
        if "val" in node.meta and "example_value" not in node.meta:
            node.meta["example_value"] = node.meta["val"]
