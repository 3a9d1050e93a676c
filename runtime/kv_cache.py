"""A KIVI-style quantized KV cache that Hugging Face ``generate()`` uses as it is.

Per attention layer (``QuantizedKVLayer``), the tokens seen so far are held in three parts:

- the first ``sinks`` tokens in full precision (attention sinks: every later query attends to them);
- closed blocks of ``group`` tokens, quantized (lqc.runtime.kv_quant): keys per channel over the
  block, values per token in groups of ``group`` channels;
- the most recent tokens in full precision: at least ``residual`` of them (once that many
  exist), at most ``residual + group - 1``. Whenever ``group`` tokens older than the most recent
  ``residual`` accumulate, they close into a quantized block.

``update`` returns the keys and values attention reads: the stored parts, dequantized, with the
new tokens in full precision (they are quantized, if at all, after this step, as in KIVI's
decode). This cache dequantizes the closed blocks on every read; an attention that reads the
codes directly comes with the graph rewrite of the KV-cache pass.

``QuantizedKVCache(config, bits=4, group=64, residual=128, sinks=4, dropped=...)`` is a
transformers ``Cache``: pass it as ``past_key_values`` to ``generate()`` or a forward call. Layers
in ``dropped`` (attention removed by ``drop_layers``) get slots that hold nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .dropped_layers import DroppedDynamicLayer
from .kv_quant import QuantizedKV, check_kv_options, dequantize, quantize_keys, quantize_values


def attention_head_dim(config) -> int:
    """Channels per attention head of a Hugging Face config (``head_dim``, or hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def float_kv_bytes_per_token(config, element_bytes: int, layers: int | None = None) -> int:
    """Bytes per token of an uncompressed cache: keys and values x layers x KV heads x head_dim."""
    layers = config.num_hidden_layers if layers is None else layers
    return layers * 2 * config.num_key_value_heads * attention_head_dim(config) * element_bytes


class QuantizedKVLayer(CacheLayerMixin):
    is_sliding = False
    is_croppable = False
    is_compileable = False

    def __init__(self, bits: int = 4, group: int = 64, residual: int = 128, sinks: int = 4):
        super().__init__()
        if residual < 0 or sinks < 0:
            raise ValueError(f"residual and sinks must be >= 0; got residual {residual}, sinks {sinks}")
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        self.blocks: list[tuple[QuantizedKV, QuantizedKV]] = []

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        check_kv_options(self.bits, self.group, key_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = key_states[..., :0, :]
        self.sink_keys, self.sink_values = empty, value_states[..., :0, :]
        self.keys, self.values = empty, value_states[..., :0, :]  # the full-precision recent tokens
        self.blocks = []
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        take = max(0, min(self.sinks - self.sink_keys.shape[-2], key_states.shape[-2]))
        if take:
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :take, :]], dim=-2)
        self.keys = torch.cat([self.keys, key_states[..., take:, :]], dim=-2)
        self.values = torch.cat([self.values, value_states[..., take:, :]], dim=-2)
        keys = torch.cat([self.sink_keys, *(dequantize(k, self.dtype) for k, _ in self.blocks), self.keys], dim=-2)
        values = torch.cat([self.sink_values, *(dequantize(v, self.dtype) for _, v in self.blocks), self.values], dim=-2)
        closed = 0
        while self.keys.shape[-2] - closed - self.group >= self.residual:
            oldest = slice(closed, closed + self.group)
            self.blocks.append((quantize_keys(self.keys[..., oldest, :], self.bits),
                                quantize_values(self.values[..., oldest, :], self.bits, self.group)))
            closed += self.group
        if closed:  # keep a copy of the recent tokens only: a slice would keep the closed ones alive
            self.keys, self.values = self.keys[..., closed:, :].clone(), self.values[..., closed:, :].clone()
        return keys, values

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.sink_keys.shape[-2] + sum(k.tokens for k, _ in self.blocks) + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes stored: full-precision sinks and recent tokens, plus the blocks' codes, scales and zeros."""
        if not self.is_initialized:
            return 0
        full = sum(t.numel() * t.element_size() for t in (self.sink_keys, self.sink_values, self.keys, self.values))
        return full + sum(k.nbytes() + v.nbytes() for k, v in self.blocks)

    def reset(self) -> None:
        self.blocks = []
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if not self.is_initialized:
            return
        index = beam_idx.to(self.device)
        for name in ("sink_keys", "sink_values", "keys", "values"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        for block in self.blocks:
            for q in block:
                q.codes, q.scales, q.zeros = (t.index_select(0, index) for t in (q.codes, q.scales, q.zeros))

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized KV cache cannot be cropped (assisted decoding); use DynamicCache for it")


class QuantizedKVCache(Cache):
    """One ``QuantizedKVLayer`` per decoder layer of ``config`` (full attention only)."""

    def __init__(self, config, bits: int = 4, group: int = 64, residual: int = 128, sinks: int = 4,
                 dropped: Iterable[int] = ()):
        config = config.get_text_config(decoder=True)
        kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
        if kinds != {"full_attention"}:
            raise ValueError(f"QuantizedKVCache supports full-attention layers only; this model has {sorted(kinds)}")
        check_kv_options(bits, group, attention_head_dim(config))
        dropped = set(dropped)
        layers = [DroppedDynamicLayer() if i in dropped else QuantizedKVLayer(bits, group, residual, sinks)
                  for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
