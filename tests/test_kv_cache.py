"""The compressed KV cache: packing round trips, quantization error within half a step, attention
that reads the codes (against attention over the dequantized cache), the cache's three parts
(sinks, quantized blocks, full-precision recent tokens), StreamingLLM and SnapKV eviction,
generate() through it on tiny Llama, its byte count, and errors that name the fix."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lqc.runtime.kv import attention as kv_attention
from lqc.runtime.kv.attention import compressed_attention
from lqc.runtime.kv.cache import CompressedKVCache, CompressedKVLayer
from lqc.runtime.kv.quant import dequantize, key_scores, mix_values, pack, quantize_keys, quantize_values, unpack


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
    keys, values = quantize_keys(x, bits, group=16), quantize_values(x, bits, group=16)
    assert keys.scales.shape == (1, 2, 4, 32)  # one per channel and block of 16 tokens
    assert values.scales.shape == (1, 2, 64, 2)  # one per token and group of 16 channels
    key_step = keys.scales.float().repeat_interleave(16, dim=-2)
    value_step = values.scales.float().repeat_interleave(16, dim=-1)
    for q, step in ((keys, key_step), (values, value_step)):
        error = (dequantize(q) - x).abs()
        assert (error <= step / 2 + 1e-3 * step + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("value_group", [64, 16, 4])
def test_scores_and_mix_from_codes_equal_the_dequantized_matmuls(bits, value_group):
    """The codes-direct matmuls within 1e-3 relative of the same matmuls on the dequantized tensors."""
    g = torch.Generator().manual_seed(bits * 100 + value_group)
    k = torch.randn(2, 3, 96, 64, generator=g) * torch.linspace(0.1, 8, 64)
    v = torch.randn(2, 3, 96, 64, generator=g)
    keys, values = quantize_keys(k, bits, group=32), quantize_values(v, bits, value_group)
    q = torch.randn(2, 3, 5, 64, generator=g)
    p = torch.softmax(torch.randn(2, 3, 5, 96, generator=g), dim=-1)
    expected_scores = q @ dequantize(keys).transpose(-1, -2)
    expected_mix = p @ dequantize(values)
    assert ((key_scores(q, keys) - expected_scores).abs().max() / expected_scores.abs().max()).item() < 1e-3
    assert ((mix_values(p, values) - expected_mix).abs().max() / expected_mix.abs().max()).item() < 1e-3


class _Attention(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, True
        self.config = type("Config", (), {"_attn_implementation": kv_attention.ATTENTION})()


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("query_length,masked", [(1, False), (7, False), (7, True)])
def test_attention_over_codes_equals_attention_over_the_dequantized_cache(monkeypatch, bits, query_length, masked):
    """GQA (6 query heads on 2 KV heads), chunked reads of the quantized part, causal within the
    step's tokens, and a given boolean mask: within 1e-4 of SDPA on the dequantized tensors."""
    monkeypatch.setattr(kv_attention, "CHUNK_TOKENS", 16)  # several chunks
    module = _Attention(groups=3)
    g = torch.Generator().manual_seed(bits)
    past = torch.randn(1, 2, 50, 16, generator=g), torch.randn(1, 2, 50, 16, generator=g)
    new = torch.randn(1, 2, query_length, 16, generator=g), torch.randn(1, 2, query_length, 16, generator=g)
    layer, twin = (CompressedKVLayer(bits=bits, group=8, residual=8, sinks=2, config=module.config) for _ in range(2))
    for cache in (layer, twin):
        cache.append(*past)
        cache.settle()
    view = twin.append(*new)  # the reference: the same tokens, dequantized
    assert view.quantized[0].tokens >= 32
    keys, values = view.dequantized()
    pending, _ = layer.update(*new)
    query = torch.randn(1, 6, query_length, 16, generator=g)
    total = keys.shape[-2]
    mask = torch.ones(query_length, total, dtype=torch.bool).tril(total - query_length)[None, None]
    if masked:
        mask[..., 3:9] = False  # e.g. padding
    expected, _ = sdpa_attention_forward(module, query, keys, values, mask, scaling=0.25)
    got, _ = compressed_attention(module, query, pending, pending, mask if masked else None, scaling=0.25)
    assert got.shape == expected.shape == (1, query_length, 6, 16)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def _states(tokens, seed, heads=2, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, tokens, dim, generator=g), torch.randn(1, heads, tokens, dim, generator=g)


