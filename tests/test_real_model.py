"""End-to-end on the real SmolLM2-135M: the backend with an empty recipe is exact, generate()
works with both cache kinds, the eval harness (quick mode) gives the eager perplexity, and
quantization stays within its quality bounds."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lqc

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def prompt(smollm2):
    return smollm2.tokenizer("The Python language is", return_tensors="pt").input_ids


def test_empty_recipe_logits_match_eager(smollm2, prompt):
    model = smollm2.model
    compiled = torch.compile(model, backend="lqc", options={"recipe": [], "target": "eager"})
    with torch.no_grad():
        diff = (compiled(prompt).logits - model(prompt).logits).abs().max().item()
    assert diff <= 1e-5
    report = lqc.session_of(compiled).reports[-1]
    assert not report.fallback and report.capture_bytes > 500e6  # 134.5M float32 weights, frozen


def test_generate_identical_with_static_cache(smollm2, prompt):
    """generate() through the backend with the static cache (prefill and index_copy_ decode graphs).
    The dynamic cache's three graphs are checked by the `lqc eval` test below: its greedy agreement
    of 1.0 is the same tokens as eager."""
    model = smollm2.model
    with torch.no_grad():
        reference_static = model.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static")
        compiled = copy.copy(model)
        compiled.forward = torch.compile(model.forward, backend="lqc", options={"recipe": "exact", "target": "eager"})
        assert torch.equal(
            compiled.generate(prompt, max_new_tokens=8, do_sample=False, cache_implementation="static"), reference_static
        )


def test_lqc_eval_quick_frozen_graph_perplexity_equals_eager(smollm2_for_the_cli, tmp_path, capsys):
    """`lqc eval`: float32 eager against the frozen graph, on 2 windows of 512 tokens (the quick
    mode's 16 windows run the same code eight times longer). Its agreement of 1.0 is generate()
    with the dynamic cache through the backend giving eager's 2 tokens (prefill and first-decode
    graphs; 6 tokens through all three dynamic-cache graphs in the drop test below)."""
    import json

    from lqc.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--recipe", "none", "--windows", "2", "--gen-prompts", "1", "--gen-tokens", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    eager, frozen = result["reference"], result["lqc"]
    assert eager["windows"] == frozen["windows"] == 2
    assert eager["scored_tokens"] == frozen["scored_tokens"] == 2 * 511
    assert frozen["perplexity"] == pytest.approx(eager["perplexity"], rel=1e-6)
    assert 10 < eager["perplexity"] < 40  # SmolLM2-135M on Python's whatsnew prose: ~23
    assert result["agreement"]["agreement"] == 1.0
    assert "perplexity on eval: 2 windows of 512 tokens" in capsys.readouterr().out


def test_default_target_adds_no_error_beyond_inductor(smollm2, prompt):
    """target "auto" is Inductor: its fp32 reordering moves logits ~4e-5 from eager (eager itself is
    ~4e-5 from a float64 reference); lqc must add nothing on top of plain Inductor."""
    model = smollm2.model
    with torch.no_grad():
        eager = model(prompt).logits
        inductor = torch.compile(model)(prompt).logits
        torch._dynamo.reset()
        lqc_auto = torch.compile(model, backend="lqc", options={"recipe": []})(prompt).logits
    assert (lqc_auto - inductor).abs().max().item() <= 1e-5
    assert (lqc_auto - eager).abs().max().item() <= 1e-4


def test_quantization_quality_bounds(smollm2, eval_ids):
    """Quality bounds on one 512-token evaluation window (the full figures are in
    docs/quantization.md): int8 within 1.5% of float32, HQQ int4 g64 better than RTN already after 3
    of its 20 default steps, and RTN int4 g64 with a rank-16 EoRA path (the lowrank pass, 512
    calibration tokens) closer to float32 than HQQ (measured: float32 19.37, int8 19.47, EoRA 20.47,
    HQQ 23.25, RTN 25.61). One capture of the 512-token window, each recipe run by the pass
    manager on a copy of it."""
    from lqc.data import calibration_from
    from lqc.evaluate import causal_lm_logits, perplexity
    from lqc.ir import trace
    from lqc.passes import PassContext, PassManager

    def ppl(logits_of):
        return perplexity(logits_of, eval_ids, max_windows=1, progress=False).perplexity

    graph = trace(smollm2.model, eval_ids[None, :512], use_cache=False)
    reference = ppl(causal_lm_logits(smollm2.model))
    results = {}
    rtn = {"pass": "quantize", "format": "int4", "group_size": 64}
    recipes = {"int8": [{"pass": "quantize", "format": "int8"}], "rtn": [rtn],
               "hqq": [{**rtn, "method": "hqq", "hqq_iters": 3}],
               "rtn+eora16": [rtn, {"pass": "lowrank", "rank": 16, "calibration_tokens": 512}]}
    calibration = calibration_from("calib", smollm2.tokenizer)
    for name, recipe in recipes.items():
        compressed = graph.copy(name=name)
        PassManager(recipe).run(compressed, PassContext(calibration=calibration, progress=False))
        with torch.no_grad():
            results[name] = ppl(lambda ids: compressed(ids)[-1])
    assert results["int8"] < 1.015 * reference, (reference, results)
    assert reference < results["rtn+eora16"] < results["hqq"] < results["rtn"], (reference, results)


def test_dropped_attention_generates_and_frees_its_cache(smollm2, prompt):
    """2 attention sublayers dropped (explicit, no calibration): generate() gives the eager
    model-with-those-attentions-zeroed tokens and the freed cache holds 28 layers' bytes per token.
    (The static cache with dropped layers, save/load and the export's refusal of a dropped
    sublayer are tested on the tiny Llama, tests/test_drop_layers.py and
    tests/test_export_compressed_tensors.py; a compressed cache with dropped layers in
    tests/test_compress_kv.py: each would be more captures of SmolLM2 here.)"""
    from lqc.runtime.structural.dropped_layers import kv_cache_nbytes

    model = smollm2.model
    compressed = lqc.compress(model, [{"pass": "drop_layers", "what": "attention", "layers": [25, 26]}], progress=False)
    reference = copy.deepcopy(model)
    for i in (25, 26):
        reference.model.layers[i].self_attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        expected = reference.generate(prompt, **kwargs).sequences
        out = compressed.generate(prompt, **kwargs)
        assert torch.equal(out.sequences, expected)
        dynamic = out.past_key_values
        per_token = 28 * 2 * 3 * 64 * 4  # kept layers x keys and values x KV heads x head dim x float32
        assert dynamic.get_seq_length() > 0
        assert kv_cache_nbytes(dynamic) == per_token * dynamic.get_seq_length() + 2 * (2 * 3 * 64 * 4)


@pytest.fixture(scope="module")
def captured_128(smollm2, eval_ids):
    """SmolLM2 captured on 128 tokens of eval.txt, with its logits: the MoE and routing tests run
    their passes on copies (a capture costs ~10 s). The capture is static: calibration windows take
    its length, so 128 tokens (4 windows for 512 calibration tokens, not 100 of a 5-token prompt)."""
    from lqc.ir import trace

    prompt = eval_ids[None, :128]
    graph = trace(smollm2.model, prompt)
    with torch.no_grad():
        return graph, prompt, graph(prompt)[-1]


def test_moe_with_every_expert_active_equals_the_dense_model(smollm2, captured_128):
    from lqc.data import calibration_from
    from lqc.ir import op_name
    from lqc.passes import PassContext, PassManager

    captured, prompt, dense = captured_128
    graph = captured.copy()
    calibration = calibration_from("calib", smollm2.tokenizer)
    # the random partition: which neurons share an expert does not matter when every expert is on
    # (the calibrated clustering is tested on tiny models: on 30 FFNs of 1,536 neurons it takes ~55 s)
    recipe = [{"pass": "ffn_to_moe", "experts": 8, "shared": 1, "top_k": 7, "tokens": 512, "partition": "random"}]
    PassManager(recipe).run(graph, PassContext(calibration=calibration, progress=False))
    assert sum(op_name(n) == "lqc::moe_ffn" for n in graph.nodes) == 30
    with torch.no_grad():
        carved = graph(prompt)[-1]
    assert ((carved - dense).norm() / dense.norm()).item() <= 1e-5


def test_route_neurons_keeps_half_the_ffn_neurons_close_to_the_dense_model(smollm2, captured_128):
    """route_neurons at 50% on SmolLM2 (calibrated on 512 tokens of calib.txt): 30 FFNs routed,
    and on 128 tokens of eval.txt the next-token choice agrees with the dense model's on >= 70% of
    positions with a mean KL below 0.25 (measured: 75.8%, 0.185; the 128-window figures: docs/moe.md)."""
    from lqc.data import calibration_from
    from lqc.ir import op_name
    from lqc.passes import PassContext, PassManager

    captured, prompt, dense = captured_128
    graph = captured.copy()
    calibration = calibration_from("calib", smollm2.tokenizer)
    PassManager([{"pass": "route_neurons", "active": 0.5, "tokens": 512}]).run(graph, PassContext(calibration=calibration, progress=False))
    assert sum(op_name(n) == "lqc::keep_top_neurons" for n in graph.nodes) == 30
    with torch.no_grad():
        routed = graph(prompt)[-1]
    agree = (routed.argmax(-1) == dense.argmax(-1)).float().mean().item()
    ref = torch.log_softmax(dense.float(), -1)
    kl = (ref.exp() * (ref - torch.log_softmax(routed.float(), -1))).sum(-1).mean().item()
    assert agree >= 0.70 and kl < 0.25, (agree, kl)


def test_compressed_kv_cache_quality(smollm2, eval_ids):
    """One 512-token window of eval.txt fed 128 tokens at a time: int8 KV within +0.5% of the float
    cache's perplexity (the issue's bound, there at 2048; 380 of the 512 tokens are quantized). int4's +3% is checked through the pass in
    the next test (512 tokens); docs/kv-cache.md has both on every 2048-token window of eval.txt."""
    from transformers import DynamicCache

    from lqc.evaluate import cached_logits, perplexity
    from lqc.runtime.kv.cache import CompressedKVCache

    model, config = smollm2.model, smollm2.model.config
    previous = config._attn_implementation
    try:
        with torch.no_grad():
            result = {name: perplexity(cached_logits(model, new_cache, 128), eval_ids, window_length=512,
                                       max_windows=1, progress=False).perplexity
                      for name, new_cache in (("float", lambda: DynamicCache(config=config)),
                                              ("int8", lambda: CompressedKVCache(config, bits=8)))}
    finally:
        config._attn_implementation = previous
    assert result["int8"] / result["float"] - 1 < 0.005, result


def test_compress_kv_pass_on_transformers_own_caches(smollm2, eval_ids):
    """The kv-int4 recipe (compress_kv: int4, group 64, 128 recent, 4 sinks) through the backend on
    SmolLM2 with transformers' own DynamicCache: 512 tokens of eval.txt fed 128 at a time give the
    eager CompressedKVCache's logits (within 1e-4 of their scale) and stay within +3% of the float
    cache's perplexity on them. (generate() with either cache kind: tests/test_compress_kv.py.)"""
    from transformers import DynamicCache

    from lqc.evaluate import cached_logits
    from lqc.runtime.kv import graph_cache as kv_graph_cache
    from lqc.runtime.kv.cache import CompressedKVCache

    model, config = smollm2.model, smollm2.model.config
    window = eval_ids[None, :512]

    def nll(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:]).item()

    compiled = copy.copy(model)
    compiled.forward = torch.compile(model.forward, backend="lqc", options={"recipe": "kv-int4", "target": "eager"})
    previous = config._attn_implementation
    try:
        with torch.no_grad():
            cache = DynamicCache(config=config)
            logits = cached_logits(compiled, lambda: cache, 128)(window)
            stored = kv_graph_cache.layer_for(cache.layers[0].keys)
            float_logits = cached_logits(model, lambda: DynamicCache(config=config), 128)(window)
            reference = cached_logits(model, lambda: CompressedKVCache(config, bits=4), 128)(window)
    finally:
        config._attn_implementation = previous
    graphs = lqc.session_of(compiled.forward).reports
    assert graphs and not any(r.fallback for r in graphs)
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-4
    assert stored is not None and stored.quantized[0].tokens == 512 - 4 - 128 - (512 - 4 - 128) % 64
    assert nll(logits) - nll(float_logits) < math.log(1.03)  # within +3% perplexity


