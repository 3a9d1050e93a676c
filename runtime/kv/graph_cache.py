"""The compressed layers behind transformers' own caches, once ``compress_kv`` rewrote a graph.

The ``compress_kv`` pass (lqc.passes.kv.compress_kv) replaces, in a compiled graph, the cache update
and SDPA of each attention layer:

- ``DynamicCache`` (``cat([past, new])``, then SDPA) by ``lqc::kv_dynamic_attention``;
- ``StaticCache`` (``index_copy_`` into its buffers, then SDPA) by ``lqc::kv_static_attention``.

Both put the new tokens into a ``CompressedKVLayer`` (lqc.runtime.kv.cache) and attend over it
with the attention that reads the codes (lqc.runtime.kv.attention.attend). transformers' cache
object stays what it was; this module finds the compressed layer again at the next step from
the tensor that cache holds for the layer, by the address of that tensor's memory:

- dynamic cache: the op returns, where the graph returned the concatenated keys and values,
  *handles*: tensors of the concatenated shape [B, Hkv, T, D] whose elements are all one NaN
  (stride 0), so the cache stores 4 bytes a layer and still reports the right sequence length
  and mask sizes; anything that computed with them as keys would get NaN, not quietly wrong
  numbers (the backend also refuses to run a graph it could not rewrite on them). It hands them back at the next step, and the handle's memory names the
  layer. A handle is made per step; the layer is dropped when the last handle's memory is freed,
  i.e. when transformers drops the cache.
- static cache: the key buffer's memory names the layer, which lives as long as the buffer.
  transformers allocated those buffers (in float, at the cache's full length) and they stay
  allocated; lqc only stops writing them. The memory saving is the dynamic cache's.

A step whose past is empty (dynamic) or whose first position is 0 (static) starts a new layer.
A past lqc does not know, with tokens in it, is taken in as it is (compressed like new tokens):
that happens when an earlier graph ran without the rewrite. The cache changed behind lqc's back
(cropped, or reordered for beam search) raises, naming what is not supported.
"""

from __future__ import annotations

import weakref

import torch

from lqc.ir.lqc_ops import check_kv_attention_shapes, kv_handle_shape

from lqc.runtime.kv.attention import attention_function
from lqc.runtime.kv.cache import CompressedKVLayer

_layers: dict[int, CompressedKVLayer] = {}  # address of a handle's or a static key buffer's memory -> its layer


def live_layers() -> int:
    """Compressed layers this module holds (for tests of their lifetime)."""
    return len(_layers)


def _register(tensor: torch.Tensor, layer: CompressedKVLayer) -> None:
    storage = tensor.untyped_storage()
    address = storage.data_ptr()
    _layers[address] = layer
    # torch keeps one Python object per storage: it dies exactly when the memory is freed
    weakref.finalize(storage, _forget, address, layer)


def _forget(address: int, layer: CompressedKVLayer) -> None:
    if _layers.get(address) is layer:
        del _layers[address]


def is_handle(value) -> bool:
    """Whether ``value`` is a handle a dynamic cache holds in place of a compressed layer's keys or values."""
    return (isinstance(value, torch.Tensor) and value.dim() == 4 and value.numel() > 0
            and value.stride() == (0, 0, 0, 0) and _lookup(value) is not None)


def layer_for(tensor: torch.Tensor) -> CompressedKVLayer | None:
    """The compressed layer behind a handle or a static key buffer (None: not lqc's)."""
    return _lookup(tensor)


def _lookup(tensor: torch.Tensor) -> CompressedKVLayer | None:
    return _layers.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None


def _new_layer(bits, group, residual, sinks, window, snapkv, observation, sliding_window=0) -> CompressedKVLayer:
    return CompressedKVLayer(bits or None, group, residual, sinks, window or None, snapkv or None, observation,
                             sliding_window=sliding_window or None)


def _take_in(layer: CompressedKVLayer, past_keys: torch.Tensor, past_values: torch.Tensor) -> None:
    """Store a past lqc did not compress (an earlier graph ran without the rewrite)."""
    if past_keys.stride() == (0, 0, 0, 0) or past_keys.isnan().all() or not past_keys.any():
        raise RuntimeError(
            "lqc compressed KV cache: the cache holds a copy of lqc's placeholders, not keys: it was reordered or "
            "copied outside the compiled graph (beam search reorders the cache). lqc's compressed cache supports "
            "greedy and sampled decoding; drop the compress_kv pass from the recipe for beam search"
        )
    layer.append(past_keys, past_values)
    layer.settle()


