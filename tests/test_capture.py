"""Capture: frozen graphs reproduce eager, weights are named by module path, regions are found."""

from __future__ import annotations

import pytest
import torch

from lqc.ir import trace
from lqc.ir.graph import fqn_from_source

from .conftest import FAMILIES

# (blocks, has ffn per block, has lm_head) per family
EXPECTED = {
    "tiny-llama": dict(lm_head=True, attention_path="model.layers.0.self_attn", ffn_path="model.layers.0.mlp"),
    "tiny-qwen2": dict(lm_head=True, attention_path="model.layers.0.self_attn", ffn_path="model.layers.0.mlp"),
    "tiny-mistral": dict(lm_head=True, attention_path="model.layers.0.self_attn", ffn_path="model.layers.0.mlp"),
    "tiny-gpt2": dict(lm_head=True, attention_path="transformer.h.0.attn", ffn_path="transformer.h.0.mlp"),
    "tiny-bert": dict(lm_head=True, attention_path="bert.encoder.layer.0.attention", ffn_path="bert.encoder.layer.0.intermediate"),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_graph_reproduces_eager(tiny_models, family, token_ids):
    model = tiny_models[family]
    graph = trace(model, token_ids)
    with torch.no_grad():
        reference = _logits(model(token_ids))
        outputs = graph(token_ids)
    outputs = outputs if isinstance(outputs, (tuple, list)) else [outputs]
    logits = next(o for o in outputs if o.shape == reference.shape)
    rel = ((logits - reference).abs().max() / reference.abs().max()).item()
    assert rel <= 1e-6
    # weights are constants now; only the token ids stay an input
    assert [i.role for i in graph.inputs] == ["token_ids"]
    assert all(n.op != "placeholder" or n.name == graph.inputs[0].name for n in graph.nodes)


@pytest.mark.parametrize("family", FAMILIES)
def test_regions(tiny_models, family, token_ids):
    model = tiny_models[family]
    graph = trace(model, token_ids)
    kinds = {}
    for region in graph.regions:
        kinds.setdefault(region.kind, []).append(region)
    layers = 2
    assert [r.block for r in kinds["block"]] == list(range(layers))
    assert len(kinds["attention"]) == layers and len(kinds["ffn"]) == layers
    assert kinds["attention"][0].path == EXPECTED[family]["attention_path"]
    assert kinds["ffn"][0].path == EXPECTED[family]["ffn_path"]
    assert kinds["embedding"] and kinds["norm"]
    assert bool(kinds.get("lm_head")) == EXPECTED[family]["lm_head"]
    # every attention region holds its projections, every ffn region at least two linears
    for region in kinds["attention"] + kinds["ffn"]:
        ops = [graph.find(n) for n in region.nodes]
        assert sum(1 for n in ops if n.op == "call_function" and getattr(n.target, "__name__", "") in ("linear", "addmm")) >= 2


def test_bert_ffn_spans_two_modules(tiny_models, token_ids):
    graph = trace(tiny_models["tiny-bert"], token_ids)
    ffn = graph.regions_of_kind("ffn")[0]
    assert ffn.modules == ("bert.encoder.layer.0.intermediate", "bert.encoder.layer.0.output")


def test_weights_named_by_module_path_and_tied_weights_once(tiny_models, token_ids):
    graph = trace(tiny_models["tiny-llama"], token_ids)  # ties lm_head to the embedding
    names = {fqn for fqns in graph.constant_fqns.values() for fqn in fqns}
    assert "model.layers.1.mlp.up_proj.weight" in names
    assert "model.embed_tokens.weight" in names
    embedding = [attr for attr, fqns in graph.constant_fqns.items() if "model.embed_tokens.weight" in fqns]
    assert len(embedding) == 1
    # the lm_head linear reads the same constant as the embedding
    lm_head = graph.regions_of_kind("lm_head")[0]
    linear = graph.find(lm_head.nodes[0])
    assert linear.args[1].target == embedding[0]
    params = sum(p.numel() * p.element_size() for p in tiny_models["tiny-llama"].parameters())
    assert graph.param_bytes() == params + graph.constant(graph.find("model_rotary_emb_inv_freq")).nbytes


def test_fqn_from_source():
    source = "L['self']._modules['model']._modules['layers']._modules['3']._modules['mlp']._modules['up_proj']._parameters['weight']"
    assert fqn_from_source(source) == "model.layers.3.mlp.up_proj.weight"
    assert fqn_from_source("L['self'].model.layers.0") == "model.layers.0"


def test_shapes_propagated_on_every_node(tiny_models, token_ids):
    graph = trace(tiny_models["tiny-llama"], token_ids)
    for node in graph.nodes:
        if node.op != "output" and "_log_api_usage_once" not in node.name:
            assert "val" in node.meta, node.name


def _capture_generate(model, **generate_kwargs):
    """Every graph dynamo captures during a short generate(), as lqc Graphs."""
    from lqc.ir import capture

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(capture(gm, example_inputs, name=f"g{len(graphs)}"))
        return gm.forward

    model.forward = torch.compile(model.forward, backend=backend)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, **generate_kwargs)
    return graphs


def test_dynamic_decode_graph_keeps_symbols_and_cache_inputs(tiny_llama):
    """generate() with the dynamic cache: the third graph has a symbolic cache length."""
    graphs = _capture_generate(tiny_llama)
    assert len(graphs) == 3
    decode = graphs[2]
    roles = [i.role for i in decode.inputs]
    assert "kv_cache" in roles and "size" in roles and "token_ids" in roles
    cache_input = next(i for i in decode.inputs if i.role == "kv_cache")
    node = decode.find(cache_input.name)
    assert any(isinstance(d, torch.SymInt) for d in node.meta["val"].shape)


def test_static_cache_graph_keeps_buffers_as_inputs(tiny_llama):
    graphs = _capture_generate(tiny_llama, cache_implementation="static")
    decode = graphs[-1]
    roles = [i.role for i in decode.inputs]
    assert roles.count("kv_cache") == 4  # keys and values of 2 layers: written in place, never frozen
    assert "cache_length" in roles
