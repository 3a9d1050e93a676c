"""Run-time side of layer dropping: KV-cache layers that hold nothing, and the modules a saved
dropped model is rebuilt with.

A dropped attention layer reads no keys or values, so its cache slot needs no memory. Hugging
Face caches still call ``update`` for every layer index and size the attention mask from the
cache, so a dropped layer's slot must answer with tensors of the right shape. The layers here
answer with zeros expanded from a single position (stride 0 along the sequence): they hold
[B, H, 1, D] elements whatever the context length.

- ``DroppedDynamicLayer``: grows like ``DynamicLayer`` in shape only (a view of one position);
- ``DroppedStaticLayer``: a ``max_cache_len``-long view of one position, written by nobody.

Both subclass transformers' ``DummyLayer`` (the layer kind HF gives layers without attention),
so ``Cache.get_seq_length``, mask sizing, offloading and early initialization skip them and read
a kept layer instead. A cache where every attention layer is dropped cannot tell its length, and
``free_dropped_layers`` refuses it.

``keep_dropped_layers_out_of_caches(model, layers)`` makes ``model.generate`` build its caches
(dynamic or static) with these layers at the dropped indices; ``lqc.compress`` and ``lqc.load``
call it for models whose attention layers were dropped.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, DynamicLayer, StaticLayer


class _ZeroLayer(DummyLayer):
    """Keys and values that are zeros of shape [B, H, length, D], stored as one position."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.is_initialized = False
        self._key_zero: torch.Tensor | None = None  # [B, H, 1, D]
        self._value_zero: torch.Tensor | None = None

    def _expand(self, length) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._key_zero, self._value_zero
        return k.expand(k.shape[0], k.shape[1], length, k.shape[3]), v.expand(v.shape[0], v.shape[1], length, v.shape[3])

    def _start(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        self._key_zero = key_states.new_zeros(b, h, 1, key_states.shape[-1])
        self._value_zero = value_states.new_zeros(b, h, 1, value_states.shape[-1])
        self.is_initialized = True

    def _rebatch(self, batch: int) -> None:
        if self._key_zero is None:
            return
        length = self.keys.shape[-2] if self.keys is not None else 1
        self._key_zero = self._key_zero.new_zeros(batch, *self._key_zero.shape[1:])
        self._value_zero = self._value_zero.new_zeros(batch, *self._value_zero.shape[1:])
        self.keys, self.values = self._expand(length)

    # beam search and batch edits change the batch size only; the values stay zeros
    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._key_zero is not None:
            self._rebatch(self._key_zero.shape[0] * repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._key_zero is not None:
            self._rebatch(len(indices))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        pass  # zeros in any order are zeros

    def nbytes(self) -> int:
        """Bytes this layer holds, whatever its length."""
        if self._key_zero is None:
            return 0
        return self._key_zero.untyped_storage().nbytes() + self._value_zero.untyped_storage().nbytes()


class DroppedDynamicLayer(_ZeroLayer):
    """A dynamic-cache slot for a dropped attention layer: its length grows with the context (so
    the shapes HF sees are those of ``DynamicLayer``) and its memory does not."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self._start(key_states, value_states)
            past = 0
        else:
            past = self.keys.shape[-2]
        self.keys, self.values = self._expand(past + key_states.shape[-2])
        return self.keys, self.values

    def reset(self) -> None:
        self.keys = self.values = None
        self._key_zero = self._value_zero = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if not self.is_initialized or tokens_to_remove == 0:
            return
        length = self.keys.shape[-2]
        keep = length - tokens_to_remove if tokens_to_remove > 0 else -tokens_to_remove
        self.keys, self.values = self._expand(max(keep, 0))

    def get_max_length(self) -> int:
        return -1


class DroppedStaticLayer(_ZeroLayer):
    """A static-cache slot for a dropped attention layer: always ``max_cache_len`` long (what the
    static mask expects), one position of memory."""

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(**kwargs)
        self.max_cache_len = max_cache_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self._start(key_states, value_states)
            self.keys, self.values = self._expand(self.max_cache_len)
        return self.keys, self.values

    def reset(self) -> None:
        pass  # holds zeros only

    def crop(self, tokens_to_remove: int) -> None:
        pass

    def get_max_length(self) -> int:
        return self.max_cache_len


DROPPED_LAYER_TYPES = (DroppedDynamicLayer, DroppedStaticLayer)


def free_dropped_layers(cache: Cache, layers: Iterable[int]) -> Cache:
    """Replace the cache slots of the dropped attention ``layers`` (layer indices) by slots that
    hold no keys or values, in place, before the cache is first used; returns ``cache``.

    Only for a model whose attention at those layers was dropped (``drop_layers``): a model that
    still reads them would attend to zeros."""
    layers = sorted(set(layers))
    if not layers:
        return cache
    if not hasattr(cache, "layers") or not isinstance(cache.layers, list):
        raise TypeError(f"free_dropped_layers needs a transformers Cache (DynamicCache, StaticCache), got {type(cache).__name__}")
    if cache.layer_class_to_replicate is not None and len(cache.layers) <= max(layers):
        raise ValueError(
            "free_dropped_layers: this cache creates its layers lazily and does not know the model's layer count; "
            "build it with the model's config: DynamicCache(config=model.config)"
        )
    kept = [i for i, layer in enumerate(cache.layers) if isinstance(layer, CacheLayerMixin) and i not in layers]
    if not kept:
        raise ValueError(
            f"free_dropped_layers: dropping the cache of layers {layers} leaves no attention layer to tell the cache's length"
        )
    for i in layers:
        if i >= len(cache.layers):
            raise ValueError(f"free_dropped_layers: layer {i} is out of range: this cache has {len(cache.layers)} layers")
        layer = cache.layers[i]
        if isinstance(layer, DROPPED_LAYER_TYPES):
            continue
        if layer.is_initialized and not isinstance(layer, DummyLayer):
            raise ValueError(f"free_dropped_layers: layer {i} already holds keys and values; free layers before the cache is used")
        if type(layer) is StaticLayer:
            cache.layers[i] = DroppedStaticLayer(layer.max_cache_len)
        elif type(layer) is DynamicLayer:
            cache.layers[i] = DroppedDynamicLayer()
        else:
            raise TypeError(
                f"free_dropped_layers: layer {i} is a {type(layer).__name__}; only full-attention DynamicLayer and "
                f"StaticLayer slots can be freed"
            )
    return cache


def kv_cache_nbytes(cache: Cache) -> int:
    """Bytes of keys and values a cache holds (a dropped layer's expanded zeros count once)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, _ZeroLayer):
            total += layer.nbytes()
        elif getattr(layer, "is_initialized", False) and isinstance(layer, CacheLayerMixin):
            total += layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
    return total


def keep_dropped_layers_out_of_caches(model: torch.nn.Module, layers: Iterable[int]) -> None:
    """Make ``model.generate`` free the dropped ``layers``' slots of every cache it creates. A
    cache the caller passes (``past_key_values=``) is left as it is: it still works, holding
    zeros for those layers (see ``free_dropped_layers`` to free it)."""
    layers = sorted(set(layers))
    prepare = getattr(model, "_prepare_cache_for_generation", None)  # bound to this instance's class
    if not layers or prepare is None:
        return  # nothing dropped, or not a model with HF generate(): its caches are the caller's

    def prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs):
        given = _generate_cache(model_kwargs)
        result = prepare(generation_config, model_kwargs, *args, **kwargs)
        cache = _generate_cache(model_kwargs)
        if cache is not None and cache is not given:
            try:
                free_dropped_layers(getattr(cache, "self_attention_cache", cache), layers)
            except (TypeError, ValueError) as exc:
                # e.g. sliding-window slots: the cache still works, holding zeros for those layers
                warnings.warn(f"generate(): the dropped attention layers keep their cache slots: {exc}", stacklevel=2)
        return result

    model._prepare_cache_for_generation = prepare_cache_for_generation  # this instance only
    model._lqc_dropped_attention = layers


def _generate_cache(model_kwargs: dict):
    """The cache generate() keeps in its model kwargs: under ``cache`` from transformers 5.24 on,
    ``past_key_values`` before."""
    return model_kwargs.get("cache", model_kwargs.get("past_key_values"))


class DroppedCompensation(torch.nn.Module):
    """What a compensated drop adds to the stream instead of the sublayer's output (drop_layers'
    ``compensation``): ``x W^T + bias`` (low rank: through ``down`` then ``up``), or ``scale * x + bias``,
    or ``bias``; its tensors come
    from the checkpoint (``{module}.compensation.weight`` / ``.bias`` / ``.scale`` / ``.down.weight`` /
    ``.up.weight``), so it is built empty and takes whatever of them the state dict holds."""

    PARTS = ("weight", "bias", "scale", "down.weight", "up.weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = dict(self.named_buffers())
        if "scale" in parts:
            return x * parts["scale"] + parts["bias"]
        if "weight" not in parts and "up.weight" not in parts:
            return parts["bias"].expand(x.shape)
        # the ops of the compressed graph (drop_compensation.insert_compensation), for the same values
        if "down.weight" in parts:
            x = torch.matmul(x, torch.t(parts["down.weight"]))
        return torch.add(torch.matmul(x, torch.t(parts.get("weight", parts.get("up.weight")))), parts["bias"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for part in self.PARTS:
            key = prefix + part
            if key not in state_dict:
                continue
            child, _, name = part.rpartition(".")
            if child and child not in self._modules:
                self.add_module(child, torch.nn.Module())
            owner = self._modules[child] if child else self
            if name not in owner._buffers:
                owner.register_buffer(name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class _Compensated(torch.nn.Module):
    """A stand-in that grows a ``compensation`` child when the state dict it loads holds one."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if "compensation" not in self._modules and any(k.startswith(prefix + "compensation.") for k in state_dict):
            self.compensation = DroppedCompensation()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        compensation = self._modules.get("compensation")
        return torch.zeros_like(hidden_states) if compensation is None else compensation(hidden_states)


class DroppedAttention(_Compensated):
    """Stands in for a dropped attention module in a loaded model: it contributes zeros to the
    residual stream, or its compensation of its input. It still hands the cache its (zero) keys and
    values, so that a cache built without ``free_dropped_layers`` keeps every layer the same length."""

    def __init__(self, layer_idx: int, num_key_value_heads: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, past_key_values: Cache | None = None,
                cache: Cache | None = None, **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24 passes `cache`
        if past_key_values is not None:
            batch, length = hidden_states.shape[:2]
            zeros = hidden_states.new_zeros(batch, self.num_key_value_heads, length, self.head_dim)
            past_key_values.update(zeros, zeros, self.layer_idx)
        return self._output(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class DroppedMLP(_Compensated):
    """Stands in for a dropped FFN module in a loaded model: it contributes zeros, or its
    compensation of its input."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self._output(hidden_states)
