"""merge_adapters: LoRA, DoRA and Bone adapters folded into their base linear, exactly."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import lqc
from lqc.ir import op_name, trace
from lqc.passes import PassContext, PassManager
from lqc.passes.reparam.merge_adapters import MergeAdapters
from lqc.passes.numerics import compare_outputs, run_graph

from .adapters import MIXED_PLAN, adapter_constants, wrap


def _merge(graph, inputs, **options):
    """Run the pass through the manager (lint, shape propagation, numeric check); its record."""
    report = PassManager([MergeAdapters(**options)], verify=True).run(graph, PassContext(check_inputs=[inputs]))
    return report.records[0]


def _assert_merged(graph, record, layers, kinds=None):
    assert sorted(record.details.merged) == sorted(layers)
    assert record.details.unmerged == {}
    assert record.rel_error <= 1e-5, record.rel_error
    assert record.nodes_after < record.nodes_before
    assert adapter_constants(graph) == []
    if kinds is not None:
        assert {layer: info["kinds"] for layer, info in record.details.merged.items()} == kinds
    # the merged layers are plain linears again
    merged = [n for n in graph.nodes if op_name(n) == "linear" and graph.module_path(n) in layers]
    assert len(merged) == len(layers)
    # nothing left to do
    assert PassManager([MergeAdapters()]).run(graph).records[0].matches == 0


def _adapted(model, plan, token_ids):
    wrap(model, plan)
    graph = trace(model, token_ids)
    assert adapter_constants(graph)  # the test means something: the adapters are in the graph
    return graph


def test_lora(tiny_llama, token_ids):
    plan = {r"self_attn\.q_proj": ("lora", 4, 8), r"mlp\.down_proj": ("lora", 8, 16, 0.0)}
    graph = _adapted(tiny_llama, plan, token_ids)
    record = _merge(graph, (token_ids,))
    layers = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    _assert_merged(graph, record, layers, {layer: ["lora"] for layer in layers})


def test_dora(tiny_llama, token_ids):
    graph = _adapted(tiny_llama, {r"self_attn\.[kv]_proj": ("dora", 4, 8)}, token_ids)
    record = _merge(graph, (token_ids,))
    layers = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("k_proj", "v_proj")]
    _assert_merged(graph, record, layers, {layer: ["dora"] for layer in layers})


def test_bone_and_bat(tiny_llama, token_ids):
    # up_proj: 64 inputs in blocks of 6 (zero-padded); o_proj: blocks of 8; gate_proj: bat [8, 8] blocks
    plan = {r"mlp\.up_proj": ("bone", 6), r"self_attn\.o_proj": ("bone", 8), r"mlp\.gate_proj": ("bat", 8)}
    graph = _adapted(tiny_llama, plan, token_ids)
    record = _merge(graph, (token_ids,))
    kinds = {}
    for i in range(2):
        kinds.update({f"model.layers.{i}.mlp.up_proj": ["bone"], f"model.layers.{i}.self_attn.o_proj": ["bone"],
                      f"model.layers.{i}.mlp.gate_proj": ["computed-weight"]})
    _assert_merged(graph, record, list(kinds), kinds)


def test_mixed_adapters(tiny_llama, token_ids):
    with torch.no_grad():
        eager = wrap(tiny_llama, MIXED_PLAN)(token_ids).logits
    graph = trace(tiny_llama, token_ids)
    record = _merge(graph, (token_ids,))
    assert record.matches == len(MIXED_PLAN)
    _assert_merged(graph, record, list(record.details.merged))
    # and against the adapted model itself, not only its captured graph
    rel, _ = compare_outputs(run_graph(graph, (token_ids,))[-1:], [eager])  # the logits come last
    assert rel <= 1e-5


def test_biases_are_kept_as_peft_keeps_them(tiny_models, token_ids):
    # Qwen2's q/k/v have biases: DoRA rescales W x only, LoRA and Bone leave the bias as it is
    model = copy.deepcopy(tiny_models["tiny-qwen2"])  # the fixture's models are shared: wrap a copy
    plan = {r"layers\.0\.self_attn\.q_proj": ("dora", 4, 8), r"layers\.0\.self_attn\.k_proj": ("lora", 4, 8),
            r"layers\.0\.self_attn\.v_proj": ("bone", 8), r"layers\.1\.self_attn\.q_proj": ("bat", 8)}
    graph = _adapted(model, plan, token_ids)
    record = _merge(graph, (token_ids,))
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj",
              "model.layers.1.self_attn.q_proj"]
    _assert_merged(graph, record, layers)
    linears = [n for n in graph.nodes if op_name(n) == "linear" and graph.module_path(n) in layers]
    assert all(len(n.args) == 3 and n.args[2] is not None for n in linears)


def test_gpt2_conv1d_lora(tiny_models, token_ids):
    # GPT-2's Conv1D is an addmm on the flattened input, with its weight stored [in, out]
    plan = {r"h\.0\.attn\.c_attn": ("lora", 4, 8), r"h\.1\.mlp\.c_fc": ("lora", 4, 8)}
    graph = _adapted(copy.deepcopy(tiny_models["tiny-gpt2"]), plan, token_ids)
    record = _merge(graph, (token_ids,))
    _assert_merged(graph, record, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"])


# The real PEFT layers, where peft is installed (random adapter weights: PEFT's init=False).
PEFT_CONFIGS = {
    "lora": ("LoraConfig", dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "o_proj"],
                                init_lora_weights=False)),
    "bone": ("BoneConfig", dict(r=8, target_modules=["gate_proj", "up_proj"], init_weights=False)),
}


@pytest.mark.parametrize("kind", list(PEFT_CONFIGS))
def test_real_peft_adapters(kind, token_ids):
    peft = pytest.importorskip("peft")
    config_class, kwargs = PEFT_CONFIGS[kind]
    if not hasattr(peft, config_class):
        pytest.skip(f"this peft has no {config_class}")
    model = lqc.models.load("tiny-llama").model
    model = peft.get_peft_model(model, getattr(peft, config_class)(**kwargs)).base_model.model.eval()
    graph = trace(model, token_ids)
    assert adapter_constants(graph)
    record = _merge(graph, (token_ids,))
    assert record.matches == 4  # two target modules in each of the two layers
    _assert_merged(graph, record, list(record.details.merged))


def test_targets_and_ignore(tiny_llama, token_ids):
    graph = _adapted(tiny_llama, MIXED_PLAN, token_ids)
    record = _merge(graph, (token_ids,), ignore=[r"layers\.0\."])
    assert record.rel_error <= 1e-5
    assert record.matches == 4 and all(layer.startswith("model.layers.1.") for layer in record.details.merged)
    left = adapter_constants(graph)
    assert left and all(fqn.startswith("model.layers.0.") for fqn in left)


def test_adapter_with_training_dropout_is_left_unmerged(tiny_llama, token_ids):
    # dropout in training mode: the LoRA branch is random, not a fixed linear function of x
    wrap(tiny_llama, {r"layers\.0\.self_attn\.q_proj": ("lora", 4, 8, 0.5), r"layers\.1\.self_attn\.q_proj": ("lora", 4, 8)})
    tiny_llama.model.layers[0].self_attn.q_proj.lora_dropout.train()
    graph = trace(tiny_llama, token_ids)
    torch.manual_seed(0)
    reference = run_graph(graph, (token_ids,))
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.self_attn\.q_proj left unmerged: .*\(%dropout: dropout\)"):
        record = PassManager([MergeAdapters()]).run(graph).records[0]
    assert list(record.details.merged) == ["model.layers.1.self_attn.q_proj"]
    assert list(record.details.unmerged) == ["model.layers.0.self_attn.q_proj"]
    assert adapter_constants(graph) == [
        "model.layers.0.self_attn.q_proj.lora_A.default.weight", "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    ]
    torch.manual_seed(0)  # the same dropout mask
    rel, _ = compare_outputs(run_graph(graph, (token_ids,)), reference)
    assert rel <= 1e-5


class _SharedLora(nn.Module):
    """A LoRA layer whose A(x) is also an output: merging would still need A(x)."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(16, 16)
        self.lora_A = nn.Linear(16, 4, bias=False)
        self.lora_B = nn.Linear(4, 16, bias=False)
        nn.init.normal_(self.lora_B.weight)

    def forward(self, x):
        a = self.lora_A(x)
        return self.base_layer(x) + self.lora_B(a) * 2.0, a


