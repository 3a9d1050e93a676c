"""Target selection: turn a compressed Graph into the function that runs it.

- ``eager``: run the fx GraphModule as is (lqc ops through their reference/ATen implementations).
- ``inductor``: hand the graph to Inductor (``compile_fx``); lqc ops with CPU implementations
  run inside Inductor's code as extern calls. A static graph of four or more decoder blocks is
  compiled a block at a time, each distinct block once (``codegen.shared_blocks``), unless the
  caller asks for the whole graph (``share_blocks=False``).
- ``triton``: generated Triton kernels for the fusion groups (the lowering pass lower_triton put
  them in the graph: lqc.codegen.triton_target), the rest compiled by Inductor around them; on
  CPU under ``TRITON_INTERPRET=1`` only (for checking).
- ``auto``: the best target that exists for this graph's device: Inductor today.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError

TARGETS = ("auto", "inductor", "eager", "triton")


def resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise LqcConfigError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    return "inductor" if target == "auto" else target


def compile_graph(graph: Graph, target: str, example_inputs: Sequence[Any], lowering: Any = None,
                  inductor: bool = True, share_blocks: bool = True, cpp_wrapper: bool = False) -> Callable:
    """A function of the graph's user inputs that runs the lowered ``graph`` on ``target``.
    ``lowering``: at target triton, what its lowering pass did (triton_target.Lowering);
    ``inductor=False``: at target triton, the nodes outside the kernels run eagerly instead of
    through Inductor. ``cpp_wrapper``: Inductor's C++ wrapper (no Python between kernels)."""
    target = resolve_target(target)
    if target == "eager":
        return graph.gm.forward
    if target == "triton":
        from .triton_target import TritonProgram

        if lowering is None:
            raise LqcConfigError(f"{graph.name}: target='triton' runs a graph its lowering pass (lower_triton) rewrote; "
                                 f"this one was not lowered")
        return TritonProgram(graph.gm, lowering, example_inputs, inductor=inductor)
    from torch._inductor.compile_fx import compile_fx as inductor_compile

    from .cpu_decompositions import inductor_config_patches, inductor_decompositions, use_cpu_kernel_ops

    use_cpu_kernel_ops(graph.gm)
    compile_fx = functools.partial(inductor_compile, decompositions=inductor_decompositions(),
                                   config_patches=inductor_config_patches(cpp_wrapper))
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