def _check_position(layer: CompressedKVLayer, past: int) -> None:
    stored = layer.appended if layer.keys is not None else 0
    if layer.sliding_window:  # transformers' sliding layer holds the last W - 1 tokens only
        stored = min(stored, layer.sliding_window - 1)
    if stored != past:
        raise RuntimeError(
            f"lqc compressed KV cache: transformers' cache says {past} tokens came before this step, the compressed "
            f"layer holds {stored}: the cache was cropped or rewound outside the compiled graph (assisted decoding, "
            f"crop()), which lqc's compressed cache does not support; drop the compress_kv pass from the recipe for it"
        )


def _attend_and_store(layer: CompressedKVLayer, query, keys, values, attention_mask, scaling, causal,
                      mask_offset: int = 0, softcap: float = 0.0) -> torch.Tensor:
    view = layer.append(keys, values)
    view.mask_offset = mask_offset
    out, importance = attention_function()(view, query, attention_mask, scaling, layer.importance_window(query.shape[-2]),
                                           causal, softcap=softcap)
    layer.settle(importance)
    layer.seen = layer.appended
    return out.transpose(1, 2)  # SDPA's [B, Hq, q, D], which the graph expects


def kv_dynamic_attention(past_keys, past_values, query, keys, values, attention_mask, scaling, causal,
                         bits, group, residual, sinks, window, snapkv, observation, sliding_window=0, softcap=0.0):
    """``lqc::kv_dynamic_attention``: see lqc.ir.lqc_ops."""
    check_kv_attention_shapes(query, keys, values)
    past = past_keys.shape[-2] if past_keys.dim() == 4 else 0
    layer = _lookup(past_keys) if past else None
    if layer is None:
        layer = _new_layer(bits, group, residual, sinks, window, snapkv, observation, sliding_window)
        if past:
            _take_in(layer, past_keys, past_values)
    _check_position(layer, past)
    # transformers' mask covers the past it kept and the new tokens: its first column is this position
    mask_offset = layer.appended - past if layer.keys is not None else 0
    out = _attend_and_store(layer, query, keys, values, attention_mask, scaling, causal, mask_offset, softcap)
    handles = []
    for past_states, states in ((past_keys, keys), (past_values, values)):
        handle = torch.full((1,), float("nan"), dtype=states.dtype, device=states.device)
        _register(handle, layer)
        handles.append(handle.expand(kv_handle_shape(past_states, states)))
    return out, *handles


def kv_static_attention(key_buffer, value_buffer, cache_position, query, keys, values, attention_mask, scaling, causal,
                        bits, group, residual, sinks, window, snapkv, observation, softcap=0.0):
    """``lqc::kv_static_attention``: see lqc.ir.lqc_ops."""
    check_kv_attention_shapes(query, keys, values)
    first = int(cache_position[0])
    layer = _lookup(key_buffer) if first else None  # position 0: a new sequence, even in a reused cache
    if layer is None:
        layer = _new_layer(bits, group, residual, sinks, window, snapkv, observation)
        if first:
            _take_in(layer, key_buffer[..., :first, :], value_buffer[..., :first, :])
        _register(key_buffer, layer)
    _check_position(layer, first)
    positions = torch.arange(first, first + keys.shape[-2], device=cache_position.device)
    if not torch.equal(cache_position.to(positions.device), positions):
        raise RuntimeError(f"lqc compressed KV cache: a static cache step writes positions {cache_position.tolist()}; "
                           f"lqc's compressed cache appends consecutive positions only")
    return _attend_and_store(layer, query, keys, values, attention_mask, scaling, causal, softcap=softcap)


def kv_placeholder(past, new):
    """``lqc::kv_placeholder``: see lqc.ir.lqc_ops."""
    return torch.full((1,), float("nan"), dtype=new.dtype, device=new.device).expand(kv_handle_shape(past, new))


# registered after the definitions: the decorator form returns None
torch.library.impl("lqc::kv_placeholder", "CompositeExplicitAutograd")(kv_placeholder)
torch.library.impl("lqc::kv_dynamic_attention", "CompositeExplicitAutograd")(kv_dynamic_attention)
torch.library.impl("lqc::kv_static_attention", "CompositeExplicitAutograd")(kv_static_attention)
