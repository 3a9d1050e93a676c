"""The KIVI-style quantized KV cache: packing round trips, quantization error within half a step,
the cache's three parts (sinks, quantized blocks, full-precision recent tokens), generate()
through it on tiny Llama, its byte count, and errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from lqc.runtime.kv_cache import QuantizedKVCache, QuantizedKVLayer
from lqc.runtime.kv_quant import dequantize, pack, quantize_keys, quantize_values, unpack


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_round_trips(bits):
    codes = torch.randint(0, 2**bits, (2, 3, 5, 16), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (2, 3, 5, 16 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_keys_per_channel_and_values_per_token_within_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 64, 32, generator=g) * torch.linspace(0.1, 10, 32)  # channels of very different ranges
    keys, values = quantize_keys(x, bits), quantize_values(x, bits, group=16)
    assert keys.scales.shape == (1, 2, 1, 32)  # one per channel of the block
    assert values.scales.shape == (1, 2, 64, 2)  # one per token and group of 16 channels
    for q, step in ((keys, keys.scales.float()), (values, values.scales.float().repeat_interleave(16, dim=-1))):
        error = (dequantize(q) - x).abs()
        assert (error <= step / 2 + 1e-3 * step + 1e-6).all()


def _states(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, 8, generator=g), torch.randn(1, 2, tokens, 8, generator=g)


def test_layer_keeps_sinks_and_recent_tokens_exact_and_quantizes_the_middle():
    layer = QuantizedKVLayer(bits=4, group=4, residual=6, sinks=2)
    k, v = _states(20, 1)
    seen_k = []
    for start in range(0, 20, 3):  # chunks of 3 tokens
        out_k, out_v = layer.update(k[..., start : start + 3, :], v[..., start : start + 3, :])
        seen_k.append(out_k)
        end = min(start + 3, 20)
        assert out_k.shape[-2] == end and layer.get_mask_sizes(1) == (end + 1, 0)
        # the new tokens come back exact
        assert torch.equal(out_k[..., start:end, :], k[..., start:end, :])
    assert layer.get_seq_length() == 20
    assert torch.equal(layer.sink_keys, k[..., :2, :])
    recent = layer.keys.shape[-2]
    assert 6 <= recent < 6 + 4 and torch.equal(layer.keys, k[..., 20 - recent :, :])
    assert sum(b.tokens for b, _ in layer.blocks) == 20 - 2 - recent and all(b.tokens == 4 for b, _ in layer.blocks)
    # the quantized middle is close, not exact
    final_k, _ = layer.update(*_states(1, 2))
    middle = final_k[..., 2 : 20 - recent, :]
    assert not torch.equal(middle, k[..., 2 : 20 - recent, :])
    assert ((middle - k[..., 2 : 20 - recent, :]).norm() / k.norm()).item() < 0.1


def test_byte_count_of_int4_is_near_a_quarter_of_float16():
    layer = QuantizedKVLayer(bits=4, group=64, residual=0, sinks=0)
    k, v = torch.randn(1, 3, 256, 64), torch.randn(1, 3, 256, 64)
    layer.update(k, v)  # with no recent window every full block closes at once
    assert len(layer.blocks) == 4 and layer.keys.shape[-2] == 0
    float16 = 2 * k.numel() * 2
    # codes: 0.5 byte per element; key scale + zero per channel per 64 tokens, value scale + zero per token
    assert layer.nbytes() == k.numel() // 2 * 2 + 3 * (256 // 64) * 64 * 4 + 3 * 256 * 4
    assert layer.nbytes() / float16 <= 0.3


def test_generate_through_the_cache(tiny_llama, token_ids):
    """tiny Llama: int8 KV, with blocks closing during generation, gives the float cache's tokens."""
    with torch.no_grad():
        expected = tiny_llama.generate(token_ids, max_new_tokens=12, do_sample=False, past_key_values=DynamicCache(config=tiny_llama.config))
        cache = QuantizedKVCache(tiny_llama.config, bits=8, group=4, residual=4, sinks=1)
        got = tiny_llama.generate(token_ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
        assert torch.equal(got, expected)
        assert cache.get_seq_length() == got.shape[1] - 1
        assert any(layer.blocks for layer in cache.layers)


def test_generate_of_a_compressed_model_through_the_cache(tiny_llama, token_ids):
    """The cache works with a model lqc.compress compiled: the same tokens as the eager model with it."""
    import lqc

    compressed = lqc.compress(tiny_llama, "default", progress=False)
    with torch.no_grad():
        runs = [model.generate(token_ids, max_new_tokens=12, do_sample=False,
                               past_key_values=QuantizedKVCache(tiny_llama.config, bits=4, group=4, residual=4, sinks=1))
                for model in (tiny_llama, compressed)]
    assert torch.equal(runs[0], runs[1])


def test_dropped_layers_hold_no_cache(tiny_llama, token_ids):
    from lqc.runtime.dropped_layers import DroppedDynamicLayer

    cache = QuantizedKVCache(tiny_llama.config, bits=4, group=4, residual=4, sinks=1, dropped=[0])
    assert isinstance(cache.layers[0], DroppedDynamicLayer) and isinstance(cache.layers[1], QuantizedKVLayer)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bits": 3}, r"KV bits must be one of 8, 4, 2; got 3"),
        ({"group": 0}, r"the KV group size must be positive; got 0"),
        ({"group": 12}, r"groups of 12 channels, which do not divide head_dim 16; use a group that divides 16, or one of at least 16"),
    ],
)
def test_option_errors(tiny_llama, options, message):
    with pytest.raises(ValueError, match=message):
        QuantizedKVCache(tiny_llama.config, **options)


def test_crop_names_the_alternative():
    with pytest.raises(NotImplementedError, match=r"cannot be cropped .* use DynamicCache"):
        QuantizedKVLayer().crop(-1)

