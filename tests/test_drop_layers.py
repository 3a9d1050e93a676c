"""Layer importance and the drop_layers pass on tiny-llama: scores, exactness of each drop against
an eager model with that sublayer zeroed, parameters removed, generation with both KV caches,
and configuration errors."""

from __future__ import annotations

import copy

import pytest
import torch

import lqc
from lqc.ir import LqcConfigError, op_name, trace
from lqc.passes import Calibration, PassContext, PassManager
from lqc.passes.structural.layer_importance import find_boundaries, layer_importance
from lqc.passes.numerics import run_graph


@pytest.fixture
def calibration():
    return Calibration([torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(3))])


def _zero_out(model, what: str, layer: int):
    """A copy of ``model`` whose ``what`` of block ``layer`` contributes nothing, in eager PyTorch."""
    ref = copy.deepcopy(model)
    block = ref.model.layers[layer]
    if what == "attention":
        block.self_attn.forward = lambda hidden_states, *args, **kwargs: (torch.zeros_like(hidden_states), None)
    elif what == "mlp":
        block.mlp.forward = lambda x: torch.zeros_like(x)
    else:
        block.forward = lambda hidden_states, *args, **kwargs: hidden_states
    return ref


def _params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_scores_are_in_range_and_deterministic(tiny_llama, token_ids, calibration):
    graph = trace(tiny_llama, token_ids)
    boundaries = find_boundaries(graph)
    assert [b.block for b in boundaries] == [0, 1]
    assert [op_name(b.attn_add) for b in boundaries] == ["add", "add"]
    assert boundaries[1].h_in is boundaries[0].h_out  # the stream runs from block to block
    inputs = calibration.inputs_for(graph, tokens=240)
    first = layer_importance(graph, inputs)
    second = layer_importance(graph, inputs)
    assert first == second
    assert first.tokens == 240
    for i in range(2):
        assert -1.0 <= first.attention[i] <= 1.0 and -1.0 <= first.mlp[i] <= 1.0
        assert 0.0 < first.block[i] <= 2.0
        assert 0.0 < first.spans[1][i] <= 1.0
    assert len(first.spans[2]) == 1 and 0.0 < first.spans[2][0] <= 1.0
    # 1 - cos and the angle measure the same thing: their order agrees
    assert (first.block[0] < first.block[1]) == (first.spans[1][0] < first.spans[1][1])


@pytest.mark.parametrize("what", ["attention", "mlp", "block"])
def test_drop_equals_eager_model_with_the_sublayer_zeroed(tiny_llama, token_ids, what):
    graph = trace(tiny_llama, token_ids)
    report = PassManager([{"pass": "drop_layers", "what": what, "layers": [1]}]).run(graph, PassContext(progress=False))
    record = report.records[-1]
    with torch.no_grad():
        expected = _zero_out(tiny_llama, what, 1)(token_ids).logits
        original = tiny_llama(token_ids).logits
    logits = run_graph(graph, (token_ids,))[-1]
    error = (logits - expected).abs().max().item()
    assert error <= 1e-5, error
    assert (logits - original).abs().max().item() > 1e-3  # the drop changed the model
    layer = tiny_llama.model.layers[1]
    removed = {
        "attention": _params(layer.self_attn, layer.input_layernorm),
        "mlp": _params(layer.mlp, layer.post_attention_layernorm),
        "block": _params(layer),
    }[what]
    assert record.details.params_removed == removed
    assert record.details.bytes_removed == 4 * removed
    assert record.bytes_before - record.bytes_after == 4 * removed
    module = {"attention": layer.self_attn, "mlp": layer.mlp, "block": layer}[what]
    linear_params = _params(*[m for m in module.modules() if isinstance(m, torch.nn.Linear)])
    assert record.details.flops_per_token_removed == 2 * linear_params
    assert record.details.dropped == [1] and record.details.cache_kept == []
    prefix = {"attention": "model.layers.1.self_attn", "mlp": "model.layers.1.mlp", "block": "model.layers.1."}[what]
    remaining = [n.name for n in graph.nodes if graph.module_path(n).startswith(prefix)]
    # the dropped layer's nodes are gone, except its cache update (past states + zeros for the new tokens)
    assert all(op_name(graph.find(name)) in ("tensor", "cat", "size", "new_zeros") for name in remaining), remaining


