"""Palu-style low-rank keys and values: at full rank the model is unchanged (keys rebuilt before
RoPE, the value up-projection folded into o_proj, biases included), the cache holds the latents,
whitening minimizes the error on the calibration activations, and errors name the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from lqc.runtime.kv.cache import CompressedKVCache
from lqc.runtime.kv.lowrank import LowRankKVAttention, lowrank_kv, whitened_factors


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_full_rank_is_the_model(tiny_llama, token_ids):
    """rank 1: logits within 1e-5 of the model's, at once and fed in chunks through a cache."""
    with torch.no_grad():
        expected = tiny_llama(token_ids).logits
        model = lowrank_kv(copy.deepcopy(tiny_llama), rank=1.0)
        assert isinstance(model.model.layers[0].self_attn, LowRankKVAttention)
        assert _relative(model(token_ids).logits, expected) < 1e-5
        cache = DynamicCache(config=model.config)
        chunked = torch.cat([model(token_ids[:, i : i + 5], cache=cache).logits for i in range(0, 12, 5)], dim=1)
        assert _relative(chunked, expected) < 1e-5
        assert cache.layers[0].keys.shape == (1, 1, 12, 32)  # one latent of rank 2 KV heads x 16 per token
        assert torch.equal(model.generate(token_ids, max_new_tokens=8, do_sample=False),
                           tiny_llama.generate(token_ids, max_new_tokens=8, do_sample=False))


def test_biases_fold_through():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for attention in (model.model.layers[0].self_attn,):
        for proj in (attention.k_proj, attention.v_proj, attention.o_proj):
            proj.bias.data.normal_()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _relative(lowrank_kv(copy.deepcopy(model), rank=1.0)(ids).logits, model(ids).logits) < 1e-5


def test_half_rank_latents_are_quantized_by_a_compressed_cache(tiny_llama, token_ids):
    """rank 0.5 whitened on calibration ids: a 16-number latent per token for keys and for
    values; an int8 CompressedKVCache over the latents changes the logits by under 1e-2."""
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    model = lowrank_kv(copy.deepcopy(tiny_llama), rank=0.5, calibration=calibration)
    with torch.no_grad():
        reference = model(token_ids).logits
        cache = CompressedKVCache(model.config, bits=8, group=4, residual=2, sinks=1)
        got = torch.cat([model(token_ids[:, i : i + 4], cache=cache).logits for i in range(0, 12, 4)], dim=1)
    assert cache.layers[0].quantized[0].codes.shape[-1] == 16
    assert _relative(got, reference) < 1e-2


def test_whitening_minimizes_the_error_on_the_activations():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=g, dtype=torch.float64)
    x = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.logspace(-2, 1, 16, dtype=torch.float64)
    errors = {}
    for name, gram in (("plain", None), ("whitened", x.T @ x)):
        up, down = whitened_factors(weight, 6, gram)
        errors[name] = (x @ (weight - up @ down).T).norm().item()
    assert errors["whitened"] < 0.8 * errors["plain"]


def test_errors_name_the_fix(tiny_llama):
    with pytest.raises(ValueError, match=r"rank is the fraction of KV heads x head_dim kept, in \(0, 1\]; got 0"):
        lowrank_kv(tiny_llama, rank=0)
    with pytest.raises(ValueError, match=r"lowrank_kv needs Llama-style attention modules .* has 0 such modules"):
        lowrank_kv(torch.nn.Sequential(torch.nn.Linear(4, 4)))