def test_layer_keeps_sinks_and_recent_tokens_exact_and_quantizes_the_middle():
    layer = CompressedKVLayer(bits=4, group=4, residual=6, sinks=2)  # no config: returns tensors
    k, v = _states(20, 1)
    for start in range(0, 20, 3):  # chunks of 3 tokens
        out_k, out_v = layer.update(k[..., start : start + 3, :], v[..., start : start + 3, :])
        end = min(start + 3, 20)
        assert out_k.shape[-2] == end and layer.get_mask_sizes(1) == (end + 1, 0)
        # the new tokens come back exact
        assert torch.equal(out_k[..., start:end, :], k[..., start:end, :])
    assert layer.get_seq_length() == 20
    assert torch.equal(layer.sink_keys, k[..., :2, :])
    recent = layer.keys.shape[-2]
    assert 6 <= recent < 6 + 4 and torch.equal(layer.keys, k[..., 20 - recent :, :])
    assert layer.quantized[0].tokens == 20 - 2 - recent and layer.quantized[0].tokens % 4 == 0
    # the quantized middle is close, not exact
    final_k, _ = layer.update(*_states(1, 2))
    middle = final_k[..., 2 : 20 - recent, :]
    assert not torch.equal(middle, k[..., 2 : 20 - recent, :])
    assert ((middle - k[..., 2 : 20 - recent, :]).norm() / k.norm()).item() < 0.1


def test_byte_count_of_int4_is_near_a_quarter_of_float16():
    layer = CompressedKVLayer(bits=4, group=64, residual=0, sinks=0)
    k, v = torch.randn(1, 3, 256, 64), torch.randn(1, 3, 256, 64)
    layer.update(k, v)  # with no recent window every full block closes at once
    assert layer.quantized[0].tokens == 256 and layer.keys.shape[-2] == 0
    float16 = 2 * k.numel() * 2
    # codes: 0.5 byte per element; key scale + zero per channel per 64 tokens, value scale + zero per token
    assert layer.nbytes() == k.numel() // 2 * 2 + 3 * (256 // 64) * 64 * 4 + 3 * 256 * 4
    assert layer.nbytes() / float16 <= 0.3


def test_streaming_window_keeps_sinks_and_the_last_tokens_and_their_positions():
    config = type("Config", (), {"_attn_implementation": kv_attention.ATTENTION})()
    for bits in (None, 4):
        layer = CompressedKVLayer(bits=bits, group=4, residual=4, sinks=2, window=10, config=config)
        k, v = _states(60, 3)
        for start in range(0, 60, 5):
            layer.append(k[..., start : start + 5, :], v[..., start : start + 5, :])
            layer.settle()
        kept = layer.positions[0, 0].tolist()
        assert kept[:2] == [0, 1] and kept[2:] == list(range(60 - len(kept) + 2, 60))
        assert 10 <= len(kept) - 2 < 10 + 4 and layer.appended == 60
        assert torch.equal(layer.keys, k[..., 60 - layer.keys.shape[-2] :, :])