def test_dropped_attention_keeps_cache_outputs_with_their_shapes(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    outputs_before = [n.meta["val"].shape for n in graph.output_node().args[0]]
    PassManager([{"pass": "drop_layers", "what": "attention", "layers": [1]}]).run(graph, PassContext(progress=False))
    outputs = run_graph(graph, (token_ids,))
    assert [o.shape for o in outputs] == outputs_before
    # layer 0's cache is untouched; layer 1's new states are zeros nobody reads
    with torch.no_grad():
        reference = run_graph(trace(tiny_llama, token_ids), (token_ids,))
    torch.testing.assert_close(outputs[0], reference[0])
    torch.testing.assert_close(outputs[1], reference[1])
    assert not outputs[2].any() and not outputs[3].any()
    assert not any(op_name(n) == "scaled_dot_product_attention" and "layers.1" in graph.module_path(n) for n in graph.nodes)


@pytest.mark.parametrize("what", ["attention", "mlp", "block", "span"])
def test_calibrated_choice_follows_the_scores(tiny_llama, token_ids, calibration, what):
    graph = trace(tiny_llama, token_ids)
    scores = layer_importance(graph, calibration.inputs_for(graph, tokens=240))
    report = PassManager([{"pass": "drop_layers", "what": what, "count": 1, "tokens": 240, "choice": "cosine"}]).run(
        graph, PassContext(calibration=calibration, progress=False)
    )
    details = report.records[-1].details
    expected = {
        "attention": max(range(2), key=lambda i: scores.attention[i]),
        "mlp": max(range(2), key=lambda i: scores.mlp[i]),
        "block": min(range(2), key=lambda i: scores.block[i]),
        "span": min(range(2), key=lambda i: scores.spans[1][i]),
    }[what]
    assert details.dropped == [expected]
    assert details.scores[0]["blocks"] == scores.table()


def test_iterative_rescores_after_each_drop(tiny_llama, token_ids, calibration):
    graph = trace(tiny_llama, token_ids)
    report = PassManager([{"pass": "drop_layers", "what": "attention", "count": 2, "iterative": True, "tokens": 240, "choice": "cosine"}]).run(
        graph, PassContext(calibration=calibration, progress=False)
    )
    details = report.records[-1].details
    assert details.dropped == [0, 1] and len(details.scores) == 2
    dropped_first = next(row["block"] for row in details.scores[1]["blocks"] if row["attention_cos"] is None)
    survivor = 1 - dropped_first
    # the second round scored the remaining attention on the graph without the first one
    assert details.scores[1]["blocks"][survivor]["attention_cos"] != details.scores[0]["blocks"][survivor]["attention_cos"]
    assert not any(op_name(n) == "scaled_dot_product_attention" for n in graph.nodes)


def test_fraction_and_calibration_requirement(tiny_llama, token_ids, calibration):
    graph = trace(tiny_llama, token_ids)
    with pytest.raises(LqcConfigError, match="needs calibration data"):
        PassManager([{"pass": "drop_layers", "what": "mlp", "fraction": 0.5}]).run(graph, PassContext(progress=False))
    report = PassManager([{"pass": "drop_layers", "what": "mlp", "fraction": 0.5, "tokens": 240, "score_tokens": 120}]).run(
        graph, PassContext(calibration=calibration, progress=False)
    )
    assert len(report.records[-1].details.dropped) == 1


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_with_compiled_forward_matches_eager_with_attention_zeroed(tiny_llama, token_ids, cache):
    model = tiny_llama
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    reference = _zero_out(model, "attention", 1)
    recipe = [{"pass": "drop_layers", "what": "attention", "layers": [1]}]
    kwargs = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, **extra)
    with torch.no_grad():
        expected = reference.generate(token_ids, **kwargs)
        unchanged = model.generate(token_ids, **kwargs)
        compiled = copy.copy(model)
        compiled.forward = torch.compile(model.forward, backend="lqc", options={"recipe": recipe, "target": "eager"})
        generated = compiled.generate(token_ids, **kwargs)
    assert torch.equal(generated.sequences, expected.sequences)
    assert len(generated.logits) == len(expected.logits) == 8
    error = max((a - b).abs().max().item() for a, b in zip(generated.logits, expected.logits))
    assert error <= 1e-5, error
    # the dropped attention mattered: the unchanged model's logits differ at every step
    assert min((a - b).abs().max().item() for a, b in zip(unchanged.logits, expected.logits)) > 1e-3
    reports = [r for r in lqc.session_of(compiled.forward).reports if r.records]
    assert reports and all(r.records[0].details.dropped == [1] for r in reports)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"what": "heads", "layers": [1]}, r"what"),
        ({"what": "attention", "layers": [2]}, r"layer 2 is out of range: this graph has 2 decoder blocks \(0\.\.1\)"),
        ({"what": "block", "count": 3}, r"count 3 is more than the 2 decoder blocks of this graph; give count <= 2"),
        ({"what": "block"}, r"exactly one of count, fraction or layers"),
        ({"what": "block", "count": 1, "layers": [0]}, r"exactly one of count, fraction or layers"),
        ({"what": "span", "layers": [0, 2]}, r"not consecutive"),
    ],
)
def test_configuration_errors(tiny_llama, token_ids, calibration, entry, message):
    graph = trace(tiny_llama, token_ids)
    with pytest.raises(LqcConfigError, match=message):
        PassManager([{"pass": "drop_layers", **entry}]).run(graph, PassContext(calibration=calibration, progress=False))


