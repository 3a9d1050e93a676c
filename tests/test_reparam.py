"""Reparameterization of transformer graphs: norm folding, q/k/v and gate/up concatenation,
QuaRot rotation with Hadamard matrices. Each rewrite is exact: relative logit error <= 1e-5
(float32) against the unmodified graph."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import lqc
from lqc.ir import op_name, trace
from lqc.passes import PassContext, PassManager
from lqc.passes.numerics import compare_outputs, run_graph
from lqc.runtime.quantization.hadamard import hadamard_factors, hadamard_matrix, hadamard_pair, paley_1, paley_2, sylvester

LLAMA_FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]


def _randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random init leaves norm weights at 1 and biases at 0, which would hide a missing fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower() or "ln" in name.rsplit(".", 1)[-1]:
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def _rewrite(model, ids, *entries):
    graph = trace(model, ids)
    reference = run_graph(graph, (ids,))
    report = PassManager(list(entries)).run(graph, PassContext())
    rel, _ = compare_outputs(run_graph(graph, (ids,)), reference)
    return graph, report.records[-1], rel


def _count(graph, name):
    return sum(op_name(n) == name for n in graph.nodes)


# -- Hadamard matrices ------------------------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 12, 20, 28, 36, 64, 192, 576, 1536])
def test_hadamard_matrices_are_orthogonal(order):
    h, description = hadamard_matrix(order)
    assert torch.allclose(h @ h.T, torch.eye(order, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(h.abs() * math.sqrt(order), torch.ones_like(h))  # entries +-1 / sqrt(n)
    assert description


def test_paley_and_sylvester_constructions():
    for h in (sylvester(16), paley_1(11), paley_1(19), paley_2(5), paley_2(17)):
        n = h.shape[0]
        assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    assert hadamard_factors(576)[:2] == (36, 16) and hadamard_factors(1536)[:2] == (12, 128)
    assert hadamard_factors(100) is None and hadamard_factors(11008) is None  # 11008 = 256 * 43
    with pytest.raises(ValueError, match="power of two"):
        sylvester(12)


def test_hadamard_op_matches_the_dense_product():
    left, right, _ = hadamard_pair(192)
    x = torch.randn(2, 5, 192)
    expected = (x.double() @ torch.kron(left, right)).float()
    out = torch.ops.lqc.hadamard(x, left.float(), right.float())
    assert (out - expected).abs().max() <= 1e-5


# -- norm folding -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_fold_rmsnorm_weights_is_exact(family, token_ids):
    model = _randomize_norms(lqc.models.load(family).model)
    graph, record, rel = _rewrite(model, token_ids, {"pass": "cleanup"}, {"pass": "fold_norms"})
    assert rel <= 1e-5
    assert record.matches == 5  # 2 blocks x (input, post-attention) + the final norm into the lm_head
    # no norm multiplies by a weight vector any more: every get_attr left in a norm is gone
    assert not [n for n in graph.nodes if n.op == "get_attr" and "norm.weight" in ",".join(graph.fqns(n)) and
                not any(op_name(u) == "linear" for u in n.users)]


def test_fold_layernorm_weight_and_bias_into_gpt2_conv1d(tiny_models, token_ids):
    model = _randomize_norms(lqc.models.load("tiny-gpt2").model)
    graph, record, rel = _rewrite(model, token_ids, {"pass": "fold_norms"})
    assert rel <= 1e-5 and record.matches == 5  # ln_1, ln_2 per block and ln_f
    assert all(n.args[2] is None and n.args[3] is None for n in graph.nodes if op_name(n) == "layer_norm")


def test_fold_skips_post_norm_outputs_with_other_users(token_ids):
    # BERT is post-norm: every LayerNorm output feeds a residual add as well as linears
    model = _randomize_norms(lqc.models.load("tiny-bert").model)
    graph, record, rel = _rewrite(model, token_ids, {"pass": "fold_norms"})
    assert rel <= 1e-5
    # only where nothing else reads the output: the last block's output norm (into the MLM head's
    # dense) and the head's own norm (into the decoder)
    assert [row["into"] for row in record.details.folded] == [["cls.predictions.transform.dense"], ["cls.predictions.decoder"]]


# -- concatenation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_concat_qkv_and_gate_up_is_exact_and_removes_matmuls(family, token_ids):
    model = lqc.models.load(family).model
    before = _count(trace(model, token_ids), "linear")
    graph, record, rel = _rewrite(model, token_ids, {"pass": "cleanup"}, {"pass": "concat_linears"})
    assert rel <= 1e-5
    assert record.matches == 4 and _count(graph, "linear") == before - 2 * 3  # per block: q/k/v -> 1, gate/up -> 1
    names = [row["into"] for row in record.details.stacked]
    assert names[0] == "model.layers.0.self_attn.q_proj+k_proj+v_proj" and names[1] == "model.layers.0.mlp.gate_proj+up_proj"


def test_concat_then_quantize_keeps_targets_working(tiny_llama, token_ids):
    graph, record, _ = _rewrite(
        tiny_llama, token_ids, {"pass": "concat_linears"}, {"pass": "quantize", "format": "int8", "targets": [r"q_proj"]}
    )
    assert [layer.layer for layer in record.details.layers] == [
        "model.layers.0.self_attn.q_proj+k_proj+v_proj", "model.layers.1.self_attn.q_proj+k_proj+v_proj"
    ]


# -- rotation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_rotation_is_exact(family, token_ids):
    model = _randomize_norms(lqc.models.load(family).model)
    graph, record, rel = _rewrite(model, token_ids, {"pass": "cleanup"}, {"pass": "rotate"})
    assert rel <= 1e-5
    d = record.details
    assert d.rotated and d.folded_norms == 5 and len(d.writers) == 4 and len(d.readers) == 11  # 5 per block + lm_head
    assert d.rotation.startswith("randomized Hadamard: Sylvester H_64")
    assert d.online_hadamard_matrix.startswith("Paley I H_20") and _count(graph, "lqc::hadamard") == 2  # 160 = 20 x 8


def test_rotation_falls_back_to_a_random_orthogonal_matrix(token_ids):
    model = _randomize_norms(lqc.models.load("tiny-llama").model)
    _, record, rel = _rewrite(model, token_ids, {"pass": "rotate", "rotation": "random", "online_hadamard": False})
    assert rel <= 1e-5 and record.details.rotation.startswith("seeded random orthogonal")
    assert record.details.online_hadamard == []


def test_rotation_declines_layernorm_models_with_a_warning(token_ids):
    model = _randomize_norms(lqc.models.load("tiny-gpt2").model)
    with pytest.warns(UserWarning, match=r"rotate: not rotating: .*LayerNorm"):
        graph, record, rel = _rewrite(model, token_ids, {"pass": "rotate"})
    assert rel <= 1e-5 and record.details.rotated is False


def test_rotation_spreads_outliers(token_ids):
    """What rotation is for: a residual stream with one huge channel reaches the linears flat."""
    model = lqc.models.load("tiny-llama").model
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 3] *= 50  # an outlier channel
    graph, _, rel = _rewrite(model, token_ids, {"pass": "rotate"})
    assert rel <= 1e-5
    table = next(graph.constant(n) for n in graph.nodes if n.op == "get_attr" and "rotated" in n.target and "embed" in n.target)
    original = model.model.embed_tokens.weight.detach()
    ratio = lambda w: float(w.abs().amax(dim=0).max() / w.abs().amax(dim=0).median())  # noqa: E731
    assert ratio(table) < ratio(original) / 5


def test_reparam_recipe_through_the_backend(token_ids):
    model = _randomize_norms(lqc.models.load("tiny-llama").model)
    compiled = torch.compile(model, backend="lqc", options={"recipe": "reparam", "target": "inductor"})
    with torch.no_grad():
        reference = model(token_ids).logits
        out = compiled(token_ids).logits
    assert float((out - reference).abs().max() / reference.abs().max()) <= 1e-5
    report = lqc.session_of(compiled).reports[-1]
    recipe = [r for r in report.records if r.stage == "recipe"]
    assert not report.fallback and [r.name for r in recipe][-2:] == ["concat_linears", "rotate"]
    assert recipe[-1].details.rotated and recipe[-2].matches == 4


# -- the real model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_captured(smollm2):
    ids = smollm2.tokenizer("Reparameterization keeps the function: the logits do not move.", return_tensors="pt").input_ids
    graph = trace(smollm2.model, ids)
    return graph, ids, run_graph(graph, (ids,))


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize("entries", [
    [{"pass": "fold_norms"}],
    [{"pass": "concat_linears"}],
    [{"pass": "rotate"}],
], ids=["fold_norms", "concat_linears", "rotate"])
def test_smollm2_rewrites_are_exact(smollm2_captured, entries):
    # one capture shared by the three rewrites (a copy each: its nodes are new, its weights shared)
    captured, ids, reference = smollm2_captured
    graph = captured.copy()
    record = PassManager([{"pass": "cleanup"}, *entries]).run(graph, PassContext()).records[-1]
    rel, _ = compare_outputs(run_graph(graph, (ids,)), reference)
    assert rel <= 1e-5
    # 30 blocks: two norms each and the final one; q/k/v and gate/up; 5 readers and 2 writers each, and the lm_head
    assert record.matches == {"fold_norms": 61, "concat_linears": 60, "rotate": 211}[entries[0]["pass"]]
    if entries[0]["pass"] == "concat_linears":
        assert _count(graph, "linear") == 30 * 4 + 1
    if entries[0]["pass"] == "rotate":
        assert record.details.rotation.startswith("randomized Hadamard: Paley II H_36 (q=17) (x) Sylvester H_16")
        assert record.details.online_hadamard_matrix.startswith("Paley II H_12 (q=5) (x) Sylvester H_128")
        assert len(record.details.online_hadamard) == 30


def test_rotation_refuses_layer_selection():
    from lqc.ir import LqcConfigError
    from lqc.passes import get_pass

    with pytest.raises(LqcConfigError, match="whole residual stream"):
        get_pass("rotate")(ignore=[r"layers\.0\."])


# -- every reparameterization pass on every model family: exact, whether it applies or not ---------
REPARAM_PASSES = ["fold_norms", "concat_linears", "rotate", "fold_batchnorm", "merge_branches", "merge_adapters"]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-resnet", "tiny-mobilevit"])
def test_every_reparam_pass_is_exact_on_every_family(family, token_ids):
    model = _randomize_norms(lqc.models.load(family).model)
    if family in ("tiny-resnet", "tiny-mobilevit"):
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # BatchNorm statistics away from identity, so a wrong fold shows
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        inputs = torch.randn(1, 3, 32, 32, generator=generator)
    else:
        inputs = token_ids
    graph = trace(model, inputs)
    reference = run_graph(graph, (inputs,))
    # rotate declines, with a warning, models whose stream has LayerNorms or no token embedding
    declines = pytest.warns(UserWarning, match="rotate: not rotating") if family != "tiny-llama" else contextlib.nullcontext()
    with declines:
        report = PassManager([{"pass": "cleanup"}] + [{"pass": name} for name in REPARAM_PASSES]).run(graph, PassContext())
    rel, _ = compare_outputs(run_graph(graph, (inputs,)), reference)
    assert rel <= 1e-5
    matches = {r.name: r.matches for r in report.records}
    expected_to_apply = {
        "tiny-llama": {"concat_linears", "rotate"}, "tiny-gpt2": {"fold_norms"}, "tiny-bert": {"fold_norms", "concat_linears"},
        "tiny-resnet": {"fold_batchnorm"}, "tiny-mobilevit": {"fold_batchnorm"},
    }[family]
    assert {name for name, n in matches.items() if n and name != "cleanup"} >= expected_to_apply

