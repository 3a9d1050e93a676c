"""The ``compress_kv`` pass: transformers' own DynamicCache and StaticCache, in a compiled graph,
become lqc KV ops over a compressed cache. Checked on tiny Llama against the same compression run
eagerly through ``CompressedKVCache`` (logits within 1e-5 at every step), plus the graphs' shape,
what the dynamic cache holds, the compressed layers' lifetime, eviction, and the errors."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from transformers import DynamicCache, StaticCache

import lqc
from lqc.ir.errors import LqcConfigError
from lqc.passes import Pass, PassResult, load_recipe, register_pass, unregister_pass
from lqc.runtime.kv import graph_cache as kv_graph_cache
from lqc.runtime.kv.cache import CompressedKVCache

OPTIONS = dict(bits=2, group=4, residual=4, sinks=1)  # 2 bits: far enough from float to tell them apart


def _model():
    return lqc.models.load("tiny-llama").model.eval()


def _compiled(model, target="eager", **options):
    compiled = copy.copy(model)
    compiled.forward = torch.compile(model.forward, backend="lqc", options={
        "recipe": [{"pass": "compress_kv", **(options or OPTIONS)}], "target": target, "progress": False})
    return compiled


def _prompt(length=12, seed=0):
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _step_logits(model, cache, ids, steps=24):
    """Prefill ``ids``, then ``steps`` greedy decode steps: the logits of every step."""
    out, logits = ids, []
    with torch.no_grad():
        position = 0
        for _ in range(steps + 1):
            new = out[:, position:]
            positions = torch.arange(position, out.shape[1])
            result = model(new, cache=cache, cache_position=positions, position_ids=positions[None])
            logits.append(result.logits[:, -1])
            position = out.shape[1]
            out = torch.cat([out, result.logits[:, -1:].argmax(-1)], dim=1)
    return torch.cat(logits)


def _reference_logits(model, ids, steps=24, **options):
    """The same compression through CompressedKVCache, eagerly, on a copy of ``model`` (the cache
    switches its model's config to lqc's attention)."""
    model = copy.deepcopy(model)
    return _step_logits(model, CompressedKVCache(model.config, **(options or OPTIONS)), ids, steps)


def _lqc_nodes(graph):
    return [str(n.target) for n in graph.graph.gm.graph.nodes if str(n.target).startswith("lqc.")]


@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_dynamic_cache_compresses_like_the_compressed_cache(target):
    model = _model()
    reference = _reference_logits(model, _prompt())
    float_logits = _step_logits(model, DynamicCache(config=model.config), _prompt())
    cache = DynamicCache(config=model.config)
    compiled = _compiled(model, target)
    logits = _step_logits(compiled, cache, _prompt())

    assert (logits - reference).abs().max().item() < 1e-5
    assert (logits - float_logits).abs().max().item() > 1e-3  # the cache really is 2-bit
    graphs = lqc.session_of(compiled.forward).compilations
    assert len(graphs) == 3  # prefill, first decode, dynamic decode: as without lqc
    for graph in graphs:
        names = {str(n.target) for n in graph.graph.gm.graph.nodes}
        assert _lqc_nodes(graph) == ["lqc.kv_dynamic_attention.default"] * 2
        assert not any("scaled_dot_product_attention" in name for name in names)
    # the cache holds a 4-byte placeholder per layer, of the length it reports
    keys = cache.layers[0].keys
    assert keys.shape == (1, 2, 12 + 24, 16) and keys.stride() == (0, 0, 0, 0) and keys.isnan().all()
    assert cache.get_seq_length() == 36 and keys.untyped_storage().nbytes() == 4


@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_static_cache_compresses_like_the_compressed_cache(target):
    model = _model()
    reference = _reference_logits(model, _prompt())
    cache = StaticCache(config=model.config, max_cache_len=48)
    compiled = _compiled(model, target)
    logits = _step_logits(compiled, cache, _prompt())

    assert (logits - reference).abs().max().item() < 1e-5
    graphs = lqc.session_of(compiled.forward).compilations
    assert len(graphs) == 2  # prefill and decode
    for graph in graphs:
        assert _lqc_nodes(graph) == ["lqc.kv_static_attention.default"] * 2
        assert not any(str(n.target) == "index_copy_" for n in graph.graph.gm.graph.nodes)
    assert not cache.layers[0].keys.any()  # transformers' buffers are no longer written


def test_generate_with_either_cache_gives_the_compressed_cache_tokens():
    model = _model()
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        reference = reference_model.generate(_prompt(), max_new_tokens=30, do_sample=False,
                                             cache=CompressedKVCache(reference_model.config, **OPTIONS))
        compiled = _compiled(model)
        dynamic = compiled.generate(_prompt(), max_new_tokens=30, do_sample=False)
        static = compiled.generate(_prompt(), max_new_tokens=30, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, reference) and torch.equal(static, reference)


def test_eviction_through_the_pass():
    model = _model()  # StreamingLLM without quantization: in the pass bits=0, in the cache bits=None
    reference = _reference_logits(model, _prompt(20, seed=3), 16, bits=None, sinks=2, window=8)
    compiled = _compiled(model, bits=0, sinks=2, window=8)
    logits = _step_logits(compiled, DynamicCache(config=model.config), _prompt(20, seed=3), 16)
    assert (logits - reference).abs().max().item() < 1e-5


def test_compressed_layers_die_with_the_cache():
    model = _model()
    compiled = _compiled(model)
    gc.collect()
    before = kv_graph_cache.live_layers()
    cache = DynamicCache(config=model.config)
    _step_logits(compiled, cache, _prompt(), steps=3)
    assert kv_graph_cache.live_layers() > before
    del cache
    gc.collect()
    assert kv_graph_cache.live_layers() == before


def test_a_model_run_without_a_cache_is_left_alone_and_says_so():
    model = _model()
    compiled = _compiled(model)
    with pytest.warns(UserWarning, match="graph0 runs without a KV cache .*: nothing to compress here") as caught:
        with torch.no_grad():
            out = compiled(_prompt(), use_cache=False).logits
            expected = model(_prompt(), use_cache=False).logits
    assert len([w for w in caught if "compress_kv" in str(w.message)]) == 1
    assert torch.allclose(out, expected, atol=1e-6)
    (graph,) = lqc.session_of(compiled.forward).compilations
    assert _lqc_nodes(graph) == []


def test_a_graph_that_cannot_be_compressed_refuses_a_compressed_cache():
    """Prefill compressed, decode falls back: the fallback must not attend over the placeholders."""

    @register_pass(replace=True)
    class FailOnDecode(Pass):
        name = "test_fail_on_decode"

        def run(self, graph, ctx):
            if any(i.role == "kv_cache" for i in graph.inputs):
                raise RuntimeError("decode graphs are not supported by this test pass")
            return PassResult()

    try:
        model = _model()
        compiled = copy.copy(model)
        compiled.forward = torch.compile(model.forward, backend="lqc", options={
            "recipe": [{"pass": "compress_kv", **OPTIONS}, {"pass": "test_fail_on_decode"}], "target": "eager"})
        with pytest.warns(UserWarning, match="falls back"), pytest.raises(RuntimeError, match="drop compress_kv"):
            _step_logits(compiled, DynamicCache(config=model.config), _prompt(), steps=2)
    finally:
        unregister_pass("test_fail_on_decode")


def test_a_cache_reordered_outside_the_graph_is_refused():
    model = _model()
    compiled = _compiled(model)
    cache = DynamicCache(config=model.config)
    _step_logits(compiled, cache, _prompt(), steps=1)
    cache.reorder_cache(torch.tensor([0]))  # what beam search does: copies the placeholders
    with pytest.raises(RuntimeError, match="beam search"):
        with torch.no_grad():
            compiled(_prompt(1), cache=cache)


def test_bad_options_name_the_valid_values():
    with pytest.raises(LqcConfigError, match="KV bits must be one of 8, 4, 2; got 3"):
        load_recipe([{"pass": "compress_kv", "bits": 3}])
    with pytest.raises(LqcConfigError, match="window"):
        load_recipe([{"pass": "compress_kv", "window": 0}])
    # a group that does not fit this model's heads (16 channels) is found on the graph; dynamo wraps the error
    with pytest.raises(Exception, match="compress_kv.*model.layers.0.self_attn.*group"):
        with torch.no_grad():
            _compiled(_model(), bits=4, group=6)(_prompt())


def test_dropped_attention_layers_keep_a_placeholder_not_a_cache():
    """With drop_layers before it, the dropped layer's cache holds 4 bytes (lqc::kv_placeholder),
    the kept layer's a compressed layer, and the tokens equal lqc.generate's compressed cache
    without a slot for the dropped layer."""
    model = _model()
    drop = {"pass": "drop_layers", "what": "attention", "layers": [1]}
    reference = lqc.generate(lqc.compress(copy.deepcopy(model), [drop], progress=False), _prompt(), 16, kv=OPTIONS)
    both = lqc.compress(model, [drop, {"pass": "compress_kv", **OPTIONS}], progress=False)
    cache = DynamicCache(config=model.config)
    tokens = lqc.generate(both, _prompt(), 16, cache=cache)
    assert torch.equal(tokens, reference)
    kept, dropped = cache.layers[0].keys, cache.layers[1].keys
    assert kv_graph_cache.layer_for(kept) is not None and kv_graph_cache.layer_for(dropped) is None
    assert dropped.shape == kept.shape and dropped.untyped_storage().nbytes() == 4


def test_chunked_prefill_through_repeat_kv():
    """Chunks after the first come with a mask, and transformers then repeats the KV heads
    (repeat_kv: index, expand, reshape) instead of SDPA's enable_gqa: the pass reads through it."""
    from lqc.evaluate import cached_logits

    model = _model()
    ids = _prompt(40, seed=5)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        reference = cached_logits(reference_model, lambda: CompressedKVCache(reference_model.config, **OPTIONS), 8)(ids)
        compiled = _compiled(model)
        logits = cached_logits(compiled, lambda: DynamicCache(config=model.config), 8)(ids)
    assert (logits - reference).abs().max().item() < 1e-5
    assert all(_lqc_nodes(g) == ["lqc.kv_dynamic_attention.default"] * 2 for g in lqc.session_of(compiled.forward).compilations)