def test_snapkv_keeps_the_most_attended_prompt_tokens_per_kv_head():
    config = type("Config", (), {"_attn_implementation": kv_attention.ATTENTION})()
    layer = CompressedKVLayer(bits=None, sinks=1, snapkv=4, observation=3, config=config)
    k, v = _states(30, 4)
    layer.append(k, v)
    assert layer.importance_window(30) == 3 and layer.importance_window(7) == 0
    importance = torch.zeros(1, 2, 29)  # over the 29 recent tokens (token 0 is the sink)
    importance[0, 0, [2, 10, 20]] = 1.0  # head 0 attends around these; head 1 elsewhere
    importance[0, 1, [5, 15]] = 1.0
    layer.settle(importance)
    kept = layer.positions[0].tolist()
    assert all(len(row) == 1 + 4 + 3 for row in kept)
    assert kept[0][0] == 0 and kept[0][-3:] == [27, 28, 29]  # the sink and the observation window
    # scores are max-pooled over 7 tokens, so the kept ones lie within 3 of what each head attended
    near = lambda spikes: {p + 1 + d for p in spikes for d in range(-3, 4)}  # noqa: E731 (+1: the sink)
    assert set(kept[0][1:5]) <= near([2, 10, 20]) and set(kept[1][1:5]) <= near([5, 15]) and kept[0] != kept[1]
    heads = torch.arange(2)[:, None]
    assert torch.equal(layer.keys[0], k[0, heads, torch.tensor(kept)[:, 1:]])


def test_float_cache_through_lqc_attention_equals_the_dynamic_cache(tiny_llama, token_ids):
    """bits=None, no eviction: chunked prefill and decode give DynamicCache's logits within 1e-5."""
    with torch.no_grad():
        reference = tiny_llama(token_ids).logits
        cache = CompressedKVCache(tiny_llama.config, bits=None)
        assert tiny_llama.config._attn_implementation == kv_attention.ATTENTION
        got = torch.cat([tiny_llama(token_ids[:, i : i + 5], cache=cache).logits for i in range(0, 12, 5)], dim=1)
    assert ((got - reference).abs().max() / reference.abs().max()).item() < 1e-5


def test_generate_through_the_cache(tiny_llama, token_ids):
    """tiny Llama: int8 KV, with blocks closing during generation, gives the float cache's tokens;
    so does a batch of two with left padding."""
    with torch.no_grad():
        expected = tiny_llama.generate(token_ids, max_new_tokens=12, do_sample=False, cache=DynamicCache(config=tiny_llama.config))
        cache = CompressedKVCache(tiny_llama.config, bits=8, group=4, residual=4, sinks=1)
        got = tiny_llama.generate(token_ids, max_new_tokens=12, do_sample=False, cache=cache)
        assert torch.equal(got, expected)
        assert cache.get_seq_length() == got.shape[1] - 1
        assert all(layer.quantized for layer in cache.layers)
        batch = torch.cat([token_ids, torch.cat([torch.zeros(1, 3, dtype=torch.long), token_ids[:, 3:]], dim=1)])
        padding = torch.ones_like(batch)
        padding[1, :3] = 0
        expected = tiny_llama.generate(batch, attention_mask=padding, max_new_tokens=8, do_sample=False,
                                       cache=DynamicCache(config=tiny_llama.config))
        got = tiny_llama.generate(batch, attention_mask=padding, max_new_tokens=8, do_sample=False,
                                  cache=CompressedKVCache(tiny_llama.config, bits=8, group=4, residual=4, sinks=1))
        assert torch.equal(got, expected)


@pytest.mark.parametrize("eviction", [{"window": 8}, {"snapkv": 4, "observation": 2}])
def test_generate_with_eviction_stores_a_bounded_cache(tiny_llama, eviction):
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))
    cache = CompressedKVCache(tiny_llama.config, bits=4, group=4, residual=4, sinks=2, **eviction)
    with torch.no_grad():
        out = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, cache=cache)
    assert out.shape[1] == 34 and cache.get_seq_length() == 33
    stored = cache.layers[0].stored_tokens
    assert stored < 33 and (stored <= 2 + 8 + 3 if "window" in eviction else stored == 2 + 4 + 2 + 9)


