"""Target selection: turn a compressed Graph into the function that runs it.

- ``eager``: run the fx GraphModule as is (lqc ops through their reference/ATen implementations).
- ``inductor``: hand the graph to Inductor (``compile_fx``); lqc ops with CPU implementations
  run inside Inductor's code as extern calls.
- ``triton``: generated Triton kernels for the lqc ops' fusion groups. The Triton generator is
  not part of lqc yet; asking for it is an error that names the targets that exist.
- ``auto``: the best target that exists for this graph's device: Inductor today.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError

TARGETS = ("auto", "inductor", "eager", "triton")
AVAILABLE_TARGETS = ("auto", "inductor", "eager")


def resolve_target(target: str) -> str:
    if target not in TARGETS:
        raise LqcConfigError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    if target == "triton":
        raise LqcConfigError(
            "target='triton' needs lqc's Triton code generator, which this version does not have yet; "
            f"use one of {', '.join(AVAILABLE_TARGETS)}"
        )
    return "inductor" if target == "auto" else target


def compile_graph(graph: Graph, target: str, example_inputs: Sequence[Any]) -> Callable:
    """A function of the graph's user inputs that runs it on ``target``."""
    target = resolve_target(target)
    if target == "eager":
        return graph.gm.forward
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(graph.gm, list(example_inputs))
