"""A compressed KV cache that Hugging Face ``generate()`` uses as it is: KIVI-style quantization,
StreamingLLM and SnapKV eviction.

Per attention layer (``CompressedKVLayer``), the tokens kept are held in three parts, in order:

- the first ``sinks`` tokens in full precision (attention sinks: every later query attends to them);
- quantized tokens (``bits`` = 8, 4 or 2; lqc.runtime.kv.quant), in closed blocks of ``group``
  tokens: keys per channel over the block, values per token in groups of ``group`` channels;
- the most recent tokens in full precision: at least ``residual`` of them (once that many
  exist), at most ``residual + group - 1``. Whenever ``group`` tokens older than the most recent
  ``residual`` accumulate, they close into a quantized block. With ``bits=None`` nothing is
  quantized and every kept token stays here.

Eviction (opt-in), applied after each step's attention:

- ``window=W`` (StreamingLLM): keep the sinks and the most recent W tokens; older quantized
  blocks are dropped whole, so between W and W + group - 1 recent tokens remain.
- ``snapkv=K`` (SnapKV): after a prompt (a step of more than K + ``observation`` new tokens), its
  full-precision tokens before the last ``observation`` are scored by how much the last
  ``observation`` queries attend to them (summed over the query heads of each KV head, max-pooled
  over 7 neighbours) and only the top K per KV head are kept. GQA-aware: one choice per KV head.

A sliding-window layer (``sliding_window=W``: Gemma 2/3's and Mistral's local attention) keeps at
least the most recent W - 1 tokens, as transformers' ``DynamicSlidingWindowLayer`` does; tokens
older than that are evicted like the StreamingLLM window's (whole quantized blocks), and those that
remain past the window are masked by the sliding mask itself (lqc.runtime.kv.attention).

Kept tokens keep the rotary positions they were computed at; the cache records each one's
position, and ``get_seq_length`` counts every token seen, so new tokens get their true positions.

``update`` counts the new tokens and returns them as a ``PendingKV`` for lqc's attention
(lqc.runtime.kv.attention): its op ``lqc::kv_attention`` calls ``append``, reads the codes
directly, then calls ``settle`` to close blocks and evict. The tensors are only touched inside
that op, which torch.compile treats as opaque. ``CompressedKVCache`` switches the model's config
to that attention when it is built; if something switches it back, ``update`` appends at once and
returns dequantized tensors instead (eviction needs lqc's attention and says so).

``CompressedKVCache(config, bits=4, group=64, residual=128, sinks=4, dropped=...)`` is a
transformers ``Cache``: pass it as ``past_key_values`` to ``generate()`` or a forward call. Layers
in ``dropped`` (attention removed by ``drop_layers``) get slots that hold nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from lqc.ir.lqc_ops import KVStore

from lqc.runtime.structural.dropped_layers import DroppedDynamicLayer
from lqc.runtime.kv.attention import CompressedKVView, PendingKV, reads_codes, use_compressed_attention
from lqc.runtime.kv.quant import check_kv_options, quantize_keys, quantize_values

SNAPKV_POOL = 7  # SnapKV max-pools token scores so kept tokens come with their neighbours


def attention_head_dim(config) -> int:
    """Channels per attention head of a Hugging Face config (``head_dim``, or hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def float_kv_bytes_per_token(config, element_bytes: int, layers: int | None = None) -> int:
    """Bytes per token of an uncompressed cache: keys and values x layers x KV heads x head_dim."""
    layers = config.num_hidden_layers if layers is None else layers
    return layers * 2 * config.num_key_value_heads * attention_head_dim(config) * element_bytes


def check_cache_options(bits, group, residual, sinks, window, snapkv, observation, head_dim=None) -> None:
    if bits is not None and head_dim is not None:
        check_kv_options(bits, group, head_dim)
    elif bits is not None:
        check_kv_options(bits, group, group)
    if residual < 0 or sinks < 0:
        raise ValueError(f"residual and sinks must be >= 0; got residual {residual}, sinks {sinks}")
    if window is not None and window < 1:
        raise ValueError(f"the StreamingLLM window must be at least 1 token; got {window}")
    if snapkv is not None and (snapkv < 1 or observation < 1):
        raise ValueError(f"SnapKV keeps snapkv >= 1 tokens scored by observation >= 1 queries; got {snapkv}, {observation}")


class CompressedKVLayer(CacheLayerMixin):
    is_croppable = False
    is_compileable = False

    def __init__(self, bits: int | None = 4, group: int = 64, residual: int = 128, sinks: int = 4,
                 window: int | None = None, snapkv: int | None = None, observation: int = 32, config=None,
                 sliding_window: int | None = None):
        super().__init__()
        check_cache_options(bits, group, residual, sinks, window, snapkv, observation)
        if sliding_window is not None and sliding_window < 2:
            raise ValueError(f"a sliding window covers at least 2 tokens; got {sliding_window}")
        self.bits, self.group, self.residual, self.sinks = bits, group, residual, sinks
        self.window, self.snapkv, self.observation = window, snapkv, observation
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None  # transformers builds this layer a sliding mask
        self.config = config  # whose attention implementation says whether attention reads codes
        self.store = KVStore(self)  # what lqc::kv_attention receives
        self.keys = self.quantized = None
        self.seen = 0  # tokens given to update (lqc::kv_attention appends them after update returns)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self.bits is not None:
            check_kv_options(self.bits, self.group, key_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.sink_keys, self.sink_values = key_states[..., :0, :], value_states[..., :0, :]
        self.keys, self.values = self.sink_keys, self.sink_values  # the full-precision recent tokens
        self.quantized = None  # (keys, values) QuantizedKV, or None before the first block closes
        self.positions = None  # [B, H, T] int64 once tokens were evicted; before, stored = 0..T-1
        self.appended, self.unsettled = 0, False

    @property
    def stored_tokens(self) -> int:
        if self.keys is None:
            return 0
        quantized = self.quantized[0].tokens if self.quantized else 0
        return self.sink_keys.shape[-2] + quantized + self.keys.shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # traced by torch.compile: only the count is Python state here; the tensors change inside lqc::kv_attention
        self.is_initialized = True
        self.seen += key_states.shape[-2]
        if reads_codes(self.config):
            pending = PendingKV(self.store, key_states, value_states)
            return pending, pending
        if self.kept_window is not None or self.snapkv is not None:
            raise ValueError(
                "eviction (StreamingLLM, SnapKV, a sliding window's) needs lqc's KV attention, and this model's config was switched away "
                "from it; call lqc.runtime.kv.attention.use_compressed_attention(model.config)"
            )
        return self.dequantized_update(key_states, value_states)

    def dequantized_update(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append and return every stored token as tensors, for attentions that do not read codes."""
        keys, values = self.append(key_states, value_states).dequantized()
        self.settle()
        return keys, values

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> CompressedKVView:
        """Store the new tokens (full precision until ``settle``) and return what attention reads."""
        if self.keys is None:
            self.lazy_initialization(key_states, value_states)
        self.settle()  # a step whose attention never settled
        new = key_states.shape[-2]
        take = max(0, min(self.sinks - self.sink_keys.shape[-2], new))
        if take:
            self.sink_keys = torch.cat([self.sink_keys, key_states[..., :take, :]], dim=-2)
            self.sink_values = torch.cat([self.sink_values, value_states[..., :take, :]], dim=-2)
        self.keys = torch.cat([self.keys, key_states[..., take:, :]], dim=-2)
        self.values = torch.cat([self.values, value_states[..., take:, :]], dim=-2)
        if self.positions is not None:
            b, h = key_states.shape[:2]
            fresh = torch.arange(self.appended, self.appended + new, device=self.device).expand(b, h, new)
            self.positions = torch.cat([self.positions, fresh], dim=-1)
        self.appended += new
        self.unsettled = True
        return CompressedKVView(self.sink_keys, self.sink_values, self.quantized, self.keys, self.values, self.positions)

    def importance_window(self, query_length: int) -> int:
        """Queries whose attention scores the prompt for SnapKV this step (0: no SnapKV now)."""
        if self.snapkv is None or query_length <= self.snapkv + self.observation:
            return 0
        return self.observation

    def settle(self, importance: torch.Tensor | None = None) -> None:
        """After a step's attention: SnapKV selection (given ``importance`` [B, H, recent tokens]),
        closing blocks, the StreamingLLM window."""
        if not self.unsettled:
            return
        self.unsettled = False
        if importance is not None:
            self._keep_top_tokens(importance)
        if self.bits is not None:
            self._close_blocks()
        if self.kept_window is not None:
            self._evict_outside_window()

    @property
    def kept_window(self) -> int | None:
        """Recent tokens eviction keeps at least: the StreamingLLM window, or the W - 1 past tokens a
        sliding window of W can still attend to, whichever is smaller; None: no eviction."""
        windows = [w for w in (self.window, self.sliding_window and self.sliding_window - 1) if w]
        return min(windows) if windows else None

    def _close_blocks(self) -> None:
        blocks = max(0, (self.keys.shape[-2] - self.residual) // self.group)
        if not blocks:
            return
        closing = slice(0, blocks * self.group)
        keys = quantize_keys(self.keys[..., closing, :], self.bits, self.group)
        values = quantize_values(self.values[..., closing, :], self.bits, self.group)
        self.quantized = (keys, values) if self.quantized is None else (self.quantized[0].append(keys), self.quantized[1].append(values))
        # keep a copy of the recent tokens only: a slice would keep the closed ones alive
        self.keys = self.keys[..., closing.stop :, :].clone()
        self.values = self.values[..., closing.stop :, :].clone()

    def _track_positions(self) -> torch.Tensor:
        if self.positions is None:
            b, h = self.keys.shape[:2]
            self.positions = torch.arange(self.stored_tokens, device=self.device).expand(b, h, -1).contiguous()
        return self.positions

    def _evict_outside_window(self) -> None:
        quantized = self.quantized[0].tokens if self.quantized else 0
        recent = self.keys.shape[-2]
        # whole blocks first, while the rest still covers the window; then recent tokens, if no block is left
        window = self.kept_window
        drop_quantized = min(quantized, max(0, quantized + recent - window) // self.group * self.group)
        drop_recent = max(0, recent - window) if drop_quantized == quantized else 0
        if not drop_quantized and not drop_recent:
            return
        positions = self._track_positions()
        sinks = self.sink_keys.shape[-2]
        if drop_quantized:
            keys, values = self.quantized
            self.quantized = None if drop_quantized == quantized else (
                keys.tokens_slice(drop_quantized, quantized).clone(), values.tokens_slice(drop_quantized, quantized).clone())
        if drop_recent:  # copies: slices would keep the evicted tokens alive
            self.keys, self.values = self.keys[..., drop_recent:, :].clone(), self.values[..., drop_recent:, :].clone()
        kept = torch.cat([positions[..., :sinks], positions[..., sinks + drop_quantized : sinks + quantized],
                          positions[..., sinks + quantized + drop_recent :]], dim=-1)
        self.positions = kept.contiguous()

    def _keep_top_tokens(self, importance: torch.Tensor) -> None:
        recent = self.keys.shape[-2]
        candidates = recent - self.observation
        if candidates <= self.snapkv:
            return
        pooled = F.max_pool1d(importance[..., :candidates].to(torch.float32).flatten(0, 1)[:, None], SNAPKV_POOL,
                              stride=1, padding=SNAPKV_POOL // 2)[:, 0].reshape(*importance.shape[:2], candidates)
        top = pooled.topk(self.snapkv, dim=-1).indices.sort(dim=-1).values  # keep them in position order
        keep = torch.cat([top, torch.arange(candidates, recent, device=top.device).expand(*top.shape[:2], -1)], dim=-1)
        positions = self._track_positions()
        older = positions.shape[-1] - recent
        self.positions = torch.cat([positions[..., :older], positions[..., older:].gather(-1, keep)], dim=-1)
        index = keep[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(-2, index), self.values.gather(-2, index)

    def get_seq_length(self) -> int:
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # masks are built over positions; lqc's attention gathers the columns of the kept tokens
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes stored: full-precision sinks and recent tokens, the quantized codes, scales and
        zeros, and the kept tokens' positions once tokens were evicted."""
        if self.keys is None:
            return 0
        tensors = [self.sink_keys, self.sink_values, self.keys, self.values]
        tensors += [self.positions] if self.positions is not None else []
        full = sum(t.numel() * t.element_size() for t in tensors)
        return full + (sum(q.nbytes() for q in self.quantized) if self.quantized else 0)

    def quantized_nbytes_per_token(self) -> float | None:
        """Bytes per quantized token (codes, scales, zeros of keys and values), None before any."""
        if not self.quantized:
            return None
        return sum(q.nbytes() for q in self.quantized) / self.quantized[0].tokens

    def reset(self) -> None:
        self.keys = self.quantized = None
        self.seen = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.keys is None:
            return
        index = beam_idx.to(self.device)
        for name in ("sink_keys", "sink_values", "keys", "values", "positions"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, index))
        if self.quantized:
            self.quantized = tuple(q.index_batch(index) for q in self.quantized)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed KV cache cannot be cropped (assisted decoding); use DynamicCache for it")


class CompressedKVCache(Cache):
    """One ``CompressedKVLayer`` per decoder layer of ``config`` (full attention, or sliding-window
    attention with the layer's window). Switches ``config`` to lqc's KV attention (other caches keep
    the attention the config had)."""

    def __init__(self, config, bits: int | None = 4, group: int = 64, residual: int = 128, sinks: int = 4,
                 window: int | None = None, snapkv: int | None = None, observation: int = 32,
                 dropped: Iterable[int] = ()):
        from transformers.cache_utils import get_layer_types_and_kwargs

        text_config = config.get_text_config(decoder=True)
        kinds, kwargs = get_layer_types_and_kwargs(text_config)
        unsupported = sorted(set(kinds) - {"full_attention", "sliding_attention"})
        if unsupported:
            raise ValueError(f"CompressedKVCache supports full and sliding-window attention layers; this model also has "
                             f"{unsupported}")
        check_cache_options(bits, group, residual, sinks, window, snapkv, observation, attention_head_dim(text_config))
        use_compressed_attention(config)
        dropped = set(dropped)
        layers = [DroppedDynamicLayer() if i in dropped else
                  CompressedKVLayer(bits, group, residual, sinks, window, snapkv, observation, config=text_config,
                                    sliding_window=kwargs[i].get("sliding_window"))
                  for i in range(len(kinds))]
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, CompressedKVLayer))


