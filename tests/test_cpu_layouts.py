"""The pack_cpu_layouts lowering: quantize's canonical qlinears -> torch's packed CPU layouts."""

from __future__ import annotations

import pytest
import torch

from lqc.ir import op_name, trace
from lqc.ir.lqc_ops import moe_ffn_args, qlinear_args
from lqc.passes import Calibration, PassContext, PassManager, TransformCache, load_recipe
from lqc.passes.lowering import PackCpuLayouts
from lqc.passes.registry import get_pass
from lqc.runtime.quantization.int4_int8_cpu import load_kernel
from lqc.runtime.quantization.qlinear import kernel_layout


def _qlinears(graph):
    return [n for n in graph.nodes if op_name(n) == "lqc::qlinear"]


@pytest.mark.parametrize("fmt,activations,layout", [("int8", "bf16", "int8_cpu"), ("int4", "bf16", "int4_cpu"),
                                                    ("int4", "int8", "int4_vnni"), ("w8a8", "bf16", "w8a8_vnni")])
def test_canonical_qlinears_become_packed_cpu_layouts(tiny_llama, token_ids, fmt, activations, layout):
    if layout.endswith("_vnni") and load_kernel() is not None:
        pytest.skip(f"the int4_vnni kernel is unavailable here: {load_kernel()}")
    entry = {"pass": "quantize", "format": fmt, "group_size": 32, "activations": activations}
    graph = trace(tiny_llama, token_ids)
    report = PassManager([*load_recipe([entry]), PackCpuLayouts()], verify=True).run(graph, PassContext(check_inputs=[(token_ids,)]))
    quantize, pack = report.records
    assert {qlinear_args(n)["fmt"] for n in _qlinears(graph)} == {layout}
    assert pack.matches == quantize.matches == 14 and pack.details.layers[0] == "model.layers.0.self_attn.q_proj"
    for node in _qlinears(graph):  # the layout lqc.load's QLinear builds from the canonical weight, bit for bit
        expected = kernel_layout(node.meta["lqc_quantized"]["canonical"], layout)
        a = qlinear_args(node)
        for name, tensor in zip(("qweight", "scales", "zeros"), expected):
            assert (a[name] is None) == (tensor is None)
            if tensor is not None:
                assert torch.equal(graph.constant(a[name]), tensor) and graph.constant(a[name]).dtype == tensor.dtype
        assert pack.provenance[node.name][0].startswith("qlinear")  # created from quantize's node
    extra = 8192 if layout == "w8a8_vnni" else 1024  # bf16 scales, int8 padding; w8a8_vnni: an int32 row sum a row
    assert pack.rel_error < 0.15 and pack.bytes_after <= quantize.bytes_after + extra


def test_kernels_off_keeps_the_canonical_layout(tiny_llama, token_ids):
    graph = trace(tiny_llama, token_ids)
    recipe = [*load_recipe([{"pass": "quantize", "format": "int8", "kernels": False}]), PackCpuLayouts()]
    report = PassManager(recipe).run(graph, PassContext())
    assert report.records[-1].matches == 0 and {qlinear_args(n)["fmt"] for n in _qlinears(graph)} == {"int8"}


def test_packed_tensors_are_built_once_per_model(tiny_llama, token_ids):
    """Every graph of a model (prefill, decode) shares the packed weights: the transform cache."""
    ctx = PassContext(cache=TransformCache())
    graphs = []
    for ids in (token_ids, token_ids[:, :1]):
        graph = trace(tiny_llama, ids)
        PassManager([*load_recipe([{"pass": "quantize", "format": "int4", "group_size": 32}]), PackCpuLayouts()]).run(
            graph, ctx)
        graphs.append(graph)
    first, second = (graph.constant(qlinear_args(_qlinears(graph)[0])["qweight"]) for graph in graphs)
    assert first is second


def test_int8_experts_get_bfloat16_scales(tiny_llama, token_ids):
    calibration = Calibration([torch.randint(0, 256, (1200,), generator=torch.Generator().manual_seed(3))])
    recipe = [{"pass": "ffn_to_moe", "experts": 4, "shared": 1, "top_k": 2, "tokens": 1000},
              {"pass": "quantize", "format": "int8", "targets": [r"\.mlp$"]}]
    graph = trace(tiny_llama, token_ids)
    report = PassManager([*load_recipe(recipe), PackCpuLayouts()]).run(graph, PassContext(calibration=calibration, progress=False))
    assert report.records[-1].details.experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for node in (n for n in graph.nodes if op_name(n) == "lqc::moe_ffn"):
        for name in ("w_in", "w_gate", "w_out"):
            assert graph.constant(moe_ffn_args(node)[name]).dtype == torch.int8
            assert graph.constant(moe_ffn_args(node)[f"{name}_scale"]).dtype == torch.bfloat16


def test_lowering_is_not_a_recipe_entry():
    with pytest.raises(Exception, match="pack_cpu_layouts"):
        get_pass("pack_cpu_layouts")