def test_a_converted_gguf_copy_loads_the_same_model(smollm2, eval_ids, tmp_path, monkeypatch):
    """With LQC_CACHE_DIR set, load() reads the GGUF file's float32 conversion from the cache
    folder: the same weights (the tied table once) and the same tokenizer."""
    from lqc.data import tokenize_file
    from lqc.models import _converted_copy, _save_converted, load, smollm2_gguf_path

    monkeypatch.setenv("LQC_CACHE_DIR", str(tmp_path))
    _save_converted(smollm2.model, smollm2.tokenizer, _converted_copy(smollm2_gguf_path()))
    converted = load("smollm2-135m")
    expected = smollm2.model.state_dict()
    assert converted.model.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in converted.model.state_dict().items())
    assert converted.model.lm_head.weight is converted.model.model.embed_tokens.weight
    assert sum(f.stat().st_size for f in (tmp_path / "models").rglob("*.safetensors")) < 0.55e9
    assert torch.equal(tokenize_file("eval", converted.tokenizer), eval_ids)


def test_an_unusable_cache_folder_is_a_warning(tmp_path, monkeypatch):
    """LQC_CACHE_DIR naming a file: load() converts without keeping a copy, and says so."""
    from lqc.models import _converted_copy, smollm2_gguf_path

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("LQC_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="cannot hold the converted model"):
        assert _converted_copy(smollm2_gguf_path()) is None