@pytest.mark.parametrize("eviction", [{}, {"window": 8}])
def test_generate_of_a_compressed_model_through_the_cache(tiny_llama, token_ids, eviction):
    """The cache works with a model lqc.compress compiled: the same tokens as the eager model with
    it, and 40 steps in which 10 blocks close (and tokens are evicted) run on two graphs, prefill
    and decode: the cache's state is behind lqc::kv_attention, never a dynamo guard (which would
    recompile per block until the recompile limit, then run the uncompressed forward)."""
    import lqc

    torch._dynamo.reset()
    compressed = lqc.compress(tiny_llama, "exact", progress=False)
    with torch.no_grad():
        runs = [model.generate(token_ids, max_new_tokens=40, do_sample=False,
                               cache=CompressedKVCache(tiny_llama.config, bits=4, group=4, residual=4, sinks=1, **eviction))
                for model in (tiny_llama, compressed)]
    assert torch.equal(runs[0], runs[1])
    graphs = lqc.session_of(compressed).compilations[1:]  # after lqc.compress's own capture
    assert len(graphs) == 2
    assert all(sum(str(n.target) == "lqc.kv_attention" for n in g.graph.gm.graph.nodes) == 2 for g in graphs)


def test_kv_attention_op_names_mismatched_shapes():
    from lqc.ir.lqc_ops import KVStore

    layer = CompressedKVLayer(bits=4, group=4, residual=4, sinks=1)
    query, keys = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 2, 8)
    with pytest.raises(ValueError, match="differ in tokens or head size"):
        torch.ops.lqc.kv_attention(KVStore(layer), query, keys, keys, None, 0.5)


def test_dropped_layers_hold_no_cache(tiny_llama, token_ids):
    from lqc.runtime.structural.dropped_layers import DroppedDynamicLayer

    cache = CompressedKVCache(tiny_llama.config, bits=4, group=4, residual=4, sinks=1, dropped=[0])
    assert isinstance(cache.layers[0], DroppedDynamicLayer) and isinstance(cache.layers[1], CompressedKVLayer)
    with torch.no_grad():
        tiny_llama.generate(token_ids, max_new_tokens=8, do_sample=False, cache=cache)
    assert cache.layers[0].keys.untyped_storage().nbytes() <= 2 * 16 * 4 and cache.layers[1].nbytes() > 0


def test_other_caches_keep_the_attention_the_config_had(tiny_llama, token_ids):
    with torch.no_grad():
        expected = tiny_llama(token_ids).logits
        CompressedKVCache(tiny_llama.config)
        assert tiny_llama.config._lqc_attention_fallback == "sdpa"
        assert torch.equal(tiny_llama(token_ids, cache=DynamicCache(config=tiny_llama.config)).logits, expected)


def test_eviction_without_lqc_attention_names_the_fix(tiny_llama, token_ids):
    cache = CompressedKVCache(tiny_llama.config, bits=4, group=4, residual=4, sinks=1, window=8)
    tiny_llama.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match=r"needs lqc's KV attention.*use_compressed_attention\(model.config\)"):
        tiny_llama(token_ids, cache=cache)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bits": 3}, r"KV bits must be one of 8, 4, 2; got 3"),
        ({"group": 0}, r"the KV group size must be positive; got 0"),
        ({"group": 12}, r"groups of 12 channels, which do not divide head_dim 16; use a group that divides 16, or one of at least 16"),
        ({"bits": 2, "group": 2}, r"a value group of 2 channels splits a byte of 4 2-bit codes; use a multiple of 4"),
        ({"window": 0}, r"the StreamingLLM window must be at least 1 token; got 0"),
        ({"snapkv": 0}, r"SnapKV keeps snapkv >= 1 tokens"),
    ],
)
def test_option_errors(tiny_llama, options, message):
    with pytest.raises(ValueError, match=message):
        CompressedKVCache(tiny_llama.config, **options)


def test_crop_names_the_alternative():
    with pytest.raises(NotImplementedError, match=r"cannot be cropped .* use DynamicCache"):
        CompressedKVLayer().crop(-1)


