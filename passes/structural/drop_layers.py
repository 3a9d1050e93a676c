"""``drop_layers``: remove whole attention sublayers, FFN sublayers, decoder blocks or a span of
consecutive blocks, chosen by their importance on calibration data (or given explicitly).

Dropping a sublayer is a rewrite of its residual add: ``h_mid = h_in + attention(...)`` becomes
``h_mid = h_in`` (users of the add read its stream operand), and everything that only fed the
add dies: the sublayer's nodes, its pre-norm, its projections and their constants. The model
behaves as if the sublayer returned zeros.

The KV cache: the attention's key/value states also leave the graph, as outputs (dynamic cache:
``cat(past, new)``) or through in-place writes into cache buffers (static: ``index_copy_``). Nobody reads a dropped layer's cache, but HF still sizes it, so its shape
stays: the new states become zeros of the same shape where they meet the cache (the in-place
writes are kept) and the k/v projections die with the rest (when the shape cannot be built from
the stream's sizes, the states are computed as before: the report's ``cache_kept``). A block
the pass cannot rewrite (post-norm, parallel attention and MLP) leaves the model whole, warned.

The choice is greedy by KL (lqc.passes.structural.drop_choice, the default) or by the cosine scores of
lqc.passes.structural.layer_importance; a compensation (lqc.passes.structural.drop_compensation)
makes the add read ``h_in + c(x)`` instead. Both are made once per model and reused for every graph
dynamo captures from it (prefill, decode), so they all drop the same layers the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError

from lqc.passes.base import Pass, PassResult
from lqc.passes.structural.drop_choice import Fitter, StreamRunner, choose_by_kl, fit_in_order, logits_node, make_unit, window_tokens
from lqc.passes.structural.drop_compensation import KINDS, Compensation, insert_compensation
from lqc.passes.structural.drop_rewrite import constant_sizes, cut_cache_writes, eliminate_dead_code, linear_weights
from lqc.passes.structural.layer_importance import (
    BlockBoundary, LayerImportance, find_boundaries, layer_importance, sublayer_nodes,
)
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass


@dataclass
class DropLayersOptions(PassOptions):
    what: Literal["attention", "mlp", "block", "span"] = field(
        default="block", metadata={"help": "what to drop: attention or mlp sublayers, whole blocks, or one span of consecutive blocks"}
    )
    count: int | None = field(default=None, metadata={"help": "how many to drop (span: the span's length)"})
    fraction: float | None = field(default=None, metadata={"help": "how many to drop, as a fraction of the blocks (rounded)"})
    layers: list[int] = field(default_factory=list, metadata={"help": "block indices to drop; no calibration needed"})
    choice: Literal["kl", "cosine"] = field(
        default="kl", metadata={"help": "kl: greedy, by the KL of the dropped model's predictions on calibration tokens; "
                                        "cosine: by the residual stream's cosine scores (one-shot unless iterative)"}
    )
    iterative: bool = field(default=False, metadata={"help": "choice cosine: drop one at a time, re-scoring after each drop"})
    compensation: Literal["none", "bias", "diagonal", "linear"] = field(
        default="none", metadata={"help": "what stands in for a dropped unit, fitted on calibration tokens: nothing, its mean "
                                          "output, a per-channel or a full (rank-limited) ridge-regression linear map"}
    )
    compensation_input: Literal["stream", "normed"] = field(
        default="stream", metadata={"help": "the linear map reads the residual stream or the unit's own normed input"}
    )
    rank: int = field(default=0, metadata={"help": "compensation linear: rank of the map (0: full)"})
    ridge: float = field(default=0.01, metadata={"help": "ridge term, relative to the input's mean variance"})
    candidates: int = field(default=10, metadata={"help": "choice kl: re-score only the best N by cosine each round (0: all)"})
    score_tokens: int = field(default=1024, metadata={"help": "choice kl: calibration tokens the KL is measured on"})
    tokens: int = field(default=4096, metadata={"help": "calibration tokens for the cosine scores and the compensation fit"})


@dataclass
class DropLayersReport:
    what: str  # "attention", "mlp", "block" or "span"
    dropped: list[int]  # block indices
    dropped_paths: list[str]  # their module paths
    scores: list[dict]  # the score tables the blocks were chosen from, one per round (none when given)
    params_removed: int
    bytes_removed: int
    flops_per_token_removed: int
    cache_kept: list[str]  # "<block path> <part>" whose cache states are still computed (no shape to zero them)
    dropped_modules: dict[str, dict]  # module path -> {"kind", "block"}: what a runtime must not run
    dropped_attention_layers: list[int]  # blocks whose attention is gone (their cache is never read)
    compensation: str = "none"
    compensation_params: int = 0  # parameters the compensations add back (not subtracted above)
    order: list[int] = field(default_factory=list)  # block indices in the order they were chosen


@dataclass
class _Removed:
    params: int = 0
    bytes: int = 0
    flops_per_token: int = 0


@dataclass
class _Selection:
    """What the pass chose, independent of any one graph's nodes: block indices per unit in the
    order chosen, their compensations, and the score tables."""

    units: list[tuple[int, ...]]
    compensations: list[Compensation | None]
    scores: list[dict]


@register_pass
class DropLayers(Pass):
    name = "drop_layers"
    description = "drop attention / MLP sublayers, blocks or a span of blocks, chosen by KL or cosine, optionally compensated"
    Options = DropLayersOptions
    requires = frozenset({"calibration"})

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        o = self.options
        given = [name for name in ("count", "fraction", "layers") if getattr(o, name) not in (None, [])]
        if len(given) != 1:
            raise LqcConfigError(
                f"pass 'drop_layers' needs exactly one of count, fraction or layers (got {given or 'none'}): "
                f"e.g. {{'pass': 'drop_layers', 'what': '{o.what}', 'count': 2}}"
            )
        if o.count is not None and o.count < 0:
            raise LqcConfigError(f"pass 'drop_layers': count must be >= 0, got {o.count}")
        if o.fraction is not None and not 0.0 <= o.fraction <= 1.0:
            raise LqcConfigError(f"pass 'drop_layers': fraction must be between 0 and 1, got {o.fraction}")
        if o.iterative and o.what == "span":
            raise LqcConfigError("pass 'drop_layers': a span is dropped in one piece; iterative applies to attention, mlp and block")
        if o.iterative and o.choice == "kl":
            raise LqcConfigError("pass 'drop_layers': choice kl always re-scores after each drop; iterative applies to choice: cosine")
        if o.compensation not in KINDS:
            raise LqcConfigError(f"pass 'drop_layers': compensation {o.compensation!r} is not one of {', '.join(KINDS)}")
        if o.rank < 0 or o.ridge < 0 or o.candidates < 0 or o.score_tokens < 1 or o.tokens < 1:
            raise LqcConfigError("pass 'drop_layers': rank, ridge and candidates must be >= 0, tokens and score_tokens >= 1")
        if o.layers and o.what == "span" and sorted(o.layers) != list(range(min(o.layers), max(o.layers) + 1)):
            raise LqcConfigError(
                f"pass 'drop_layers': span layers {o.layers} are not consecutive; use what: block to drop scattered blocks"
            )

    def requirements(self) -> frozenset[str]:
        # explicit layers need no calibration unless a compensation is fitted: only choosing them does
        return frozenset() if self.options.layers and self.options.compensation == "none" else self.requires

    def run(self, graph: Graph, ctx) -> PassResult:
        try:  # a structure the pass cannot rewrite leaves the model whole, and the user is told why
            boundaries = find_boundaries(graph) or "no decoder block (a list-indexed module holding attention) in it"
        except ValueError as exc:
            boundaries = str(exc)
        if isinstance(boundaries, str):
            warnings.warn(f"lqc drop_layers: {graph.name} keeps every layer: {boundaries}", stacklevel=2)
            return PassResult(message=f"nothing dropped: {boundaries}")
        total = len(boundaries)
        index_of = {b.block: i for i, b in enumerate(boundaries)}
        how_many = self._how_many(total)
        for layer in self.options.layers:
            if layer not in index_of:
                raise LqcConfigError(
                    f"pass 'drop_layers': layer {layer} is out of range: this graph has {total} decoder blocks "
                    f"({min(index_of)}..{max(index_of)}); give layers in that range"
                )
        if self.options.layers and self.options.compensation == "none":
            selection = _Selection(self._explicit_units(index_of), [None] * how_many, [])
        else:
            key = ("selection", how_many, tuple(b.block for b in boundaries))
            # keyed on the blocks' norm and FFN weights: every capture of the model keeps those, while
            # the k/v projections of a dropped attention are dead code in captures whose cache
            # ignores that layer (lqc.runtime.structural.dropped_layers), and cleanup removes them
            constants = sorted(
                {
                    n.target
                    for n in graph.gm.graph.find_nodes(op="get_attr")
                    if graph.fqns(n) and _in_blocks(graph, n, boundaries) and _in_norm_or_ffn(n)
                }
            )
            # once per model: every graph dynamo captures from it (prefill, decode) drops the same layers
            selection = ctx.transform(graph, key, constants, lambda: self._select(graph, boundaries, index_of, how_many, ctx))

        what = self.options.what
        chosen = sorted(boundaries[i].block for unit in selection.units for i in unit)
        keep_norms = set()
        if self.options.compensation_input == "normed":  # the compensation reads its slot's norm
            slot_part = "mlp" if what == "mlp" else "attention"
            keep_norms = {(boundaries[u[0]].block, slot_part) for u, c in zip(selection.units, selection.compensations) if c is not None}
        dropped_modules = _sublayer_modules(graph, [boundaries[index_of[b]] for b in chosen], what, keep_norms)
        units = [(unit, comp) for unit, comp in zip(selection.units, selection.compensations)]
        removed, cache_kept = self._drop(graph, boundaries, units, what)
        added = sum(c.numel for c in selection.compensations if c is not None)
        details = DropLayersReport(
            what=what, dropped=chosen, dropped_paths=[boundaries[index_of[b]].path for b in chosen], scores=selection.scores,
            params_removed=removed.params, bytes_removed=removed.bytes, flops_per_token_removed=removed.flops_per_token,
            cache_kept=cache_kept, dropped_modules=dropped_modules,
            dropped_attention_layers=sorted({m["block"] for m in dropped_modules.values() if m["kind"] == "attention"}),
            compensation=self.options.compensation, compensation_params=added,
            order=[boundaries[unit[0]].block for unit in selection.units],
        )
        message = f"dropped {what} of blocks {chosen}: {removed.params} parameters, {removed.flops_per_token} FLOPs/token"
        if added:
            message += f"; {self.options.compensation} compensation adds {added} parameters back"
        return PassResult(matches=len(chosen), details=details, message=message)

    # -- choosing ----------------------------------------------------------------------------------
    def _how_many(self, total: int) -> int:
        o = self.options
        if o.layers:
            return len(set(o.layers))
        count = o.count if o.count is not None else int(round(o.fraction * total))
        if count > total:
            raise LqcConfigError(
                f"pass 'drop_layers': count {count} is more than the {total} decoder blocks of this graph; give count <= {total}"
            )
        return count

    def _explicit_units(self, index_of: dict[int, int]) -> list[tuple[int, ...]]:
        positions = sorted(index_of[b] for b in set(self.options.layers))
        return [tuple(positions)] if self.options.what == "span" else [(i,) for i in positions]

    def _select(self, graph: Graph, boundaries: list[BlockBoundary], index_of: dict, how_many: int, ctx) -> _Selection:
        """Choose (unless given) and fit compensations, on the calibration inputs."""
        o = self.options
        kind = "block" if o.what == "span" else o.what
        fitter = Fitter(o.compensation, o.compensation_input, o.ridge, o.rank)
        if o.choice == "cosine" or o.layers:
            inputs = ctx.calibration_inputs(graph, tokens=o.tokens)
            if o.layers:
                units, scores = self._explicit_units(index_of), []
            else:
                units, scores = self._choose_by_cosine(graph, boundaries, inputs, how_many, ctx)
            if o.compensation == "none":
                return _Selection(units, [None] * len(units), scores)
            runner = StreamRunner(graph, None)
            fitted = fit_in_order(runner, fitter, [make_unit(boundaries, kind, u) for u in units], inputs, ctx.progress)
            return _Selection(units, [c for c, _ in fitted.values()], scores)
        inputs = ctx.calibration_inputs(graph, tokens=o.tokens + o.score_tokens)
        per_window = window_tokens(inputs[0])
        score_count = min(max(1, -(-o.score_tokens // per_window)), max(1, len(inputs) - 1))
        fit_windows, score_windows = (inputs[:-score_count] or inputs), inputs[-score_count:]
        candidates = self._candidates(boundaries, how_many)
        if not candidates:
            return _Selection([], [], [])
        try:
            stop = logits_node(graph)
        except ValueError as exc:
            raise LqcConfigError(f"pass 'drop_layers': choice kl {exc}; use choice: cosine") from exc
        runner = StreamRunner(graph, stop)
        units = [make_unit(boundaries, kind, c) for c in candidates]
        chosen, applied, tables = choose_by_kl(
            runner, units, 1 if o.what == "span" else how_many, fitter, fit_windows, score_windows,
            prefilter=o.candidates, progress=ctx.progress, log=ctx.log.info,
        )
        return _Selection([u.blocks for u in chosen], [applied[u][0] for u in chosen], tables)

    def _candidates(self, boundaries: list[BlockBoundary], how_many: int) -> list[tuple[int, ...]]:
        selectable = [i for i, b in enumerate(boundaries) if self.selects(b.path)]
        if self.options.what == "span":
            if how_many == 0:
                return []
            starts = [i for i in range(len(boundaries) - how_many + 1) if all(j in selectable for j in range(i, i + how_many))]
            if not starts:
                raise LqcConfigError(f"pass 'drop_layers': no span of {how_many} selectable blocks; lower count or widen targets")
            return [tuple(range(i, i + how_many)) for i in starts]
        if how_many > len(selectable):
            raise LqcConfigError(
                f"pass 'drop_layers': count {how_many} is more than the {len(selectable)} blocks targets/ignore select"
            )
        return [(i,) for i in selectable] if how_many else []

    def _choose_by_cosine(self, graph: Graph, boundaries: list[BlockBoundary], inputs, how_many: int, ctx) -> tuple[list[tuple[int, ...]], list[dict]]:
        """Units (block positions) to drop in the order chosen, and the score tables they were chosen from."""
        what = self.options.what
        selectable = [i for i, b in enumerate(boundaries) if self.selects(b.path)]
        if what == "span":
            importance = layer_importance(graph, inputs, boundaries, progress=ctx.progress)
            table = {"blocks": importance.table(), "spans": _span_table(importance, how_many)}
            if how_many == 0:
                return [], [table]
            starts = [c[0] for c in self._candidates(boundaries, how_many)]
            start = min(starts, key=lambda i: (importance.spans[how_many][i], i))
            return [tuple(range(start, start + how_many))], [table]
        self._candidates(boundaries, how_many)  # checks the count against the selectable blocks
        chosen: list[int] = []
        tables: list[dict] = []
        rounds = how_many if self.options.iterative else 1
        # iterative mode edits a copy, one drop per round, and re-scores it
        work = graph.copy() if self.options.iterative else graph
        work_boundaries = find_boundaries(work) if self.options.iterative else boundaries
        for _ in range(rounds):
            importance = layer_importance(work, inputs, work_boundaries, progress=ctx.progress)
            tables.append({"blocks": importance.table()})
            if what == "attention":
                ranked = sorted((i for i in selectable if i not in chosen), key=lambda i: (-importance.attention[i], i))
            elif what == "mlp":
                ranked = sorted((i for i in selectable if i not in chosen), key=lambda i: (-importance.mlp[i], i))
            else:
                ranked = sorted((i for i in selectable if i not in chosen), key=lambda i: (importance.block[i], i))
            take = ranked[:1] if self.options.iterative else sorted(ranked[:how_many])
            chosen.extend(take)
            if self.options.iterative:
                self._drop(work, work_boundaries, [((i,), None) for i in take], what)
        return [(i,) for i in chosen], tables

    # -- rewriting ---------------------------------------------------------------------------------
    def _drop(self, graph: Graph, boundaries: list[BlockBoundary], units: list, what: str) -> tuple[_Removed, list[str]]:
        """Drop ``what`` of each unit ((block positions, compensation or None)), then dead code."""
        before = constant_sizes(graph)
        weights = linear_weights(graph)
        already_dead = {n for n in graph.nodes if not n.users}
        cache_kept = []
        source = self.options.compensation_input
        for positions, compensation in units:
            replacement = None
            if compensation is not None:
                unit = make_unit(boundaries, "block" if what in ("block", "span") else what, positions)
                x = unit.stream if source == "stream" or unit.normed is None else unit.normed
                replacement = insert_compensation(graph, unit.slot, unit.stream, x, compensation, unit.module)
            for i in positions:
                for part in ("attention", "mlp") if what in ("block", "span") else (what,):
                    if not _drop_sublayer(graph, boundaries, i, part, replacement):
                        cache_kept.append(f"{boundaries[i].path} {part}")
                    replacement = None  # the compensation stands in for the unit's first sublayer
        eliminate_dead_code(graph, already_dead)
        graph.prune_constants()
        after = constant_sizes(graph)
        removed = _Removed()
        for key, (numel, nbytes, names) in before.items():
            if key not in after:
                removed.params += numel
                removed.bytes += nbytes
                if names & weights:
                    removed.flops_per_token += 2 * numel
        return removed, cache_kept


def _span_table(importance: LayerImportance, length: int) -> list[dict]:
    if length == 0:
        return []
    return [
        {"start": importance.blocks[i], "length": length, "angular_distance": round(d, 6)}
        for i, d in enumerate(importance.spans[length])
    ]


def _sublayer_modules(graph: Graph, blocks: list[BlockBoundary], what: str, keep_norms: set[tuple[int, str]] = frozenset()) -> dict[str, dict]:
    """Module path -> {kind, block} of the modules that go with the dropped sublayers: the
    attention or FFN module(s) and the norm in front of each (what ``lqc.load`` rebuilds a saved
    model without), except the norms in ``keep_norms`` ((block, part) whose norm feeds a compensation)."""
    modules: dict[str, dict] = {}
    for b in blocks:
        for part in ("attention", "mlp") if what in ("block", "span") else (what,):
            if (b.block, part) in keep_norms:
                modules.update({path: {"kind": "attention" if part == "attention" else "mlp", "block": b.block}
                                for path in (b.attn_region if part == "attention" else b.ffn_region).modules})
                continue
            add = b.attn_add if part == "attention" else b.ffn_add
            region = b.attn_region if part == "attention" else b.ffn_region
            if add is None or region is None:
                continue
            kind = "attention" if part == "attention" else "mlp"
            for path in region.modules:
                modules[path] = {"kind": kind, "block": b.block}
            stream = b.h_in if part == "attention" else b.h_mid
            for node in sublayer_nodes(stream, add, region):
                where = node.meta.get("lqc_region")
                if where is not None and where.kind == "norm":
                    modules[where.path] = {"kind": "norm", "block": b.block}
    return modules


def _in_norm_or_ffn(constant: fx.Node) -> bool:
    return any(
        (region := user.meta.get("lqc_region")) is not None and region.kind in ("norm", "ffn") for user in constant.users
    )


def _in_blocks(graph: Graph, node: fx.Node, boundaries: list[BlockBoundary]) -> bool:
    return any(fqn.startswith(b.path + ".") for fqn in graph.fqns(node) for b in boundaries)


def _drop_sublayer(graph: Graph, boundaries: list[BlockBoundary], i: int, part: str, replacement: fx.Node | None = None) -> bool:
    """Rewire the residual add of ``part`` of block ``i`` to its stream operand (or to
    ``replacement``, the stream plus a compensation) and cut the cache writes it feeds. Returns
    False when some cache write had to keep its real states."""
    b = boundaries[i]
    add = b.attn_add if part == "attention" else b.ffn_add
    if add is None:
        return True  # already dropped
    stream = b.h_in if part == "attention" else b.h_mid
    region = b.attn_region if part == "attention" else b.ffn_region
    tainted = sublayer_nodes(stream, add, region)
    value = stream if replacement is None else replacement
    add.replace_all_uses_with(value)
    graph.gm.graph.erase_node(add)
    if part == "attention":
        b.attn_add, b.attn_replacement = None, replacement
    else:
        b.ffn_add, b.ffn_replacement = None, replacement
    for other in boundaries:
        other.replace(add, value)
    return cut_cache_writes(graph, tainted, stream)