def test_symbolic_sequence_length(tiny_llama, token_ids):
    """With a symbolic sequence length, the zeros written to the cache take it from the stream,
    so one graph serves every length."""
    torch._dynamo.mark_dynamic(token_ids, 1)
    graph = trace(tiny_llama, token_ids)
    assert [i.role for i in graph.inputs] == ["size", "token_ids"]
    report = PassManager([{"pass": "drop_layers", "what": "attention", "layers": [1]}]).run(graph, PassContext(progress=False))
    assert report.records[-1].details.cache_kept == []
    assert [op_name(n) for n in graph.nodes if op_name(n) in ("size", "new_zeros")] == ["size", "new_zeros"] * 2
    reference = _zero_out(tiny_llama, "attention", 1)
    for length in (12, 7):
        ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        outputs = run_graph(graph, (length, ids))
        with torch.no_grad():
            error = (outputs[-1] - reference(ids).logits).abs().max().item()
        assert error <= 1e-5, error
        assert outputs[2].shape == (1, 2, length, 16) and not outputs[2].any()


def test_calibrated_choice_is_shared_by_prefill_and_decode_graphs(tiny_llama, token_ids):
    calibration = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(4))
    recipe = [{"pass": "drop_layers", "what": "block", "count": 1, "tokens": 240, "score_tokens": 120}]
    compiled = copy.copy(tiny_llama)
    compiled.forward = torch.compile(
        tiny_llama.forward, backend="lqc", options={"recipe": recipe, "target": "eager", "calibration": [calibration]}
    )
    with torch.no_grad():
        generated = compiled.generate(token_ids, max_new_tokens=4, do_sample=False)
    reports = [r for r in lqc.session_of(compiled.forward).reports if r.records]
    assert len(reports) >= 2  # prefill and at least one decode graph
    dropped = {tuple(r.records[0].details.dropped) for r in reports}
    assert len(dropped) == 1 and len(next(iter(dropped))) == 1
    with torch.no_grad():
        expected = _zero_out(tiny_llama, "block", next(iter(dropped))[0]).generate(token_ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("family,blocks", [("tiny-qwen2", "model.layers"), ("tiny-gpt2", "transformer.h")])
def test_other_pre_norm_families(token_ids, family, blocks):
    model = lqc.models.load(family).model
    graph = trace(model, token_ids)
    report = PassManager([{"pass": "drop_layers", "what": "block", "layers": [1]}]).run(graph, PassContext(progress=False))
    details = report.records[-1].details
    block = model.get_submodule(blocks)[1]
    assert details.params_removed == _params(block) and details.cache_kept == []
    assert not any(graph.module_path(n).startswith(f"{blocks}.1.") and op_name(n) in ("linear", "addmm") for n in graph.nodes)


def test_post_norm_blocks_are_kept_whole_with_a_warning(token_ids):
    graph = trace(lqc.models.load("tiny-bert").model, token_ids)
    nodes = len(graph.nodes)
    with pytest.warns(UserWarning, match=r"drop_layers: graph\S* keeps every layer: .*a post-norm block like BERT's"):
        report = PassManager([{"pass": "drop_layers", "what": "block", "layers": [1]}]).run(graph, PassContext(progress=False))
    assert report.records[-1].matches == 0 and len(graph.nodes) == nodes


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_compressed_generate_frees_the_dropped_layers_cache(tiny_llama, token_ids, cache):
    """lqc.compress makes generate() build caches whose dropped-attention slots hold one position:
    the same tokens as the eager model with that attention zeroed, and that layer's bytes gone."""
    from lqc.runtime.structural.dropped_layers import DroppedDynamicLayer, DroppedStaticLayer, kv_cache_nbytes

    extra = {"cache_implementation": "static"} if cache == "static" else {}
    kwargs = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True, **extra)
    compressed = lqc.compress(tiny_llama, [{"pass": "drop_layers", "what": "attention", "layers": [0]}], progress=False)
    with torch.no_grad():
        generated = compressed.generate(token_ids, **kwargs)
        expected = _zero_out(tiny_llama, "attention", 0).generate(token_ids, **kwargs)
        full = tiny_llama.generate(token_ids, **kwargs)
    assert torch.equal(generated.sequences, expected.sequences)
    layers = generated.past_key_values.layers
    assert isinstance(layers[0], DroppedDynamicLayer if cache == "dynamic" else DroppedStaticLayer)
    assert type(layers[1]).__name__ == ("DynamicLayer" if cache == "dynamic" else "StaticLayer")
    # the layer's length still counts (layer 0 is the one HF would ask), its memory is one position
    assert layers[0].keys.shape == layers[1].keys.shape and layers[0].keys.stride(2) == 0
    assert generated.past_key_values.get_seq_length() == full.past_key_values.get_seq_length() == 12 + 8 - 1
    one_position = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16 floats
    assert kv_cache_nbytes(generated.past_key_values) == kv_cache_nbytes(full.past_key_values) // 2 + one_position
    # the original model is untouched: its caches keep every layer
    assert not hasattr(tiny_llama, "_lqc_dropped_attention")