def test_lqc_generate_gives_hf_generate_tokens(tiny_llama, token_ids):
    import lqc

    with torch.no_grad():
        expected = tiny_llama.generate(token_ids, max_new_tokens=10, do_sample=False, cache=DynamicCache(config=tiny_llama.config))
    assert torch.equal(lqc.generate(tiny_llama, token_ids, 10), expected)
    kv = {"bits": 8, "group": 4, "residual": 4, "sinks": 1}
    assert torch.equal(lqc.generate(tiny_llama, token_ids, 10, kv=kv, prefill_chunk=5), expected)
    # top-1 sampling is greedy; a token id as end of sequence stops the loop once every row has it
    assert torch.equal(lqc.generate(tiny_llama, token_ids, 10, temperature=0.7, top_k=1), expected)
    stop = int(expected[0, 12])  # the first new token
    assert torch.equal(lqc.generate(tiny_llama, token_ids, 10, eos_token_id=stop), expected[:, :13])


def test_lqc_generate_errors_name_the_fix(tiny_llama, token_ids):
    import lqc

    with pytest.raises(lqc.LqcConfigError, match=r"pass kv= .* or cache= .*, not both"):
        lqc.generate(tiny_llama, token_ids, 4, kv={"bits": 4}, cache=DynamicCache(config=tiny_llama.config))
    with pytest.raises(lqc.LqcConfigError, match=r"token ids must be \[batch, tokens\]; got shape \(12,\). Pass ids\[None\]"):
        lqc.generate(tiny_llama, token_ids[0], 4)


@pytest.mark.parametrize("options", [{"bits": 4, "group": 4, "residual": 4, "sinks": 1},
                                     {"bits": 2, "group": 4, "residual": 4, "sinks": 1, "window": 8},
                                     {"bits": None, "sinks": 2, "window": 8}])
def test_size_report_equals_a_filled_cache(tiny_llama, options):
    """kv_cache_report at 40 tokens: the bytes of a cache generate() filled to 40 tokens."""
    from lqc.runtime.kv.cache import kv_cache_report

    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    cache = CompressedKVCache(tiny_llama.config, **options)
    with torch.no_grad():
        tiny_llama.generate(ids, max_new_tokens=11, do_sample=False, cache=cache)
    assert cache.get_seq_length() == 40
    report = kv_cache_report(tiny_llama.config, 40, element_bytes=4, **options)
    assert report["total_bytes"] == cache.nbytes() and report["stored_tokens_per_layer"] == [layer.stored_tokens for layer in cache.layers]
    assert report["float_bytes"] == 40 * 2 * 2 * 2 * 16 * 4  # tokens x (K, V) x layers x KV heads x head_dim x 4 bytes
    with pytest.raises(ValueError, match="SnapKV keeps what the prompt's attention selects"):
        kv_cache_report(tiny_llama.config, 40, snapkv=8)


def test_size_report_counts_sliding_window_layers_as_their_caches_hold_them():
    """Gemma 3's layout (a sliding layer of window 8, a full one): past the window the sliding layer
    holds 7 tokens in either cache, and the report equals both caches generate() filled to 40
    tokens: lqc's compressed one and transformers' own float DynamicCache."""
    from transformers import DynamicCache

    from lqc import support_matrix
    from lqc.runtime.kv.cache import kv_cache_report

    model = support_matrix.build("gemma3")
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    options = {"bits": 4, "group": 4, "residual": 4, "sinks": 1}
    caches = {"lqc": CompressedKVCache(model.config, **options), "float": DynamicCache(config=model.config)}
    with torch.no_grad():
        for cache in caches.values():
            model.generate(ids, max_new_tokens=11, do_sample=False, cache=cache)
    report = kv_cache_report(model.config, 40, element_bytes=4, **options)
    float_bytes = sum(t.nbytes for layer in caches["float"].layers for t in (layer.keys, layer.values))
    assert [layer.keys.shape[-2] for layer in caches["float"].layers] == [7, 40]
    assert report["float_bytes"] == float_bytes == (7 + 40) * 2 * 2 * 8 * 4  # tokens x (K, V) x KV heads x head_dim x 4 bytes
    assert report["total_bytes"] == caches["lqc"].nbytes()
    assert report["stored_tokens_per_layer"] == [layer.stored_tokens for layer in caches["lqc"].layers]
