"""A hand-built lqc Graph from a small module, for tests of matchers and partitioning."""

from __future__ import annotations

import torch
import torch.fx as fx

from lqc.ir import Graph
from lqc.ir.graph import GraphInput
from lqc.ir.shapes import propagate_shapes


def graph_of(module: torch.nn.Module, *examples) -> Graph:
    """``module`` symbolically traced, each placeholder an input with its example, shapes propagated."""
    gm = fx.symbolic_trace(module)
    inputs = [GraphInput(node.name, "", "other", i, example)
              for i, (node, example) in enumerate(zip(gm.graph.find_nodes(op="placeholder"), examples))]
    graph = Graph(gm=gm, inputs=inputs)
    propagate_shapes(graph)
    return graph
