"""``compress_kv``: compress the KV cache of a compiled model, with transformers' own caches.

Each attention layer of a captured graph updates the cache, then calls SDPA over all its keys
and values:

- ``DynamicCache`` (``generate()``'s default): ``keys = cat([past_keys, new_keys], -2)`` (the
  past is a graph input, or an empty ``torch.tensor([])`` in the prefill graph), the same for
  values; SDPA reads them (with ``enable_gqa``, or through ``repeat_kv``'s expand and reshape);
  the graph returns them for the cache to keep.
- ``StaticCache`` (``cache_implementation="static"``): ``key_buffer.index_copy_(2, positions,
  new_keys)``, the same for values; SDPA reads the buffers (a ``[:, :, :n]`` slice of them in
  the prefill graph, through ``repeat_kv`` or not).

The pass replaces the update and the SDPA by one lqc op, ``lqc::kv_dynamic_attention`` or
``lqc::kv_static_attention`` (lqc.ir.lqc_ops), whose implementation (lqc.runtime.kv.graph_cache)
keeps the layer's tokens in a compressed cache, KIVI-style (``bits``, ``group``, ``residual``,
``sinks``), with StreamingLLM (``window``) or SnapKV (``snapkv``) eviction if asked, and attends
over the codes directly. The dynamic cache then holds 4-byte placeholders instead of the keys
and values. A dynamic cache's ``cat`` that no attention reads (``drop_layers`` removed that
attention) becomes ``lqc::kv_placeholder``: the dropped layer's cache holds 4 bytes, not zeros.
Nothing else in the graph changes.

A sliding-window layer of a ``DynamicCache`` (Gemma 2/3, Mistral: ``DynamicSlidingWindowLayer``)
returns only the ``cat``'s last W - 1 tokens to the cache (``cat[:, :, -(W-1):]``); its op gets
``sliding_window=W`` and the slice then cuts the handle instead. A static cache's sliding layers
(``StaticSlidingWindowLayer``: a rolling buffer) are not recognized.

Eager attention (Gemma 2's, whose scores are soft-capped: matmul, scaling, tanh, mask, softmax,
matmul) is read as SDPA's arguments plus the cap (lqc.passes.kv.eager_attention) and rewritten
the same way, the op soft-capping the scores it computes over the codes.

An attention the pass does not recognize (no cache: ``use_cache=False``; a static sliding-window
cache; dropout; eager attention spelled otherwise) is left as it is, with a warning when a cache
was there.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from lqc.ir import Graph, op_name
from lqc.ir.errors import LqcConfigError
from lqc.ir.regions import is_attention_op
from lqc.runtime.kv import graph_cache  # noqa: F401 - registers the ops' implementations
from lqc.runtime.kv.cache import check_cache_options
from lqc.runtime.kv.quant import check_kv_options

from lqc.passes.base import Pass, PassResult
from lqc.passes.kv.eager_attention import EagerAttention, match_eager_attention
from lqc.passes.options import PassOptions
from lqc.passes.registry import register_pass

SDPA = "scaled_dot_product_attention"
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
# between a cache tensor and SDPA's key or value: repeat_kv (x[:, :, None].expand(...).reshape(...))
# and the static prefill's x[:, :, :n]; they choose which stored tokens and heads SDPA reads
VIEW_OPS = frozenset({"getitem", "expand", "reshape", "view"})


@dataclass
class CompressKVOptions(PassOptions):
    bits: int = field(default=4, metadata={"help": "8, 4 or 2: quantized KV (keys per channel, values per token); 0: no quantization (eviction alone)"})
    group: int = field(default=64, metadata={"help": "tokens per key block and channels per value group"})
    residual: int = field(default=128, metadata={"help": "most recent tokens kept in full precision"})
    sinks: int = field(default=4, metadata={"help": "first tokens kept in full precision"})
    window: int | None = field(default=None, metadata={"help": "StreamingLLM: keep the sinks and the last WINDOW tokens"})
    snapkv: int | None = field(default=None, metadata={"help": "SnapKV: keep the top SNAPKV prompt tokens per KV head"})
    observation: int = field(default=32, metadata={"help": "SnapKV: the last queries of the prompt that score it"})

    def __post_init__(self):
        try:
            check_cache_options(self.bits or None, self.group, self.residual, self.sinks, self.window, self.snapkv,
                                self.observation)
        except ValueError as exc:
            raise LqcConfigError(f"pass 'compress_kv': {exc}") from None

    def op_options(self) -> tuple[int, ...]:
        return (self.bits, self.group, self.residual, self.sinks, self.window or 0, self.snapkv or 0, self.observation)


@dataclass
class CompressKVReport:
    rewritten: list[str]  # attention layers (module paths) that read a compressed cache
    skipped: dict[str, str]  # attention layer -> why it keeps its float cache
    unread_caches: list[str]  # layers whose cache nobody reads (attention dropped): a placeholder instead
    ops: list[str]  # the lqc KV ops in the graph after the pass


@dataclass
class _CacheUpdate:
    """Where one layer's new keys and values meet its cache."""

    kind: str  # "dynamic" | "static"
    past_keys: fx.Node  # dynamic: the cat's past operand; static: the key buffer
    past_values: fx.Node
    new_keys: fx.Node
    new_values: fx.Node
    updates: tuple[fx.Node, fx.Node]  # the two cats, or the two index_copy_ nodes
    positions: fx.Node | None = None  # static: index_copy_'s positions
    sliding_window: int = 0  # dynamic: W when the cache keeps only the cat's last W - 1 tokens (a sliding window)