def test_adapter_used_outside_is_left_unmerged():
    model = nn.Sequential(_SharedLora()).eval()
    x = torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(0))
    graph = trace(model, x)
    nodes = len(graph.gm.graph.nodes)
    with pytest.warns(UserWarning, match=r"merge_adapters: \S*0 left unmerged: %a inside the adapted layer also feed"):
        record = PassManager([MergeAdapters()]).run(graph).records[0]
    assert record.matches == 0 and record.nodes_after == nodes


def test_plain_models_are_left_alone(tiny_models, token_ids):
    # no adapters: linears, factorised chains, residual adds and norms must not be touched or warned about
    for name in ("tiny-llama", "tiny-gpt2", "tiny-bert"):
        graph = trace(tiny_models[name], token_ids)
        nodes = len(graph.gm.graph.nodes)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record = PassManager([MergeAdapters()]).run(graph).records[0]
        assert record.matches == 0 and record.nodes_after == nodes, name
        assert not [w for w in caught if "merge_adapters" in str(w.message)], name


def test_backend_matches_eager(tiny_llama, token_ids):
    wrap(tiny_llama, MIXED_PLAN)
    with torch.no_grad():
        eager = tiny_llama(token_ids).logits
        compiled = torch.compile(tiny_llama, backend="lqc", options={"recipe": [{"pass": "merge_adapters"}]})
        logits = compiled(token_ids).logits
    report = lqc.session_of(compiled).reports[-1]
    assert not report.fallback and report.records[0].matches == len(MIXED_PLAN)
    rel, _ = compare_outputs([logits], [eager])
    assert rel <= 1e-5
