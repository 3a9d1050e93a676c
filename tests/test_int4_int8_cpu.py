"""lqc's int4 x int8 CPU kernel (int4_vnni): against its reference on ragged shapes, and through Inductor."""

from __future__ import annotations

import warnings

import pytest
import torch

from lqc.runtime.quantization import int4_int8_cpu
from lqc.runtime.quantization.formats import quantize_int4, quantize_int8, unpack_int4
from lqc.runtime.quantization.int4_int8_cpu import (
    int4_int8_reference, int8_int8_reference, load_kernel, pack_int4_vnni, pack_w8a8_vnni, quantize_rows_int8_reference,
    unpack_int4_vnni,
)
from lqc.runtime.quantization.qlinear import QLinear, qlinear_reference

pytestmark = pytest.mark.skipif(load_kernel() is not None, reason=f"int4_vnni kernel unavailable: {load_kernel()}")

# (N, K, group): N not a multiple of 16, K not a multiple of the group (padded), groups 8 .. 192
SHAPES = [(1, 8, 8), (33, 200, 64), (40, 96, 32), (192, 576, 64), (50, 576, 192), (17, 130, 128)]


def _quantized(n, k, group, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_int4(w, group)


@pytest.mark.parametrize("n,k,group", SHAPES)
def test_packing_round_trips_to_the_canonical_weight(n, k, group):
    q = _quantized(n, k, group)
    packed = pack_int4_vnni(q)
    assert packed.shape[0] == -(-n // 16)
    codes, scales, zeros = unpack_int4_vnni(packed, group)
    assert torch.equal(codes[:n], unpack_int4(q.qweight)) and not codes[n:].any()
    assert torch.equal(scales[:n], q.scales) and torch.equal(zeros[:n], q.zeros)


@pytest.mark.parametrize("m", [1, 3, 4, 13])  # blocks of four tokens and the rest one by one
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(m, n, k, group, dtype):
    q = _quantized(n, k, group, seed=1)
    packed = pack_int4_vnni(q)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    x8, d = torch.ops.lqc_cpu.quantize_rows_int8(x.float())
    x8_ref, d_ref = quantize_rows_int8_reference(x)
    assert torch.equal(x8, x8_ref) and torch.equal(d, d_ref)  # the integer part: bit for bit
    out = torch.ops.lqc_cpu.int4_int8_mm(x, packed, group)
    ref = int4_int8_reference(x, packed, group)
    assert out.shape == (m, packed.shape[0] * 16)
    # integer sums exact; the float epilogue (one fma per group) rounds in another order
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("m", [1, 4, 7])
@pytest.mark.parametrize("n,k", [(1, 4), (33, 202), (192, 576)])  # K not a multiple of 4: padded
def test_int8_kernel_matches_reference(m, n, k):
    q = quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(6)), fmt="w8a8")
    packed = pack_w8a8_vnni(q)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    out, ref = torch.ops.lqc_cpu.int8_int8_mm(x, packed), int8_int8_reference(x, packed)
    assert out.shape == (m, packed.shape[0] * 16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the w8a8 format's own reference: the same int8 activations and codes
    layer_out = QLinear(q, "w8a8_vnni")(x.float())
    expected = qlinear_reference(x.float(), q.qweight, q.scales, None, None, "w8a8", 0, k, n)
    torch.testing.assert_close(layer_out, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_all_zero_rows_and_extreme_values():
    q = _quantized(32, 64, 32)
    packed = pack_int4_vnni(q)
    x = torch.zeros(3, 64)
    x[1, 5] = 1e30  # one huge value: every other input quantizes to 0
    x[2] = -1e-30  # tiny: the scale's 1e-8 floor
    out = torch.ops.lqc_cpu.int4_int8_mm(x, packed, 32)
    assert not out[0].any() and torch.isfinite(out).all()
    torch.testing.assert_close(out, int4_int8_reference(x, packed, 32), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("m", [1, 5, 40])  # 40 rows: ten blocks of four tokens
def test_qlinear_int4_vnni_is_close_to_the_float_reference(m):
    n, k, group = 96, 200, 64
    q = _quantized(n, k, group, seed=3)
    bias = torch.randn(n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    layer = QLinear(q, "int4_vnni", bias)
    out = layer(x)
    ref = qlinear_reference(x, q.qweight, q.scales, q.zeros, bias, "int4", group, k, n)
    assert out.shape == ref.shape
    assert ((out - ref).norm() / ref.norm()).item() < 0.02  # int8 activations per token: about 1% relative


def test_inductor_calls_the_kernel_not_the_python_op():
    """codegen/cpu_decompositions.py's use_cpu_kernel_ops: the compiled function matches eager int4_vnni."""
    import torch._inductor.utils as inductor_utils

    from lqc.codegen.targets import compile_graph
    from lqc.ir import trace

    q = _quantized(64, 96, 32, seed=5)
    layer = QLinear(q, "int4_vnni").eval()
    x = torch.randn(1, 2, 96)
    graph = trace(layer, x)
    out, code = inductor_utils.run_and_get_code(lambda: compile_graph(graph, "inductor", [x], share_blocks=False)(x))
    assert "lqc_cpu.qlinear_int4_vnni" in "".join(code) and "torch.ops.lqc.qlinear" not in "".join(code)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, layer(x), rtol=1e-5, atol=1e-5)


def test_without_the_kernel_loading_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(int4_int8_cpu, "load_kernel", lambda: "this CPU lacks avx512_vnni")
    import lqc.runtime.quantization.qlinear as qlinear_module

    monkeypatch.setattr(qlinear_module, "load_kernel", lambda: "this CPU lacks avx512_vnni")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = QLinear(_quantized(32, 64, 32), "int4_vnni")
    assert layer.kernel == "int4_cpu" and "lacks avx512_vnni" in str(caught[0].message)


def test_int8_activations_on_a_non_int4_format_is_refused_naming_w8a8(tiny_llama, token_ids):
    import lqc
    from lqc.ir.errors import LqcConfigError

    with pytest.raises(LqcConfigError, match="use format 'w8a8'"):
        lqc.compress(tiny_llama, [{"pass": "quantize", "format": "int8", "activations": "int8"}], progress=False)
