"""Calibration statistics collected in graph order, each linear's on the outputs of the layers
already quantized before it (GPTQ's sequential mode, "true-sequential" in AutoGPTQ).

Plain collection (activation_stats) runs the float graph once, so every layer's GPTQ compensates
for its own rounding only; the errors of the layers before it reach the output uncorrected. Here
the linears are quantized in the order of their inputs in the graph: the statistics of input x
are recorded with every linear before x already running on its quantized weight, so each layer's
GPTQ also absorbs what the quantized prefix changed.

It costs one forward, like plain collection: for each calibration window the interpreter keeps
its live values and resumes where it stopped, so every node runs exactly once. Every linear
before input x consumes an input that comes before x, whose layer was quantized when x's turn
came; the live values at x therefore depend on quantized layers only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from lqc.ir import Graph
from lqc.ir.linear import LinearSite
from lqc.passes.numerics import clone_inputs
from lqc.passes.quantization.activation_stats import InputStats


class SequentialInputStats:
    """``stats(site)``: the statistics of ``site.x``, collected on first request. Requests come
    in graph order of the inputs; ``quantized(site, weight)`` must have been told the weight of
    every linear whose input comes before."""

    def __init__(self, graph: Graph, inputs: Callable[[], Sequence[tuple]], sites: Sequence[LinearSite], *,
                 max_samples: int = 0, want_hessian: bool = True, progress: bool = True, seed: int = 0):
        self.graph = graph
        self.nodes = list(graph.gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        self.max_samples, self.want_hessian = max_samples, want_hessian
        self.generator = torch.Generator().manual_seed(seed)
        # garbage_collect_values: fx computes which values each node reads last (user_to_last_uses);
        # the loop below drops them itself, since it runs the nodes in pieces
        self.interpreter = fx.Interpreter(graph.gm, garbage_collect_values=True)
        self.replaced: dict[fx.Node, tuple[fx.Node, torch.Tensor]] = {}  # linear -> (weight node, weight as stored)
        self.inputs = inputs  # called on the first request: a model whose layers are all cached needs none
        self.envs: list[dict] | None = None  # per window: the live values before node self.next
        self.next = 0
        self.recorded: dict[fx.Node, InputStats] = {}
        self.total, self.progress, self.bar = len({s.x for s in sites}), progress, None
        self.last = max((self.position[s.x] for s in sites), default=-1)

    def order(self, sites: Sequence[LinearSite]) -> list[LinearSite]:
        """``sites`` in the order their statistics can be collected: by input position."""
        return sorted(sites, key=lambda site: self.position[site.x])

    def quantized(self, site: LinearSite, weight: torch.Tensor) -> None:
        """From now on ``site`` runs on ``weight`` ([out, in], dequantized)."""
        stored = self.graph.constant(site.weight)
        weight = weight.T if site.transposed else weight
        self.replaced[site.node] = (site.weight, weight.to(stored.dtype).contiguous())

    def __call__(self, site: LinearSite) -> InputStats:
        if site.x in self.recorded:
            return self.recorded[site.x]
        target = self.position[site.x]
        if target < self.next:
            raise RuntimeError(f"sequential statistics: {site.x.name} was asked for after the graph ran past it")
        if self.envs is None:
            self.envs = [self._placeholders(args) for args in self.inputs()]
            self.bar = tqdm(total=self.total, desc="sequential calibration", disable=not self.progress, leave=False)
        stats = InputStats(int(site.x.meta["val"].shape[-1]), self.max_samples, self.want_hessian)
        with torch.no_grad():
            for env in self.envs:
                self._run(env, self.next, target)
                stats.add(env[site.x], self.generator)
        self.next = target + 1
        self.recorded = {site.x: stats}  # earlier inputs are done with: free their Hessians
        self.bar.update(1)
        if target == self.last:  # no input after this one: the windows' values are done with
            self.bar.close()
            self.envs = []
        return stats

    def _placeholders(self, args: tuple) -> dict:
        """A window's env holding its inputs (fx's placeholder handling: defaults, missing ones)."""
        env = self.interpreter.env = {}
        self.interpreter.args_iter = iter(clone_inputs(args))
        for node in self.nodes:
            if node.op == "placeholder":
                env[node] = self.interpreter.run_node(node)
        return env

    def _run(self, env: dict, start: int, stop: int) -> None:
        """Run nodes start..stop (inclusive) on ``env``, dropping values no later node reads."""
        self.interpreter.env = env
        for node in self.nodes[start : stop + 1]:
            if node.op in ("placeholder", "output"):
                continue
            replaced = self.replaced.get(node)
            if replaced is None:
                env[node] = self.interpreter.run_node(node)
            else:  # the quantized weight stands in for the float one, for this node only
                weight_node, weight = replaced
                original, env[weight_node] = env[weight_node], weight
                env[node] = self.interpreter.run_node(node)
                env[weight_node] = original
            for dead in self.interpreter.user_to_last_uses.get(node, ()):
                env.pop(dead, None)

