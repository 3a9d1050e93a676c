"""Statistics of the inputs of linear layers on calibration data, for GPTQ and AWQ.

One interpreted run of the (uncompressed) graph over the calibration windows records, for every
watched node (the input of one or more linears):

- ``hessian``: X^T X summed over tokens (GPTQ's second-order information), float64;
- ``abs_mean``: mean |x| per input channel (AWQ's activation salience);
- ``abs_max``: max |x| per input channel (SmoothQuant's outlier measure);
- ``samples``: a fixed random subset of token rows (AWQ's scale and clipping searches).

No model-specific hooks: the graph itself is run with torch.fx's Interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from lqc.ir import Graph

from lqc.passes.numerics import clone_inputs


@dataclass
class InputStats:
    width: int
    max_samples: int
    want_hessian: bool = True
    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    count: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)
    _kept: int = 0
    _averaged: bool = False

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        assert not self._averaged, "InputStats.add after mean_hessian: the sums were divided in place"
        rows = x.detach().reshape(-1, self.width).to(torch.float32)
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.width, dtype=torch.float64)
            self.abs_max = torch.zeros(self.width, dtype=torch.float32)
            if self.want_hessian:
                self.hessian = torch.zeros(self.width, self.width, dtype=torch.float64)
        if self.want_hessian:
            self.hessian += (rows.T @ rows).to(torch.float64)
        self.abs_sum += rows.abs().sum(dim=0).to(torch.float64)
        self.abs_max = torch.maximum(self.abs_max, rows.abs().amax(dim=0))
        self.count += rows.shape[0]
        room = self.max_samples - self._kept
        if room > 0:
            take = torch.randperm(rows.shape[0], generator=generator)[:room]
            self.samples.append(rows[take].clone())
            self._kept += len(take)

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).to(torch.float32)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.width)

    @property
    def mean_hessian(self) -> torch.Tensor:
        """X^T X / tokens, float64: the sums divided in place, once (a second K x K copy per linear
        is ~1 GB on SmolLM2, and fresh memory is slow to touch in a VM: 11 s of EoRA's 45)."""
        if not self._averaged:
            self.hessian /= max(self.count, 1)
            self._averaged = True
        return self.hessian


class _AllRecorded(Exception):
    """Raised after the last watched node: what follows it (on a language model, the final norm
    and the lm_head, a fifth of the forward's work) would be computed for nothing."""


class _Recorder(fx.Interpreter):
    def __init__(self, graph: Graph, watched: dict[fx.Node, InputStats], generator: torch.Generator):
        super().__init__(graph.gm, garbage_collect_values=True)
        self.watched = watched
        self.generator = generator
        order = {node: i for i, node in enumerate(graph.gm.graph.nodes)}
        self.last = max(watched, key=order.__getitem__) if watched else None

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        stats = self.watched.get(node)
        if stats is not None:
            stats.add(result, self.generator)
        if node is self.last:
            raise _AllRecorded
        return result


@torch.no_grad()
def collect_input_stats(
    graph: Graph,
    inputs: Sequence[tuple],
    nodes: Sequence[fx.Node],
    *,
    max_samples: int = 512,
    want_hessian: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, InputStats]:
    """Statistics of the values of ``nodes`` (by node name) over every input set in ``inputs``."""
    watched = {}
    for node in dict.fromkeys(nodes):
        width = node.meta["val"].shape[-1]
        watched[node] = InputStats(int(width), max_samples, want_hessian)
    generator = torch.Generator().manual_seed(seed)
    recorder = _Recorder(graph, watched, generator)
    for args in tqdm(inputs, desc="calibration", disable=not progress, leave=False):
        try:
            recorder.run(*clone_inputs(args))
        except _AllRecorded:
            pass
    return {node.name: stats for node, stats in watched.items()}
