"""Choosing what ``drop_layers`` drops by what dropping it does to the model's predictions.

Greedy, one unit at a time (BlockPruner, Zhong et al. 2024; EvoPress, Sieberling et al. 2024, do
the same search with perplexity): every round runs the model with the units chosen so far
dropped (and compensated), then, for each remaining candidate, the model with that candidate
dropped too, and keeps the one whose next-token distributions move least from the undropped
model's: the mean KL(p_float || p_dropped) per calibration token. Nothing is excluded up front;
the first and last blocks are chosen when their KL says so.

What makes it affordable (SmolLM2-135M, 30 blocks, 2 threads): the graph is never edited while
choosing. An fx interpreter runs it with the dropped units' residual adds overridden
(``h_out = h_in + c(x)``), and records, once per round, the values live at each candidate's
first node; a candidate's run starts there, so it costs only the blocks from the candidate on
(and the lm_head). The candidates re-scored each round can be limited to the ``candidates`` best
by the cheap cosine score (cos(h_in, h_out) of the unit, taken on the same run).

A unit's compensation (lqc.passes.structural.drop_compensation) is fitted on activations of the
model with the units chosen before it already dropped and compensated, on calibration windows
apart from the windows the KL is scored on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx
from tqdm.auto import tqdm

from lqc.ir import Graph, op_name
from lqc.ir.ops import LINEAR_OPS

from lqc.passes.numerics import clone_inputs
from lqc.passes.structural.drop_compensation import Compensation, Statistics
from lqc.passes.structural.layer_importance import BlockBoundary, sublayer_nodes


@dataclass(eq=False)
class Unit:
    """What one drop removes, as graph nodes: the residual ``adds`` it takes out of the stream (the
    first one, ``slot``, receives the compensation), the stream value before it, its normed input
    (None when it has no single one), and ``end``, the stream value right after it."""

    kind: str  # "attention", "mlp", "block"
    blocks: tuple[int, ...]  # positions in the boundaries
    adds: list[fx.Node]
    streams: list[fx.Node]  # each add's stream operand
    stream: fx.Node
    normed: fx.Node | None
    end: fx.Node
    module: str  # module path the compensation is named after

    @property
    def slot(self) -> fx.Node:
        return self.adds[0]


def make_unit(boundaries: list[BlockBoundary], kind: str, blocks: Sequence[int]) -> Unit:
    """The unit of ``kind`` ("attention", "mlp", or "block" for one or more consecutive blocks)."""
    first, last = boundaries[blocks[0]], boundaries[blocks[-1]]
    if kind == "mlp":
        pairs, region, end = [(first.ffn_add, first.h_mid)], first.ffn_region, first.ffn_add
    elif kind == "attention":
        pairs, region, end = [(first.attn_add, first.h_in)], first.attn_region, first.attn_add
    else:
        pairs = [p for i in blocks for p in ((boundaries[i].attn_add, boundaries[i].h_in), (boundaries[i].ffn_add, boundaries[i].h_mid))]
        region, end = first.attn_region, last.ffn_add
    if any(add is None for add, _ in pairs):
        raise ValueError(f"{kind} of blocks {[boundaries[i].block for i in blocks]} is already dropped")
    adds, streams = [a for a, _ in pairs], [s for _, s in pairs]
    return Unit(kind, tuple(blocks), adds, streams, streams[0], _norm_output(streams[0], adds[0], region), end, region.path)


def _norm_output(stream: fx.Node, add: fx.Node, region) -> fx.Node | None:
    """The node of the sublayer's pre-norm that the sublayer reads (None unless exactly one)."""
    nodes = sublayer_nodes(stream, add, region)
    outputs = [
        n for n in nodes
        if (r := n.meta.get("lqc_region")) is not None and r.kind == "norm"
        and any((u.meta.get("lqc_region") is not None and u.meta["lqc_region"].kind == region.kind) for u in n.users)
    ]
    return outputs[0] if len(outputs) == 1 else None


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