def test_free_dropped_layers_errors(tiny_llama, token_ids):
    from transformers import DynamicCache, StaticCache

    from lqc.runtime.structural.dropped_layers import free_dropped_layers

    config = tiny_llama.config
    with pytest.raises(ValueError, match="leaves no attention layer to tell the cache's length"):
        free_dropped_layers(DynamicCache(config=config), [0, 1])
    with pytest.raises(ValueError, match=r"does not know the model's layer count; build it with the model's config"):
        free_dropped_layers(DynamicCache(), [1])
    with pytest.raises(ValueError, match="layer 5 is out of range: this cache has 2 layers"):
        free_dropped_layers(StaticCache(config=config, max_cache_len=16), [5])
    used = DynamicCache(config=config)
    with torch.no_grad():
        tiny_llama(token_ids, cache=used, use_cache=True)
    with pytest.raises(ValueError, match="layer 1 already holds keys and values; free layers before the cache is used"):
        free_dropped_layers(used, [1])


@pytest.mark.parametrize("what,layers", [("attention", [1]), ("block", [0])])
def test_dropped_model_saves_and_loads(tiny_llama, token_ids, tmp_path, what, layers):
    """A dropped (and quantized) model saves without the dropped weights and loads with stand-ins
    that give the same logits and the same generations, caches freed as after compress."""
    import json

    recipe = [{"pass": "drop_layers", "what": what, "layers": layers}, {"pass": "quantize", "format": "int8"}]
    compressed = lqc.compress(tiny_llama, recipe, progress=False)
    lqc.save(compressed, tmp_path)
    manifest = json.loads((tmp_path / "lqc.json").read_text())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as stored:
        names = list(stored.keys())
    for path in manifest["dropped"]:
        assert not [n for n in names if n.startswith(path + ".")]
    kinds = sorted(info["kind"] for info in manifest["dropped"].values())
    assert kinds == (["attention", "norm"] if what == "attention" else ["attention", "mlp", "norm", "norm"])
    loaded = lqc.load(tmp_path)
    assert type(loaded.model.layers[layers[0]].self_attn).__name__ == "DroppedAttention"
    kwargs = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, compressed(token_ids).logits)
        for extra in ({}, {"cache_implementation": "static"}):
            a = compressed.generate(token_ids, **kwargs, **extra)
            b = loaded.generate(token_ids, **kwargs, **extra)
            assert torch.equal(a.sequences, b.sequences)
            assert [type(x) for x in a.past_key_values.layers] == [type(x) for x in b.past_key_values.layers]
        # a cache the caller built keeps every slot; the stand-in writes zeros into the dropped one
        from transformers import DynamicCache

        cache = DynamicCache(config=loaded.config)
        out = loaded(token_ids, cache=cache, use_cache=True)
        assert torch.equal(out.logits, compressed(token_ids).logits)
        assert not cache.layers[layers[0]].keys.any() and cache.layers[layers[0]].keys.shape[-2] == token_ids.shape[1]


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-qwen2"])
def test_dropped_block_saves_and_loads_in_other_families(family, token_ids, tmp_path):
    model = lqc.models.load(family).model
    torch._dynamo.reset()
    compressed = lqc.compress(model, [{"pass": "drop_layers", "what": "block", "layers": [1]}], progress=False)
    lqc.save(compressed, tmp_path)
    loaded = lqc.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, compressed(token_ids).logits)
        assert torch.equal(
            loaded.generate(token_ids, max_new_tokens=5, do_sample=False),
            compressed.generate(token_ids, max_new_tokens=5, do_sample=False),
        )


