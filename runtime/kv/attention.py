"""Attention that reads a compressed KV cache directly, and its registration with transformers.

A ``CompressedKVLayer`` (lqc.runtime.kv.cache) hands attention a ``PendingKV``: its ``KVStore``
handle and this step's new keys and values. ``compressed_attention`` passes them with the query
to ``lqc::kv_attention`` (schema in lqc.ir.lqc_ops), one op for the cache update and the
attention, implemented here: the layer appends the new tokens and returns a
``CompressedKVView`` (the full-precision sinks, the quantized blocks as codes with their scales
and zeros, the full-precision recent tokens, this step's among them), ``attend`` computes

    softmax(q K^T * scaling + mask) V

over those parts, and the layer settles (closes blocks, evicts). The blocks are never
dequantized: per block, the key scales fold into the query and the value scales into the
attention weights (``key_scores``, ``mix_values`` in lqc.runtime.kv.quant), so the codes enter
two matmuls as small integers. Query heads that share a KV head (GQA) are computed as rows of
one matmul against it, never repeated. The quantized part is read in chunks of
``CHUNK_TOKENS``, so no step materializes a float copy of the whole cache.

Why one opaque op: under torch.compile, dynamo would otherwise trace the cache's Python, and
every branch on its state (does a block close this step? were tokens evicted?) would become a
guard: a new graph per block, until dynamo's recompile limit, after which it runs the forward
uncompiled. Behind the op, a model's decode steps are one graph.

Masks: transformers builds a boolean mask over token *positions* (``sdpa_mask``, registered
under the same name). The view carries each stored token's position once tokens were evicted
(StreamingLLM window, SnapKV), and the mask's columns are gathered at them; before any
eviction the stored tokens are positions 0..T-1 in order and the mask is used as it is.

``use_compressed_attention(config)`` registers ``compressed_attention`` as the attention
implementation ``"lqc_kv"`` and switches ``config`` to it; any cache other than lqc's (or no
cache) then runs the attention the config had before, unchanged. ``CompressedKVCache`` calls it
when it is built, so ``model.generate(..., past_key_values=CompressedKVCache(model.config))``
needs nothing more.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from lqc.ir.lqc_ops import KVStore, check_kv_attention_shapes

from lqc.runtime.kv.quant import QuantizedKV, dequantize, key_scores, mix_values

ATTENTION = "lqc_kv"
CHUNK_TOKENS = 4096  # quantized tokens read at a time: bounds the step's temporary floats (3 MB at 3 heads x 64)


@dataclass
class CompressedKVView:
    """One layer's stored keys and values for one step, in token order: sinks, quantized, recent."""

    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    quantized: tuple[QuantizedKV, QuantizedKV] | None
    keys: torch.Tensor  # the full-precision recent tokens, this step's last
    values: torch.Tensor
    positions: torch.Tensor | None  # [B, H, T] position of each stored token; None: 0..T-1
    # the position of the mask's first column: transformers' sliding-window cache builds its mask
    # over the window only (from kv_offset); stored tokens before it are outside the window
    mask_offset: int = 0

    @property
    def tokens(self) -> int:
        quantized = self.quantized[0].tokens if self.quantized else 0
        return self.sink_keys.shape[-2] + quantized + self.keys.shape[-2]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Full keys and values (the quantized part dequantized), for attentions that need tensors."""
        keys, values = [self.sink_keys], [self.sink_values]
        if self.quantized:
            keys.append(dequantize(self.quantized[0], self.keys.dtype))
            values.append(dequantize(self.quantized[1], self.values.dtype))
        keys, values = torch.cat([*keys, self.keys], dim=-2), torch.cat([*values, self.values], dim=-2)
        return keys, values


@dataclass
class PendingKV:
    """What a compressed layer's ``update`` returns (as keys and as values): the new tokens, for
    ``lqc::kv_attention`` to append to ``store``."""

    store: KVStore
    keys: torch.Tensor
    values: torch.Tensor


def _quantized_chunks(q: QuantizedKV):
    step = max(q.group, CHUNK_TOKENS // q.group * q.group) if q.axis == "channel" else CHUNK_TOKENS
    for start in range(0, q.tokens, step):
        yield start, min(start + step, q.tokens)


def _mask_columns(attention_mask: torch.Tensor, view: CompressedKVView, query_length: int) -> torch.Tensor:
    """The mask over positions -> over the stored tokens: [B, 1 or H, q, T]; a stored token before
    the mask's first position (``view.mask_offset``) is masked out (boolean False, additive -inf)."""
    tokens = view.tokens
    if view.positions is None and not view.mask_offset:
        # the stored tokens are positions 0..T-1; a static cache's mask also covers its empty slots
        if attention_mask.shape[-1] < tokens:
            raise ValueError(f"lqc KV attention: the mask covers {attention_mask.shape[-1]} positions but the cache "
                             f"holds {tokens} tokens; build the mask with this cache's get_mask_sizes")
        return attention_mask[..., :tokens]
    columns = _mask_index(view)  # [B or 1, H or 1, T]
    b, heads = max(columns.shape[0], attention_mask.shape[0]), max(columns.shape[1], attention_mask.shape[1])
    index = columns.clamp(min=0)[:, :, None, :].expand(b, heads, query_length, tokens)
    gathered = attention_mask.expand(b, heads, query_length, attention_mask.shape[-1]).gather(-1, index)
    stale = (columns < 0)[:, :, None, :]
    if not stale.any():
        return gathered
    return gathered & ~stale if gathered.dtype == torch.bool else gathered.masked_fill(stale, float("-inf"))