def kv_cache_report(config, context: int, *, element_bytes: int = 2, dropped: Iterable[int] = (), **options) -> dict:
    """KV bytes of one sequence at ``context`` tokens, with ``CompressedKVCache`` ``options``
    (bits, group, residual, sinks, window), against transformers' own float cache of
    ``element_bytes`` (2: float16). Measured, not estimated: for each kind of layer (full attention,
    or sliding-window attention with its window W) one layer's cache is filled with ``context``
    tokens of zeros in ``element_bytes`` floats and counted, times the layers of that kind that hold
    a cache (the float cache counts every layer, ``dropped`` ones too). A sliding layer keeps the
    last W - 1 tokens in either cache (transformers' DynamicSlidingWindowLayer), so past its window
    it costs what W - 1 tokens cost. SnapKV depends on the prompt's attention, so it is not reported
    here."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    if options.get("snapkv") is not None:
        raise ValueError("kv_cache_report: SnapKV keeps what the prompt's attention selects; report it from a real cache's nbytes()")
    if context < 1:
        raise ValueError(f"the context must be at least 1 token; got {context}")
    text_config = config.get_text_config(decoder=True)
    dtype = {2: torch.float16, 4: torch.float32}[element_bytes]
    heads, head_dim = text_config.num_key_value_heads, attention_head_dim(text_config)
    _, kwargs = get_layer_types_and_kwargs(text_config)
    every_window = [kw.get("sliding_window") for kw in kwargs]  # None: full attention
    windows = [w for i, w in enumerate(every_window) if i not in set(dropped)]
    filled = {}
    for window in set(windows):  # one filled layer per kind
        layer = filled[window] = CompressedKVLayer(**options, sliding_window=window)
        zeros = torch.zeros(1, heads, context, head_dim, dtype=dtype)
        layer.append(zeros, zeros)
        layer.settle()
    total = sum(filled[w].nbytes() for w in windows)
    # the float cache is the whole model's, dropped layers included: what the user had before lqc
    float_tokens = sum(context if w is None else min(context, w - 1) for w in every_window)
    float_total = float_kv_bytes_per_token(text_config, element_bytes, layers=1) * float_tokens
    per_quantized = next((p for p in (layer.quantized_nbytes_per_token() for layer in filled.values()) if p), None)
    layers = len(windows)
    return {"context": context, "layers_with_cache": layers, "stored_tokens_per_layer": [filled[w].stored_tokens for w in windows],
            "total_bytes": total, "bytes_per_token": total / context, "float_bytes": float_total,
            "vs_float": total / float_total,
            "bytes_per_quantized_token": per_quantized * layers if per_quantized else None,
            "per_quantized_token_vs_float": per_quantized * layers / float_kv_bytes_per_token(text_config, element_bytes)
            if per_quantized else None}