def test_beam_search_with_freed_cache_slots(tiny_llama, token_ids):
    """Beam search reorders and regroups the cache every step: the freed slots follow."""
    compressed = lqc.compress(tiny_llama, [{"pass": "drop_layers", "what": "attention", "layers": [0]}], progress=False)
    with torch.no_grad():
        expected = _zero_out(tiny_llama, "attention", 0).generate(token_ids, max_new_tokens=6, num_beams=3, do_sample=False)
        assert torch.equal(compressed.generate(token_ids, max_new_tokens=6, num_beams=3, do_sample=False), expected)


# -- choice by KL, compensation ----------------------------------------------------------------------
def _identity_at(model, what: str, layer: int):
    """A copy of ``model`` whose ``what`` (attention or block) of ``layer`` is an identity map:
    its output projections are zero, so it adds nothing to the residual stream."""
    model = copy.deepcopy(model)
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        if what == "block":
            block.mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("what,layer", [("attention", 0), ("block", 1)])
def test_kl_choice_drops_the_identity(tiny_llama, token_ids, calibration, what, layer):
    """The first and last blocks are not excluded: the one that changes nothing is chosen, whichever it is."""
    model = _identity_at(tiny_llama, what, layer)
    graph = trace(model, token_ids)
    entry = {"pass": "drop_layers", "what": what, "count": 1, "choice": "kl", "tokens": 120, "score_tokens": 120}
    details = PassManager([entry]).run(graph, PassContext(calibration=calibration, progress=False)).records[-1].details
    assert details.dropped == [layer]
    kl = {tuple(row["blocks"]): row["kl"] for row in details.scores[0]["kl"]}
    assert kl[(layer,)] < 1e-6 and kl[(1 - layer,)] > 1e-4, kl
    with torch.no_grad():
        torch.testing.assert_close(run_graph(graph, (token_ids,))[-1], model(token_ids).logits, atol=1e-5, rtol=0)


