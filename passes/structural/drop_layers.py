"""``drop_layers``: remove whole attention sublayers, FFN sublayers, decoder blocks or a span of
consecutive blocks, chosen by their importance on calibration data (or given explicitly).

Dropping a sublayer is a rewrite of its residual add: ``h_mid = h_in + attention(...)`` becomes
``h_mid = h_in`` (users of the add read its stream operand), and everything that only fed the
add dies: the sublayer's nodes, its pre-norm, its projections and their constants. The model
behaves as if the sublayer returned zeros.

The KV cache: the attention's key/value states also leave the graph, as outputs (dynamic cache:
``cat(past, new)``) or through in-place writes into cache buffers (static cache:
``index_copy_``). Nobody reads a dropped layer's cache, but HF still sizes and counts it, so its
shape must stay. Where the new states meet the cache (a ``cat`` or an in-place write with a
cache operand) they are replaced by zeros of the same shape, built from the stream's sizes;
the in-place writes themselves are kept. The k/v projections then die with the rest. (When the
shape cannot be built from the stream's sizes, the states are computed as before and the report
lists that layer under ``cache_kept``.)

Scores are those of lqc.passes.structural.layer_importance. The choice is made once per model and reused
for every graph dynamo captures from it (prefill, decode), so they all drop the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.ops import LINEAR_OPS, is_inplace

from lqc.passes.base import Pass, PassResult
from lqc.passes.structural.layer_importance import BlockBoundary, LayerImportance, find_boundaries, layer_importance
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
    iterative: bool = field(default=False, metadata={"help": "drop one at a time, re-scoring after each drop"})
    tokens: int = field(default=4096, metadata={"help": "calibration tokens to score on"})


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


@dataclass
class _Removed:
    params: int = 0
    bytes: int = 0
    flops_per_token: int = 0


@register_pass
class DropLayers(Pass):
    name = "drop_layers"
    description = "drop the least important attention / MLP sublayers, blocks or span of blocks (calibrated)"
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
        if o.layers and o.what == "span" and sorted(o.layers) != list(range(min(o.layers), max(o.layers) + 1)):
            raise LqcConfigError(
                f"pass 'drop_layers': span layers {o.layers} are not consecutive; use what: block to drop scattered blocks"
            )

    def requirements(self) -> frozenset[str]:
        # explicit layers need no calibration: only choosing them does
        return frozenset() if self.options.layers else self.requires

    def run(self, graph: Graph, ctx) -> PassResult:
        try:
            boundaries = find_boundaries(graph)
        except ValueError as exc:
            raise LqcConfigError(f"pass 'drop_layers' cannot drop layers of this graph: {exc}") from exc
        if not boundaries:
            return PassResult(message="no decoder blocks in this graph")
        total = len(boundaries)
        index_of = {b.block: i for i, b in enumerate(boundaries)}
        how_many = self._how_many(total)

        scores: list[dict] = []
        if self.options.layers:
            for layer in self.options.layers:
                if layer not in index_of:
                    raise LqcConfigError(
                        f"pass 'drop_layers': layer {layer} is out of range: this graph has {total} decoder blocks "
                        f"({min(index_of)}..{max(index_of)}); give layers in that range"
                    )
            chosen = sorted(set(self.options.layers))
        else:
            key = ("selection", self.options.what, how_many, self.options.iterative, tuple(b.block for b in boundaries))
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

            def choose():
                inputs = ctx.calibration_inputs(graph, tokens=self.options.tokens)
                return self._choose(graph, boundaries, inputs, how_many, ctx)

            # once per model: every graph dynamo captures from it (prefill, decode) drops the same layers
            chosen, scores = ctx.transform(graph, key, constants, choose)
            chosen = list(chosen)

        dropped_modules = _sublayer_modules(graph, [boundaries[index_of[b]] for b in chosen], self.options.what)
        removed, cache_kept = self._drop(graph, boundaries, [index_of[b] for b in chosen], self.options.what)
        dropped_paths = [boundaries[index_of[b]].path for b in chosen]
        details = DropLayersReport(
            what=self.options.what, dropped=chosen, dropped_paths=dropped_paths, scores=scores,
            params_removed=removed.params, bytes_removed=removed.bytes, flops_per_token_removed=removed.flops_per_token,
            cache_kept=cache_kept, dropped_modules=dropped_modules,
            dropped_attention_layers=sorted({m["block"] for m in dropped_modules.values() if m["kind"] == "attention"}),
        )
        message = f"dropped {self.options.what} of blocks {chosen}: {removed.params} parameters, {removed.flops_per_token} FLOPs/token"
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

    def _choose(self, graph: Graph, boundaries: list[BlockBoundary], inputs, how_many: int, ctx) -> tuple[list[int], list[dict]]:
        """Block indices to drop, and the score tables they were chosen from (one per round)."""
        what = self.options.what
        selectable = [i for i, b in enumerate(boundaries) if self.selects(b.path)]
        if what == "span":
            importance = layer_importance(graph, inputs, boundaries, progress=ctx.progress)
            table = {"blocks": importance.table(), "spans": _span_table(importance, how_many)}
            if how_many == 0:
                return [], [table]
            starts = [
                i for i in range(len(boundaries) - how_many + 1) if all(j in selectable for j in range(i, i + how_many))
            ]
            if not starts:
                raise LqcConfigError(f"pass 'drop_layers': no span of {how_many} selectable blocks; lower count or widen targets")
            start = min(starts, key=lambda i: (importance.spans[how_many][i], i))
            return [boundaries[i].block for i in range(start, start + how_many)], [table]

        if how_many > len(selectable):
            raise LqcConfigError(
                f"pass 'drop_layers': count {how_many} is more than the {len(selectable)} blocks targets/ignore select"
            )
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
            take = ranked[:1] if self.options.iterative else ranked[:how_many]
            chosen.extend(take)
            if self.options.iterative:
                self._drop(work, work_boundaries, take, what)
        return sorted(boundaries[i].block for i in chosen), tables

    # -- rewriting ---------------------------------------------------------------------------------
    def _drop(self, graph: Graph, boundaries: list[BlockBoundary], indices: list[int], what: str) -> tuple[_Removed, list[str]]:
        """Drop ``what`` of the blocks at ``indices`` (positions in ``boundaries``), then dead code."""
        before = _constant_sizes(graph)
        linear_weights = _linear_weights(graph)
        already_dead = {n for n in graph.nodes if not n.users}
        cache_kept = []
        for i in indices:
            parts = ("attention", "mlp") if what in ("block", "span") else (what,)
            for part in parts:
                if not _drop_sublayer(graph, boundaries, i, part):
                    cache_kept.append(f"{boundaries[i].path} {part}")
        _eliminate_dead_code(graph, already_dead)
        graph.prune_constants()
        after = _constant_sizes(graph)
        removed = _Removed()
        for key, (numel, nbytes, names) in before.items():
            if key not in after:
                removed.params += numel
                removed.bytes += nbytes
                if names & linear_weights:
                    removed.flops_per_token += 2 * numel
        return removed, cache_kept


def _span_table(importance: LayerImportance, length: int) -> list[dict]:
    if length == 0:
        return []
    return [
        {"start": importance.blocks[i], "length": length, "angular_distance": round(d, 6)}
        for i, d in enumerate(importance.spans[length])
    ]


def _sublayer_modules(graph: Graph, blocks: list[BlockBoundary], what: str) -> dict[str, dict]:
    """Module path -> {kind, block} of the modules that go with the dropped sublayers: the
    attention or FFN module(s) and the norm in front of each (what ``lqc.load`` rebuilds a saved
    model without)."""
    modules: dict[str, dict] = {}
    for b in blocks:
        for part in ("attention", "mlp") if what in ("block", "span") else (what,):
            add = b.attn_add if part == "attention" else b.ffn_add
            region = b.attn_region if part == "attention" else b.ffn_region
            if add is None or region is None:
                continue
            kind = "attention" if part == "attention" else "mlp"
            for path in region.modules:
                modules[path] = {"kind": kind, "block": b.block}
            stream = b.h_in if part == "attention" else b.h_mid
            for node in _sublayer_nodes(stream, add, region):
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


def _drop_sublayer(graph: Graph, boundaries: list[BlockBoundary], i: int, part: str) -> bool:
    """Rewire the residual add of ``part`` of block ``i`` to its stream operand and cut the cache
    writes it feeds. Returns False when some cache write had to keep its real states."""
    b = boundaries[i]
    add = b.attn_add if part == "attention" else b.ffn_add
    if add is None:
        return True  # already dropped
    stream = b.h_in if part == "attention" else b.h_mid
    region = b.attn_region if part == "attention" else b.ffn_region
    tainted = _sublayer_nodes(stream, add, region)
    add.replace_all_uses_with(stream)
    graph.gm.graph.erase_node(add)
    if part == "attention":
        b.attn_add = None
    else:
        b.ffn_add = None
    for other in boundaries:
        other.replace(add, stream)
    return _cut_cache_writes(graph, tainted, stream)


def _sublayer_nodes(stream: fx.Node, add: fx.Node, region) -> set[fx.Node]:
    """Nodes computed from ``stream`` inside the sublayer (its region and its block's norms),
    other than through the residual ``add``."""
    kind = region.kind
    tainted: set[fx.Node] = set()
    frontier = [u for u in stream.users if u is not add]
    while frontier:
        node = frontier.pop()
        if node in tainted or node.op == "output":
            continue
        where = node.meta.get("lqc_region")
        if where is None or where.block != region.block or where.kind not in (kind, "norm"):
            continue
        tainted.add(node)
        frontier.extend(node.users)
    return tainted


def _cut_cache_writes(graph: Graph, tainted: set[fx.Node], stream: fx.Node) -> bool:
    """Where the sublayer's values meet a cache (a ``cat`` or an in-place write that also has an
    operand not computed by the sublayer), put zeros of the same shape in their place."""
    complete = True
    for node in [n for n in graph.nodes if n in tainted]:
        if op_name(node) != "cat" and not is_inplace(node):
            continue
        operands = list(node.args[0]) if op_name(node) == "cat" else list(node.args)
        tensors = [a for a in operands if isinstance(a, fx.Node)]
        if not any(a not in tainted for a in tensors):
            continue  # computed only from the sublayer (rope's cat): dies with it
        for operand in tensors:
            if operand not in tainted:
                continue
            zeros = _zeros_like(graph, operand, stream, before=node)
            if zeros is None:
                complete = False
                continue
            node.replace_input_with(operand, zeros)
    return complete


def _zeros_like(graph: Graph, value: fx.Node, stream: fx.Node, *, before: fx.Node) -> fx.Node | None:
    """``stream.new_zeros(shape of value)``, its symbolic sizes read off ``stream`` (batch and
    sequence length); None when a size is symbolic and not one of the stream's."""
    val, ref = value.meta.get("val"), stream.meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return None
    g = graph.gm.graph
    with g.inserting_before(before):
        sizes: list = []
        for size in val.shape:
            if isinstance(size, int):
                sizes.append(size)
                continue
            match = next((j for j, s in enumerate(ref.shape) if not isinstance(s, int) and str(s) == str(size)), None)
            if match is None:
                return None
            sizes.append(g.call_method("size", (stream, match)))
        zeros = g.call_method("new_zeros", (stream, tuple(sizes)), {"dtype": val.dtype})
    zeros.meta["nn_module_stack"] = dict(value.meta.get("nn_module_stack") or {})
    return zeros