def _sdpa_args(node: fx.Node) -> dict:
    args = dict(zip(SDPA_ARGS, node.args))
    args.update(node.kwargs)
    return {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False, **args}


_ALL = slice(None)


def _is_prefix(index) -> bool:
    return isinstance(index, slice) and index.start in (None, 0) and index.step in (None, 1)


def _view_kind(node: fx.Node) -> str | None:
    """"repeat" (x[:, :, None, :, :]), "prefix" (x[:, :, :n]), "expand", "reshape", or None: a
    view that could change which token or head SDPA reads where."""
    name = op_name(node)
    if name in ("expand", "reshape", "view"):
        return "reshape" if name == "view" else name
    if name != "getitem" or not isinstance(node.args[1], tuple):
        return None
    index = node.args[1]
    if index == (_ALL, _ALL, None, _ALL, _ALL):
        return "repeat"
    if len(index) in (3, 4) and index[:2] == (_ALL, _ALL) and _is_prefix(index[2]) and all(i == _ALL for i in index[3:]):
        return "prefix"
    return None


# what a view may read: repeat_kv is getitem(None) -> expand -> reshape, in that order
_READS = {"reshape": ("expand",), "expand": ("repeat",), "repeat": (None, "prefix"), "prefix": (None,)}


def _through_views(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """Walk from SDPA's key or value operand back over repeat_kv and a prefix slice, each view
    used only on that path; None if another kind of view is on the way."""
    chain, kind = [], None
    while isinstance(node, fx.Node) and op_name(node) in VIEW_OPS:
        below = _view_kind(node)
        if below is None or len(node.users) != 1 or (chain and below not in _READS[kind]):
            return None
        chain.append(node)
        node, kind = node.args[0], below
    if chain and None not in _READS[kind]:
        return None  # an expand or reshape that is not repeat_kv's
    return node, chain


def _is_dim(value, dim: int, rank: int = 4) -> bool:
    return value in (dim, dim - rank)


def _empty_tensor(node: fx.Node) -> bool:
    """The dynamic cache's empty past in a prefill graph: ``torch.tensor([])``."""
    return node.op == "call_function" and node.target is torch.tensor and node.args and node.args[0] == []


def _cache_cat(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(past, new) of a dynamic cache's ``cat([past, new], -2)``, past a graph input or the prefill's
    ``torch.tensor([])``; None for any other node."""
    if op_name(node) != "cat" or not isinstance(node.args[0], (list, tuple)) or len(node.args[0]) != 2:
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    past, new = node.args[0]
    if not _is_dim(dim, 2) or not isinstance(past, fx.Node) or not (past.op == "placeholder" or _empty_tensor(past)):
        return None
    return past, new


def _kept_tail(node: fx.Node) -> int | None:
    """k of ``x[:, :, -k:, :]`` going only to the graph's output: what transformers'
    ``DynamicSlidingWindowLayer`` keeps of the concatenated keys or values (k = W - 1)."""
    if op_name(node) != "getitem" or not isinstance(node.args[1], tuple) or not all(u.op == "output" for u in node.users):
        return None
    index = node.args[1]
    if len(index) not in (3, 4) or index[:2] != (_ALL, _ALL) or any(i != _ALL for i in index[3:]):
        return None
    tail = index[2]
    if not isinstance(tail, slice) or tail.stop is not None or tail.step not in (None, 1):
        return None
    return -tail.start if isinstance(tail.start, int) and tail.start < 0 else None


def _sliding_window(cats: tuple[fx.Node, fx.Node]) -> int | None:
    """W if each cat's only slice is a kept tail of W - 1 tokens (the same W for both), 0 if no cat
    has one, None if they disagree."""
    tails = set()
    for cat in cats:
        kept = [_kept_tail(u) for u in cat.users if op_name(u) == "getitem" and _view_kind(u) is None]
        tails.add(kept[0] if len(kept) == 1 else (None if kept else 0))
    if len(tails) != 1 or None in tails:
        return None
    tail = tails.pop()
    return tail + 1 if tail else 0


def _dynamic_update(keys: fx.Node, values: fx.Node) -> _CacheUpdate | None:
    key_cat, value_cat = _cache_cat(keys), _cache_cat(values)
    if key_cat is None or value_cat is None:
        return None
    window = _sliding_window((keys, values))
    if window is None:
        return None
    return _CacheUpdate("dynamic", key_cat[0], value_cat[0], key_cat[1], value_cat[1], (keys, values),
                        sliding_window=window)


def _static_update(keys: fx.Node, values: fx.Node) -> _CacheUpdate | None:
    writes = []
    for buffer in (keys, values):
        copies = [u for u in buffer.users if op_name(u) == "index_copy_" and u.args[0] is buffer]
        if len(copies) != 1 or not _is_dim(copies[0].args[1], 2):
            return None
        writes.append(copies[0])
    if writes[0].args[2] is not writes[1].args[2]:
        return None
    return _CacheUpdate("static", keys, values, writes[0].args[3], writes[1].args[3], tuple(writes), writes[0].args[2])


def _find_update(sdpa: fx.Node, args: dict) -> tuple[_CacheUpdate | None, list[fx.Node]]:
    keys, values = _through_views(args["key"]), _through_views(args["value"])
    if keys is None or values is None:
        return None, []
    (keys, key_chain), (values, value_chain) = keys, values
    if any(_view_kind(n) == "prefix" for n in key_chain + value_chain):  # only the static prefill slices
        update = _static_update(keys, values)
    else:
        update = _dynamic_update(keys, values) or _static_update(keys, values)
    return update, key_chain + value_chain


def _why_not(args: dict, update: _CacheUpdate | None, graph_users_ok: bool) -> str | None:
    if update is None:
        return "its keys and values do not come from a cat with a past (DynamicCache) or an index_copy_ into a buffer (StaticCache)"
    if args["dropout_p"] not in (0, 0.0):
        return f"it has dropout {args['dropout_p']}"
    if not graph_users_ok:
        return "the cache update is also read by something other than this attention and the graph's output"
    return None


def _users_ok(update: _CacheUpdate, sdpa: fx.Node, chain: list[fx.Node]) -> bool:
    allowed = set(chain) | {sdpa}
    if update.kind == "dynamic":  # the cat: read by the attention and returned (a sliding window: its tail) to the cache
        return all(u in allowed or u.op == "output" or (update.sliding_window and _kept_tail(u))
                   for cat in update.updates for u in cat.users)
    # the buffer: written once, read by the attention, returned (prefill) to the cache
    return all(u in allowed or u.op == "output" or u in update.updates
               for buffer in (update.past_keys, update.past_values) for u in buffer.users)


def _head_dim(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return int(val.shape[-1]) if isinstance(val, torch.Tensor) and val.dim() == 4 else None


@register_pass
class CompressKV(Pass):
    name = "compress_kv"
    description = ("KV cache of transformers' DynamicCache or StaticCache: quantized (KIVI), StreamingLLM or SnapKV "
                   "eviction, attention over the codes (lqc::kv_dynamic_attention, lqc::kv_static_attention)")
    Options = CompressKVOptions

    def run(self, graph: Graph, ctx) -> PassResult:
        o = self.options
        rewritten, skipped = [], {}
        # a model run without a cache has nothing to compress: its attentions are left alone (warned below)
        has_cache = any(i.role == "kv_cache" for i in graph.inputs) or any(op_name(n) == "index_copy_" for n in graph.nodes)
        for anchor, args, eager in self._attentions(graph):
            where = Graph.module_path(anchor) or anchor.name
            if args is None:
                skipped[where] = ("it is eager attention (matmul and softmax) in a form compress_kv does not read as "
                                  "scaled_dot_product_attention (scores, optional soft-capping and mask, softmax, "
                                  "matmul with the values)")
                continue
            update, chain = _find_update(anchor, args)
            if update is None and not has_cache:
                continue
            reason = _why_not(args, update, update is not None and _users_ok(update, anchor, chain))
            if reason is not None:
                skipped[where] = reason
                continue
            head_dim = _head_dim(update.new_keys)
            if o.bits and head_dim is not None:
                try:
                    check_kv_options(o.bits, o.group, head_dim)
                except ValueError as exc:
                    raise LqcConfigError(f"pass 'compress_kv' on {Graph.module_path(anchor)}: {exc}") from None
            self._rewrite(graph, anchor, args, update, chain, eager)
            rewritten.append(where)
        placeholders = self._drop_unread_caches(graph)
        if not rewritten and not skipped and not any(is_attention_op(n) for n in graph.nodes):
            warnings.warn(f"lqc compress_kv: {graph.name} has no attention (scaled_dot_product_attention, or a softmax "
                          f"over a matmul): no KV cache to compress", stacklevel=2)
        elif not has_cache and not rewritten and not skipped:
            warnings.warn(f"lqc compress_kv: {graph.name} runs without a KV cache (an encoder, or a call with "
                          f"use_cache=False): nothing to compress here; the cache is compressed in graphs that use one "
                          f"(generate, a decode step)", stacklevel=2)
        for where, reason in skipped.items():
            warnings.warn(f"lqc compress_kv: the attention in {where} keeps its float cache: {reason}", stacklevel=2)
        kinds = sorted({op_name(n) for n in graph.nodes if op_name(n).startswith("lqc::kv_")})
        return PassResult(matches=len(rewritten),
                          details=CompressKVReport(rewritten=rewritten, skipped=skipped, unread_caches=placeholders, ops=kinds),
                          message=f"{len(rewritten)} attention layers read a compressed cache" if rewritten else "")

    def _attentions(self, graph: Graph) -> list[tuple[fx.Node, dict | None, EagerAttention | None]]:
        """Each attention the pass selects: (the node its output replaces, SDPA's arguments, the
        eager attention they were read from). SDPA is its own node; eager attention (Gemma 2's
        soft-capped scores) is read from its softmax, arguments None if it cannot be."""
        found = []
        for node in list(graph.nodes):
            if not self.selects(node):
                continue
            if op_name(node) == SDPA:
                found.append((node, _sdpa_args(node), None))
            elif op_name(node) in ("softmax", "_softmax") and is_attention_op(node):
                eager = match_eager_attention(node)
                found.append((eager.output, eager.args, eager) if eager else (node, None, None))
        return found

    def _drop_unread_caches(self, graph: Graph) -> list[str]:
        """Layers whose attention drop_layers removed still grow the dynamic cache with zeros: keep
        a 4-byte placeholder there instead (``lqc::kv_placeholder``)."""
        g, replaced = graph.gm.graph, []
        cache_inputs = {i.name for i in graph.inputs if i.role == "kv_cache"}
        for cat in list(graph.nodes):
            if not _unread_cache_cat(cat, cache_inputs) or not self.selects(cat):
                continue
            with g.inserting_before(cat):
                placeholder = g.call_function(torch.ops.lqc.kv_placeholder.default, tuple(cat.args[0]))
            placeholder.meta.update({k: v for k, v in cat.meta.items() if k in ("nn_module_stack", "stack_trace")})
            cat.replace_all_uses_with(placeholder)
            g.erase_node(cat)
            replaced.append(Graph.module_path(placeholder) or placeholder.name)
            for past in placeholder.args:
                if _empty_tensor(past) and not past.users:
                    g.erase_node(past)
        return replaced

    def _rewrite(self, graph: Graph, sdpa: fx.Node, args: dict, update: _CacheUpdate, chain: list[fx.Node],
                 eager: EagerAttention | None = None) -> None:
        """Replace ``sdpa`` (or eager attention's output matmul) and the cache update by one KV op."""
        g = graph.gm.graph
        scale = args["scale"]
        if scale is None:
            scale = _head_dim(args["query"]) ** -0.5
        attention = (args["query"], update.new_keys, update.new_values, args["attn_mask"], float(scale), bool(args["is_causal"]))
        kwargs = {"softcap": eager.softcap} if eager and eager.softcap else {}
        with g.inserting_before(sdpa):
            if update.kind == "dynamic":
                if update.sliding_window:
                    kwargs["sliding_window"] = update.sliding_window
                op = g.call_function(torch.ops.lqc.kv_dynamic_attention.default,
                                     (update.past_keys, update.past_values, *attention, *self.options.op_options()), kwargs)
                out = g.call_function(operator.getitem, (op, 0))
                handles = [g.call_function(operator.getitem, (op, i)) for i in (1, 2)]
            else:
                op = g.call_function(torch.ops.lqc.kv_static_attention.default,
                                     (update.past_keys, update.past_values, update.positions, *attention,
                                      *self.options.op_options()), kwargs)
                out, handles = op, []
        op.meta.update({k: v for k, v in sdpa.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        sdpa.replace_all_uses_with(out)
        g.erase_node(sdpa)
        for node in eager.nodes if eager else ():  # softmax, soft-capping, scores: only the output read them
            g.erase_node(node)
        for node in chain:  # the views fed only the attention; each path listed from SDPA back
            if not node.users:
                g.erase_node(node)
        if update.kind == "dynamic":
            for cat, handle in zip(update.updates, handles):  # the cache keeps the handles
                tails = [u for u in cat.users if _kept_tail(u)] if update.sliding_window else []
                cat.replace_all_uses_with(handle)
                g.erase_node(cat)
                for tail in tails:  # the sliding window's slice now cuts the handle, made at the attention
                    handle.append(tail)
            for past in (update.past_keys, update.past_values):
                if _empty_tensor(past) and not past.users:
                    g.erase_node(past)
        else:
            for write in update.updates:  # the float buffers are no longer written
                g.erase_node(write)


def _unread_cache_cat(node: fx.Node, cache_inputs: set[str]) -> bool:
    """A dynamic cache's ``cat([past, new], -2)`` that only goes back to the cache: no attention
    reads it. The past must be a cache input (or the prefill's empty tensor): a graph that returns
    the concatenation of some other input is the model's business."""
    parts = _cache_cat(node)
    return (parts is not None and (_empty_tensor(parts[0]) or parts[0].name in cache_inputs)
            and all(u.op == "output" for u in node.users))