def _sublayer_activations(model, inputs, layer: int):
    """(h_in, normed input, attention output) of ``layer`` over the calibration windows, recorded
    with hooks on the eager model: the reference the fitted compensation is checked against."""
    block = model.model.layers[layer]
    seen = {"h_in": [], "normed": [], "y": []}

    def block_input(module, args, kwargs):
        seen["h_in"].append(args[0] if args else kwargs["hidden_states"])

    def attention_io(module, args, kwargs, out):
        seen["normed"].append(args[0] if args else kwargs["hidden_states"])
        seen["y"].append(out[0])

    hooks = [block.register_forward_pre_hook(block_input, with_kwargs=True),
             block.self_attn.register_forward_hook(attention_io, with_kwargs=True)]
    with torch.no_grad():
        for args in inputs:
            model(*args)
    for h in hooks:
        h.remove()
    return {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double() for k, v in seen.items()}


def _compensation_constants(graph) -> dict[str, torch.Tensor]:
    found = {}
    for name, tensor in graph.constants():
        for fqn in graph.fqns(name):
            if ".compensation." in fqn:
                found[fqn.split(".compensation.")[1]] = tensor.double()
    return found


@pytest.mark.parametrize("kind,source", [("bias", "stream"), ("linear", "stream"), ("linear", "normed"), ("diagonal", "stream")])
def test_compensation_is_the_least_squares_fit(tiny_llama, token_ids, calibration, kind, source):
    """The fitted stand-in of attention 1 (ridge 0) against a direct least-squares solution on the
    same calibration tokens, recorded independently with hooks on the eager model."""
    graph = trace(tiny_llama, token_ids)
    entry = {"pass": "drop_layers", "what": "attention", "layers": [1], "compensation": kind, "compensation_input": source,
             "ridge": 0.0, "tokens": 240}
    PassManager([entry]).run(graph, PassContext(calibration=calibration, progress=False))
    acts = _sublayer_activations(tiny_llama, calibration.inputs_for(graph, tokens=240), 1)
    x, y = acts["h_in" if source == "stream" else "normed"], acts["y"]
    got = _compensation_constants(graph)
    ones = torch.ones(len(x), 1, dtype=x.dtype)
    if kind == "bias":
        torch.testing.assert_close(got["bias"], y.mean(0), atol=1e-6, rtol=1e-5)
        assert set(got) == {"bias"}
    elif kind == "linear":
        solution = torch.linalg.lstsq(torch.cat([x, ones], 1), y).solution  # [d + 1, d]
        torch.testing.assert_close(got["weight"], solution[:-1].T, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(got["bias"], solution[-1], atol=2e-4, rtol=1e-3)
    else:
        for j in range(x.shape[1]):
            solution = torch.linalg.lstsq(torch.stack([x[:, j], ones[:, 0]], 1), y[:, j : j + 1]).solution
            torch.testing.assert_close(got["scale"][j], solution[0, 0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got["bias"][j], solution[1, 0], atol=1e-5, rtol=1e-4)
    # the graph computes h_in + c(x) where the attention was
    model = copy.deepcopy(tiny_llama)
    attention = model.model.layers[1].self_attn
    if source == "stream":
        model.model.layers[1].input_layernorm.forward = lambda h: h
    w = {k: v.float() for k, v in got.items()}
    fitted = {
        "bias": lambda h: w["bias"].expand(h.shape),
        "linear": lambda h: torch.nn.functional.linear(h, w["weight"], w["bias"]),
        "diagonal": lambda h: h * w["scale"] + w["bias"],
    }[kind]
    attention.forward = lambda hidden_states, *args, **kwargs: (fitted(hidden_states), None)
    with torch.no_grad():
        torch.testing.assert_close(run_graph(graph, (token_ids,))[-1], model(token_ids).logits, atol=1e-5, rtol=0)


def test_low_rank_compensation_is_the_reduced_rank_regression(tiny_llama, token_ids, calibration):
    """rank r: the full ridge solution projected on the top r principal directions of its fitted outputs."""
    from lqc.passes.structural.drop_compensation import fit

    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = x @ torch.randn(16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.3
    full, low = fit("linear", x, y, ridge=0.0), fit("linear", x, y, ridge=0.0, rank=4)
    torch.testing.assert_close(full(x.float()).double(), y, atol=1e-4, rtol=1e-4)
    predicted = full(x.float()).double()
    centered = predicted - predicted.mean(0)
    u, s, vh = torch.linalg.svd(centered, full_matrices=False)
    best = centered @ vh[:4].T @ vh[:4] + predicted.mean(0)  # Eckart-Young: the best rank-4 fit of the fitted outputs
    torch.testing.assert_close(low(x.float()).double(), best, atol=1e-3, rtol=1e-3)
    assert low.down.shape == (4, 16) and low.up.shape == (16, 4)


@pytest.mark.parametrize("what,options", [
    ("attention", {"compensation": "linear", "compensation_input": "normed"}),
    ("block", {"compensation": "linear", "rank": 2}),
])
def test_compensated_model_saves_and_loads(tiny_llama, token_ids, calibration, tmp_path, what, options):
    """Saved and loaded: the stand-in computes what the compressed graph did, the same logits and generations."""
    torch._dynamo.reset()
    recipe = [{"pass": "drop_layers", "what": what, "layers": [1], "tokens": 240, **options}]
    compressed = lqc.compress(tiny_llama, recipe, calibration=calibration.sequences, progress=False)
    lqc.save(compressed, tmp_path)
    loaded = lqc.load(tmp_path)
    stand_in = loaded.model.layers[1].mlp if what == "mlp" else loaded.model.layers[1].self_attn
    assert type(stand_in.compensation).__name__ == "DroppedCompensation"
    with torch.no_grad():
        expected, full = compressed(token_ids).logits, tiny_llama(token_ids).logits
        assert torch.equal(loaded(token_ids).logits, expected)
        assert (expected - full).abs().max() > 1e-4  # something was dropped
        assert torch.equal(loaded.generate(token_ids, max_new_tokens=5, do_sample=False),
                           compressed.generate(token_ids, max_new_tokens=5, do_sample=False))


def test_compensated_and_int8_model_loads_without_crashing(tiny_llama, token_ids, tmp_path):
    """The compensation's tensors shift the int8 weights' offsets in model.safetensors; torch's
    int8 CPU kernel crashed (a segfault) on the misaligned loaded weights until load realigned them."""
    calibration = torch.randint(0, 256, (1, 2048), generator=torch.Generator().manual_seed(5))
    recipe = [{"pass": "drop_layers", "what": "attention", "count": 1, "compensation": "linear"},
              {"pass": "quantize", "format": "int8"}]
    compressed = lqc.compress(tiny_llama, recipe, calibration=calibration, progress=False)
    lqc.save(compressed, tmp_path)
    loaded = lqc.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, compressed(token_ids).logits)