def _eliminate_dead_code(graph: Graph, keep: set[fx.Node]) -> None:
    """Erase pure nodes without users, repeatedly; never in-place writes or nodes in ``keep``."""
    for node in reversed(list(graph.nodes)):
        if node in keep or node.users or node.op not in ("call_function", "call_method"):
            continue
        if is_inplace(node) or node.is_impure():
            continue
        graph.gm.graph.erase_node(node)


def _constant_sizes(graph: Graph) -> dict[tuple, tuple[int, int, set[str]]]:
    """Storage -> (elements, bytes, constant names): a storage shared by several names (a tied
    weight) counts once, and goes only when no name uses it."""
    sizes: dict[tuple, tuple[int, int, set[str]]] = {}
    for name, tensor in graph.constants():
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key in sizes:
            sizes[key][2].add(name)
            continue
        nbytes = tensor.untyped_storage().nbytes()
        sizes[key] = (nbytes // tensor.element_size(), nbytes, {name})
    return sizes


def _linear_weights(graph: Graph) -> set[str]:
    """Names of constants used as the weight of a linear."""
    names = set()
    for node in graph.nodes:
        name = op_name(node)
        if name not in LINEAR_OPS:
            continue
        index = 2 if name == "addmm" else 1
        weight = node.args[index] if len(node.args) > index else None
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            names.add(weight.target)
    return names
