"""The guides' code blocks (pass development, layer dropping, MoE, KV cache, codegen, viz) run, in order, as written."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "pass-development.md"


def run_doc_blocks(doc: Path, namespace: dict) -> int:
    """Run a doc's ```python blocks in order in ``namespace``; a failure names its block."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{doc.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # name the failing block
            pytest.fail(f"block {i} of {doc.name} failed: {type(exc).__name__}: {exc}\n{block}")
    return len(blocks)


def test_pass_development_guide_runs(capsys):
    from lqc.passes import unregister_pass

    # A real module: dataclasses look their defining module up in sys.modules.
    module = types.ModuleType("pass_development_guide")
    sys.modules[module.__name__] = module
    try:
        assert run_doc_blocks(DOC, module.__dict__) >= 8
    finally:
        unregister_pass("fuse_swiglu")
        sys.modules.pop(module.__name__, None)
    out = capsys.readouterr().out
    assert "ffn:model.layers.0.mlp" in out
    assert "pattern expects 'mul', the graph has 'linear'" in out


def test_layer_dropping_guide_runs(capsys):
    """docs/layer-dropping.md: its code blocks run in order and print what the text says."""
    assert run_doc_blocks(DOC.parent / "layer-dropping.md", {}) == 3
    out = capsys.readouterr().out
    assert "dropped attention of blocks [1]: 12352 parameters, 24576 FLOPs/token" in out  # chosen by KL
    assert "['DroppedDynamicLayer', 'DynamicLayer'] 5120 bytes" in out
    assert "['DroppedStaticLayer', 'StaticLayer'] 5120 bytes" in out
    assert "DroppedAttention(layer_idx=1)\nTrue" in out


def test_kv_cache_guide_runs(capsys):
    assert run_doc_blocks(DOC.parent / "kv-cache.md", {}) == 5
    out = capsys.readouterr().out
    assert "True 23 [16, 16]\nlqc_kv" in out
    assert "2 212 204\n['lqc.kv_attention', 'lqc.qlinear.default']" in out  # one decode graph for 200 steps
    assert "True True\n(1, 2, 31, 16) (0, 0, 0, 0) 4 31" in out  # the compress_kv pass
    assert "{'window': 16} 50 49 18" in out and "{'snapkv': 8, 'observation': 4} 50 49 23" in out
    assert "torch.Size([1, 50]) 16" in out


def test_moe_guide_runs(capsys):
    assert run_doc_blocks(DOC.parent / "moe.md", {}) == 3
    out = capsys.readouterr().out
    assert "routed 2 FFNs neuron by neuron: 50% of neurons active per token, 67% of FFN weights read" in out
    assert "carved 2 FFNs into 4 experts (1 shared, top 1): 50% of neurons active, FFN FLOPs/token 122,880 -> 62,208" in out
    assert "['model.layers.0.mlp.experts.w_in', 'model.layers.0.mlp.experts.w_gate', 'model.layers.0.mlp.experts.w_out']" in out


def test_codegen_guide_runs(capsys):
    assert run_doc_blocks(DOC.parent / "codegen.md", {}) == 1
    assert "14 105\n  qlinear      %qlinear_default_3   model.layers.0.self_attn.o_proj  epilogue: residual(add)" in capsys.readouterr().out


def test_visualization_guide_runs(capsys):
    assert run_doc_blocks(DOC.parent / "visualization.md", {}) == 1
    out = capsys.readouterr().out
    assert "[('cleanup', 'recipe'), ('quantize', 'recipe'), ('pack_cpu_layouts', 'lowering')] 4 True\nqlinear_default ['linear', 'model_layers_0_self_attn_q_proj_weight']\nqlinear_default_14 {'pass': 'pack_cpu_layouts', 'from': ['qlinear_default', 'model_layers_0_self_attn_q_proj_qweight', 'model_layers_0_self_attn_q_proj_scales']} linear" in out


def test_serving_guide_runs(capsys):
    """docs/serving.md: the Python example exports, and transformers computes what lqc computes."""
    pytest.importorskip("compressed_tensors")
    assert run_doc_blocks(DOC.parent / "serving.md", {}) == 1
    assert capsys.readouterr().out.endswith("{'W4A16 int4 g32 integer zero points'} True\nTrue\n")