class StreamRunner(fx.Interpreter):
    """Runs a graph with some units dropped, from any node on, up to ``stop``.

    ``applied`` maps each dropped unit to its compensation (None: dropped outright) and the input
    it reads ("stream" or "normed"). ``watch``: nodes whose values to keep; ``snapshot_at``: node
    indices at which to keep everything the rest of the graph reads (to start a later run there).
    """

    def __init__(self, graph: Graph, stop: fx.Node | None):
        super().__init__(graph.gm, garbage_collect_values=True)
        self.nodes = list(graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.stop = stop
        self._live: dict[int, list[fx.Node]] = {}

    def live(self, start: int) -> list[fx.Node]:
        """Nodes before index ``start`` that nodes from ``start`` on read (the output aside: only
        what leads to ``stop`` matters, and KV states go to the output only)."""
        if start not in self._live:
            self._live[start] = [
                n for n in self.nodes[:start] if any(self.order[u] >= start and u.op != "output" for u in n.users)
            ]
        return self._live[start]

    @torch.no_grad()
    def run_from(self, args, applied: dict, *, start: int = 0, env: dict | None = None,
                 watch: set[fx.Node] = frozenset(), snapshot_at: Sequence[int] = ()) -> tuple[torch.Tensor, dict, dict]:
        """(the value of ``stop``, watched values, snapshots by index)."""
        self._overrides = {}  # residual add -> (its stream operand, compensation, compensation's input)
        for unit, (compensation, source) in applied.items():
            x = unit.stream if source == "stream" or unit.normed is None else unit.normed
            for j, (add, stream) in enumerate(zip(unit.adds, unit.streams)):
                self._overrides[add] = (stream, compensation, x) if j == 0 else (stream, None, None)
        self._keep = {n: None for o in self._overrides.values() for n in o if isinstance(n, fx.Node)}
        self._keep.update({w: None for w in watch})
        self._kept: dict = {}
        self._snapshot_at = {i: None for i in snapshot_at}
        self._snapshots: dict[int, dict] = {}
        self._start = start
        try:
            self.run(*clone_inputs(args), initial_env=dict(env or {}), enable_io_processing=False)
        except _Stop as stop:
            return stop.value, {n: self._kept[n] for n in watch if n in self._kept}, self._snapshots
        raise RuntimeError("the stop node was never reached")

    def run_node(self, node: fx.Node):
        i = self.order[node]
        if i < self._start:
            return None
        if i in self._snapshot_at:
            self._snapshots[i] = {n: self.env[n] for n in self.live(i)}
        if node in self._overrides:
            stream_node, compensation, x = self._overrides[node]
            stream = self._value(stream_node)
            result = stream if compensation is None else stream + compensation(self._value(x))
        else:
            result = super().run_node(node)
        if node in self._keep:
            self._kept[node] = result
        if node is self.stop:
            raise _Stop(result)
        return result

    def _value(self, node: fx.Node):
        return self._kept[node] if node in self._kept else self.env[node]


def kl_per_token(logits: torch.Tensor, reference_logp: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of KL(p_ref || p), tokens) for logits [..., V] against log-probs [..., V]."""
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1)
    ref = reference_logp.reshape(-1, reference_logp.shape[-1])
    return float((ref.exp() * (ref - logp)).sum(-1).double().sum()), ref.shape[0]


def cosine_sum(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.reshape(-1, a.shape[-1]).double()
    b = b.reshape(-1, b.shape[-1]).double()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1).sum())


@dataclass
class Fitter:
    kind: str  # compensation kind, "none" for no compensation
    source: str  # "stream" or "normed"
    ridge: float
    rank: int

    def source_node(self, unit: Unit) -> fx.Node:
        return unit.stream if self.source == "stream" or unit.normed is None else unit.normed

    def statistics(self, runner: StreamRunner, windows, applied: dict, units: list[Unit], progress: bool) -> dict:
        """Per unit, its Statistics over ``windows`` with ``applied`` dropped (units must not be in it)."""
        stats = {u.slot: Statistics(self.kind) for u in units}
        watch = {n for u in units for n in (self.source_node(u), u.stream, u.end)}
        last = max(units, key=lambda u: runner.order[u.end]).end
        runner.stop, saved = last, runner.stop
        try:
            for args in tqdm(windows, desc="drop statistics", disable=not progress, leave=False):
                _, values, _ = runner.run_from(args, applied, watch=watch)
                for u in units:
                    stats[u.slot].add(values[self.source_node(u)], values[u.end] - values[u.stream])
        finally:
            runner.stop = saved
        return stats

    def fit(self, stats: Statistics) -> Compensation:
        return stats.fit(self.ridge, self.rank)


def fit_in_order(runner: StreamRunner, fitter: Fitter, units: list[Unit], windows, progress: bool) -> dict:
    """Unit -> (compensation, source), each fitted with the units before it in ``units`` applied.

    Units in graph order are fitted in one sweep: each window runs from where the previous unit's
    run left it (the values live there, kept) to the next unit's end, so all of them together cost
    about one forward of the windows."""
    applied: dict = {}
    if fitter.kind == "none":
        return {unit: (None, fitter.source) for unit in units}
    starts = [runner.order[u.stream] + 1 for u in units]
    in_order = all(starts[k] > runner.order[units[k - 1].end] for k in range(1, len(units)))
    envs: list[dict | None] = [None] * len(windows)
    start = 0
    saved = runner.stop
    try:
        for k, unit in enumerate(tqdm(units, desc="drop compensation", disable=not progress, leave=False)):
            runner.stop = unit.end
            stats = Statistics(fitter.kind)
            watch = {fitter.source_node(unit), unit.stream, unit.end}
            for w, args in enumerate(windows):
                if in_order:
                    _, values, snaps = runner.run_from(args, applied, start=start, env=envs[w], watch=watch,
                                                       snapshot_at=[starts[k]])
                    envs[w] = snaps[starts[k]]
                else:
                    _, values, _ = runner.run_from(args, applied, watch=watch)
                stats.add(values[fitter.source_node(unit)], values[unit.end] - values[unit.stream])
            start = starts[k]
            applied[unit] = (fitter.fit(stats), fitter.source)
    finally:
        runner.stop = saved
    return applied


def choose_by_kl(
    runner: StreamRunner, candidates: list[Unit], how_many: int, fitter: Fitter, fit_windows, score_windows,
    *, prefilter: int, progress: bool = False, log: Callable[[str], None] | None = None,
) -> tuple[list[Unit], dict, list[dict]]:
    """Greedy choice of ``how_many`` of ``candidates``: (chosen in order, unit -> (compensation,
    source), one score table per round)."""
    reference = []
    for args in score_windows:
        logits, _, _ = runner.run_from(args, {})
        reference.append(torch.log_softmax(logits.float(), dim=-1))
    applied: dict = {}
    chosen: list[Unit] = []
    tables: list[dict] = []
    remaining = list(candidates)
    for _ in range(how_many):
        starts = {u.slot: runner.order[u.stream] + 1 for u in remaining}
        watch = {n for u in remaining for n in (u.stream, u.end)}
        snapshots, cosines = [], {u.slot: 0.0 for u in remaining}
        tokens = 0
        for args in score_windows:
            _, values, snaps = runner.run_from(args, applied, watch=watch, snapshot_at=sorted(set(starts.values())))
            snapshots.append(snaps)
            for u in remaining:
                cosines[u.slot] += cosine_sum(values[u.stream], values[u.end])
            tokens += values[remaining[0].stream][..., 0].numel()
        ranked = sorted(remaining, key=lambda u: (-cosines[u.slot], u.blocks))
        scored = ranked[:prefilter] if prefilter else ranked
        stats = fitter.statistics(runner, fit_windows, applied, scored, progress) if fitter.kind != "none" else {}
        rows = []
        for unit in tqdm(scored, desc=f"drop round {len(chosen) + 1}", disable=not progress, leave=False):
            trial = {**applied, unit: (fitter.fit(stats[unit.slot]) if stats else None, fitter.source)}
            kl = count = 0
            for args, snaps, ref in zip(score_windows, snapshots, reference):
                start = starts[unit.slot]
                logits, _, _ = runner.run_from(args, trial, start=start, env=snaps[start])
                part, n = kl_per_token(logits, ref)
                kl, count = kl + part, count + n
            rows.append({"blocks": list(unit.blocks), "kl": kl / count, "trial": trial[unit]})
        best = min(rows, key=lambda r: (r["kl"], r["blocks"]))
        unit = next(u for u in scored if list(u.blocks) == best["blocks"])
        applied[unit] = best["trial"]
        chosen.append(unit)
        remaining.remove(unit)
        tables.append({"kl": [{"blocks": r["blocks"], "kl": round(r["kl"], 6)} for r in rows],
                       "cosine": [{"blocks": list(u.blocks), "cos": round(cosines[u.slot] / tokens, 6)} for u in ranked]})
        if log:
            log(f"drop_layers round {len(chosen)}: {unit.kind} {list(unit.blocks)} KL {best['kl']:.5f}")
    return chosen, applied, tables


def window_tokens(args: tuple) -> int:
    """Tokens in one calibration window: the elements of its integer token tensor."""
    ids = [a for a in args if isinstance(a, torch.Tensor) and not a.is_floating_point() and a.dim() == 2]
    return max(1, ids[0].numel()) if ids else 1


def logits_node(graph: Graph) -> fx.Node:
    """The lm_head's linear: where a KL run stops."""
    heads = graph.regions_of_kind("lm_head")
    if not heads:
        raise ValueError("needs the model's logits, and this graph has no lm_head")
    names = set(heads[0].nodes)
    nodes = [n for n in graph.nodes if n.name in names and op_name(n) in LINEAR_OPS]
    if not nodes:
        raise ValueError("needs the model's logits, and this graph's lm_head has no linear")
    return nodes[-1]