def _sliding_model(arch: str):
    """Tiny Gemma 3 or Gemma 2 (support matrix configs: a sliding layer of 8 tokens, then a full
    one); Gemma 2's scores soft-capped at 1.0 instead of 50 and its query and key weights scaled up
    (random init scores are ~1e-3), so the cap changes the logits."""
    import transformers

    from lqc.support_matrix import ARCHITECTURES

    config_name, model_name, kwargs = ARCHITECTURES[arch]
    if arch == "gemma2":
        kwargs = dict(kwargs, attn_logit_softcapping=1.0)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**kwargs)).eval()
    if arch == "gemma2":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(30)
                layer.self_attn.k_proj.weight.mul_(30)
    return model


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_sliding_window_layers_compress_and_still_slide(arch):
    """Sliding-window layers (transformers keeps their last 7 tokens in a DynamicSlidingWindowLayer
    and masks from the window's start) interleaved with full ones; Gemma 2's eager, soft-capped
    attention read as SDPA. 36 tokens run well past the window: without quantization the compiled
    model's logits equal the float cache's (the window and the cap applied exactly), and with 2 bits
    they equal CompressedKVCache's (which gives the sliding layers the same window) at every step.
    Both layers read a compressed cache; the sliding layer's holds a placeholder of the window's length."""
    model = _sliding_model(arch)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    float_logits = _step_logits(model, DynamicCache(config=model.config), ids)
    if arch == "gemma2":  # the cap matters here: without it the logits are others
        uncapped = copy.deepcopy(model)
        for layer in uncapped.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert (_step_logits(uncapped, DynamicCache(config=model.config), ids, 2) - float_logits[:3]).abs().max() > 1e-2
    for bits in (0, 2):
        options = dict(OPTIONS, bits=bits)
        reference_model = copy.deepcopy(model)
        reference = _step_logits(reference_model, CompressedKVCache(reference_model.config, **dict(options, bits=bits or None)), ids)
        cache = DynamicCache(config=model.config)
        compiled = _compiled(model, **options)
        logits = _step_logits(compiled, cache, ids)
        assert (logits - reference).abs().max().item() < 1e-5, bits
        assert ((logits - float_logits).abs().max().item() < 1e-5) == (bits == 0)
        for graph in lqc.session_of(compiled.forward).compilations:
            assert _lqc_nodes(graph) == ["lqc.kv_dynamic_attention.default"] * 2
        sliding, full = cache.layers[0].keys, cache.layers[1].keys
        assert sliding.shape[-2] == 7 and full.shape[-2] == 36 and sliding.stride() == (0, 0, 0, 0)
        assert kv_graph_cache.layer_for(sliding).stored_tokens <= 7 + 1 + OPTIONS["residual"] + OPTIONS["group"]
