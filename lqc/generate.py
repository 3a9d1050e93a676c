"""``lqc.generate``: a plain decode loop over any cache, for people who do not use HF ``generate()``.

    tokens = lqc.generate(model, input_ids, max_new_tokens=64, kv={"bits": 4})

``kv`` builds a ``CompressedKVCache`` (lqc.runtime.kv.cache) with those options, skipping the
attention layers a ``drop_layers`` pass removed from a model ``lqc.compress`` returned; ``cache``
passes one you built instead (a transformers ``DynamicCache`` when neither is given). The prompt
goes through the model ``prefill_chunk`` tokens at a time (all at once by default), then one
token per step: greedy at ``temperature=0``, else sampled from the softmax at that temperature
(optionally restricted to the ``top_k`` most likely tokens). Rows that produced ``eos_token_id``
keep producing it. Returns the prompt and the new tokens, [batch, prompt + max_new_tokens] (fewer
when every row stopped early).

Its arguments are checked before the model runs (lqc.compress.check_prompt): the prompt must be
non-empty integer ids [batch, tokens] inside the vocabulary and on the model's device, and the
prompt plus ``max_new_tokens`` must fit the model's positions; the model must not be on the meta
device. The ids the loop feeds back come from the logits, so they are in range by construction.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lqc.ir.errors import LqcConfigError
from lqc.runtime.kv.cache import CompressedKVCache

from .compress import check_model, check_prompt


def kv_cache_for(model: torch.nn.Module, **options) -> CompressedKVCache:
    """A ``CompressedKVCache`` for ``model``, without slots for attention ``lqc.compress`` dropped."""
    dropped = getattr(model, "_lqc_dropped_attention", ())
    return CompressedKVCache(model.config, dropped=dropped, **options)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    kv: dict | None = None,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    prefill_chunk: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    if kv is not None and cache is not None:
        raise LqcConfigError("lqc.generate: pass kv= (options for a CompressedKVCache) or cache= (a cache you built), not both")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
        raise LqcConfigError(f"lqc.generate: max_new_tokens (an int) and temperature must be >= 0 and top_k >= 1; "
                             f"got {max_new_tokens!r}, {temperature!r}, {top_k!r}")
    if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise LqcConfigError(f"lqc.generate: prefill_chunk must be a number of tokens >= 1, or None for the whole "
                             f"prompt at once; got {prefill_chunk!r}")
    check_model(model, "lqc.generate")
    check_prompt(model, input_ids, "lqc.generate(input_ids=...)", new_tokens=max_new_tokens)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise LqcConfigError(f"lqc.generate: attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                             f"got {got}. Pass the mask the tokenizer returned with these ids, or none")
    if cache is None:
        cache = kv_cache_for(model, **kv) if kv is not None else DynamicCache(config=model.config)
    chunk = prefill_chunk or input_ids.shape[1]
    mask = attention_mask
    for start in range(0, input_ids.shape[1], chunk):
        stop = min(start + chunk, input_ids.shape[1])
        logits = model(input_ids=input_ids[:, start:stop], cache=cache, use_cache=True,
                       attention_mask=None if mask is None else mask[:, :stop], logits_to_keep=1).logits
    tokens = [input_ids]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        token = _next_token(logits[:, -1], temperature, top_k, generator)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        tokens.append(token[:, None])
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = model(input_ids=token[:, None], cache=cache, use_cache=True, attention_mask=mask).logits
    return torch.cat(tokens, dim=1)


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]