def _mask_index(view: CompressedKVView) -> torch.Tensor:
    """Each stored token's mask column (its position minus ``mask_offset``): [B or 1, H or 1, T]."""
    if view.positions is None:
        positions = torch.arange(view.tokens, device=view.keys.device)[None, None]
    else:
        positions = view.positions
    return positions - view.mask_offset


def compressed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention interface transformers calls: query [B, Hq, q, D]; key and value a
    ``PendingKV`` (the same object twice) or, for other caches, tensors."""
    if not isinstance(key, PendingKV):
        return _fallback(module)(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap") or 0.0  # Gemma 2's soft-capped scores
    return torch.ops.lqc.kv_attention(key.store, query, key.keys, key.values, attention_mask, scaling, softcap), None


# What the KV ops attend with: ``attend`` below, unless code generated for the graph (target
# "triton": lqc.codegen.kv_decode) runs the op inside ``attention_kernel``. A context variable, not
# an argument: the ops' schemas stay the same whichever kernel computes them.
_attention: ContextVar[Callable | None] = ContextVar("lqc_kv_attention_kernel", default=None)


@contextmanager
def attention_kernel(fn: Callable) -> Iterator[None]:
    """Within this block the KV ops compute their attention with ``fn`` (``attend``'s signature)."""
    token = _attention.set(fn)
    try:
        yield
    finally:
        _attention.reset(token)


def attention_function() -> Callable:
    return _attention.get() or attend


def kv_attention(store: KVStore, query, keys, values, attention_mask, scaling, softcap=0.0):
    """``lqc::kv_attention``: append this step's tokens to the store's layer, attend, settle."""
    check_kv_attention_shapes(query, keys, values)
    layer = store.layer
    view = layer.append(keys, values)
    out, importance = attention_function()(view, query, attention_mask, scaling, layer.importance_window(query.shape[-2]),
                                           softcap=softcap)
    layer.settle(importance)
    return out


# registered after the definition: the decorator form returns None
torch.library.impl("lqc::kv_attention", "CompositeExplicitAutograd")(kv_attention)


def mask_bias(view: CompressedKVView, attention_mask: torch.Tensor | None, q_len: int, causal: bool,
              device: torch.device) -> torch.Tensor | None:
    """What the mask adds to the scores over the stored tokens: float32 [B, 1 or Hkv, q, T], 0 where
    allowed and -inf where not (a boolean mask), or the additive mask's values; without a mask and
    with ``causal``, -inf for this step's later tokens (the last q_len stored). None: nothing."""
    tokens = view.tokens
    if attention_mask is not None:
        allowed = _mask_columns(attention_mask, view, q_len)
        if allowed.dtype != torch.bool:
            return allowed.to(torch.float32)
        return torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill(~allowed, float("-inf"))
    stale = (_mask_index(view) < 0)[:, :, None, :] if view.mask_offset else None
    if (causal and q_len > 1) or (stale is not None and stale.any()):
        bias = torch.zeros(1, 1, q_len, tokens, dtype=torch.float32, device=device)
        if causal and q_len > 1:
            future = torch.ones(q_len, q_len, dtype=torch.bool, device=device).triu(1)
            bias[..., tokens - q_len :] = bias[..., tokens - q_len :].masked_fill(future, float("-inf"))
        return bias if stale is None else bias.masked_fill(stale, float("-inf"))
    return None


def attend(view: CompressedKVView, query: torch.Tensor, attention_mask: torch.Tensor | None, scaling: float,
           importance_window: int = 0, causal: bool = True, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of ``query`` [B, Hq, q, D] over ``view`` -> ([B, q, Hq, D], importance); with
    ``softcap`` c > 0 the scores are c * tanh(scores / c) before the mask (Gemma 2). With
    ``importance_window`` w > 0 (SnapKV), importance [B, Hkv, recent tokens] sums the attention
    the last w queries of every query head of a KV head give each recent token. Without a mask,
    ``causal`` keeps each of this step's tokens (the last q stored) from the later ones."""
    b, query_heads, q_len, d = query.shape
    kv_heads = view.keys.shape[1]
    rep = query_heads // kv_heads
    q = query.to(torch.float32).reshape(b, kv_heads, rep * q_len, d) * scaling

    sinks, recent = view.sink_keys.shape[-2], view.keys.shape[-2]
    parts = [q @ view.sink_keys.to(torch.float32).transpose(-1, -2)]
    if view.quantized:
        parts += [key_scores(q, view.quantized[0].tokens_slice(start, stop)) for start, stop in _quantized_chunks(view.quantized[0])]
    parts.append(q @ view.keys.to(torch.float32).transpose(-1, -2))
    scores = torch.cat(parts, dim=-1).reshape(b, kv_heads, rep, q_len, -1)
    tokens = scores.shape[-1]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap

    bias = mask_bias(view, attention_mask, q_len, causal, q.device)
    if bias is not None:
        scores = scores + bias[:, :, None]
    probs = torch.softmax(scores, dim=-1)
    if attention_mask is not None:  # a query that may attend to nothing (padding) outputs zeros, as SDPA's does
        probs = probs.nan_to_num(0.0)

    importance = None
    if importance_window:
        importance = probs[..., -importance_window:, tokens - recent :].sum(dim=(2, 3))

    probs = probs.reshape(b, kv_heads, rep * q_len, tokens)
    out = probs[..., :sinks] @ view.sink_values.to(torch.float32)
    if view.quantized:
        values = view.quantized[1]
        for start, stop in _quantized_chunks(values):
            out = out + mix_values(probs[..., sinks + start : sinks + stop], values.tokens_slice(start, stop))
    out = out + probs[..., tokens - recent :] @ view.values.to(torch.float32)
    out = out.reshape(b, query_heads, q_len, d).transpose(1, 2).contiguous()
    return out.to(query.dtype), importance


def _fallback(module):
    name = getattr(module.config, "_lqc_attention_fallback", None) or "sdpa"
    if name == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    # transformers is an optional extra (lqc[hf]): imported where a transformers model is running
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else sdpa_attention_forward


def use_compressed_attention(config) -> None:
    """Register ``compressed_attention`` as ``"lqc_kv"`` and switch ``config`` (a model's config,
    shared with its attention modules) to it, remembering the attention it had for other caches."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, compressed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    if config._attn_implementation != ATTENTION:
        config._lqc_attention_fallback = config._attn_implementation
        config._attn_implementation = ATTENTION


def reads_codes(config) -> bool:
    return config is not None and getattr(config, "_attn_implementation", None) == ATTENTION
