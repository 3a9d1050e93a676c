"""Packed formats and lqc::qlinear: every kernel against the reference, ragged shapes included."""

from __future__ import annotations

import pytest
import torch

from lqc.runtime.quantization.qlinear import int4_cpu_layout, int8_cpu_layout, qlinear_reference
from lqc.runtime.quantization.formats import (
    pack_int4, quantize_fp8, quantize_int4, quantize_int8, quantize_per_token_int8, unpack_int4,
)

qlinear = torch.ops.lqc.qlinear


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_int4_pack_roundtrip():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)
    assert pack_int4(codes).shape == (5, 6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_rtn_error_is_within_half_a_step(group_size):
    w = _weight(48, 200)  # 200 is not a multiple of any group: padded
    q = quantize_int4(w, group_size, param_dtype=torch.float32)
    assert q.padded_in_features % group_size == 0 and q.in_features == 200
    deq = q.dequantize()
    steps = q.scales.repeat_interleave(group_size, 1)[:, :200]
    assert ((deq - w).abs() <= steps / 2 + 1e-6).all()


def test_int8_and_fp8_errors():
    w = _weight(32, 96)
    q8 = quantize_int8(w, scale_dtype=torch.float32)
    assert ((q8.dequantize() - w).abs() <= q8.scales[:, None] / 2 + 1e-7).all()
    f8 = quantize_fp8(w)
    assert _rel(f8.dequantize(), w) < 0.05  # e4m3 has 3 mantissa bits: ~2-3% relative error


def test_storage_sizes():
    w = _weight(576, 1536)
    fp16_bytes = w.numel() * 2
    assert quantize_int4(w, 64).nbytes() / fp16_bytes <= 0.30  # codes 0.5 B + bf16 scale and zero per 64
    assert quantize_int8(w).nbytes() / fp16_bytes <= 0.51


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k", [64, 200])
def test_qlinear_reference_matches_dequantized_matmul(m, k):
    n = 48
    w, x, bias = _weight(n, k), torch.randn(2, m, k), torch.randn(n)
    for q, fmt in ((quantize_int8(w), "int8"), (quantize_int4(w, 32), "int4"), (quantize_fp8(w), "fp8")):
        out = qlinear(x, q.qweight, q.scales, q.zeros, bias, fmt, q.group_size, k, n)
        expected = x @ q.dequantize().T + bias
        assert out.shape == (2, m, n)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("k,group", [(128, 32), (200, 64), (576, 64), (96, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_cpu_kernel_matches_reference(m, k, group, dtype):
    n = 64  # the CPU int4 layout needs N divisible by 16
    w, x = _weight(n, k, seed=1), torch.randn(m, k).to(dtype)
    q = quantize_int4(w, group)
    packed, scales_and_zeros = int4_cpu_layout(q)
    out = qlinear(x, packed, scales_and_zeros, None, None, "int4_cpu", group, k, n)
    ref = qlinear_reference(x, q.qweight, q.scales, q.zeros, None, "int4", group, k, n)
    assert out.dtype == dtype
    assert _rel(out, ref) <= 1e-2  # bfloat16 activations inside the kernel


@pytest.mark.parametrize("m", [1, 7, 40, 128, 300])  # 128 and more: the bf16 GEMM path
@pytest.mark.parametrize("k", [136, 200, 576])
def test_int8_cpu_kernel_matches_reference(m, k):
    # torch's kernel needs K % 32 == 0 (136 and 200 are not): the layout pads, the op pads x.
    n = 80
    w, x = _weight(n, k, seed=2), torch.randn(m, k)
    q = quantize_int8(w)
    qweight, scales = int8_cpu_layout(q)
    assert qweight.shape[1] % 32 == 0
    out = qlinear(x, qweight, scales, None, None, "int8_cpu", 0, k, n)
    ref = qlinear_reference(x, q.qweight, q.scales, None, None, "int8", 0, k, n)
    assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("m", [1, 16, 17, 64])
def test_w8a8_integer_path_equals_reference(m):
    n, k = 32, 96
    w, x = _weight(n, k, seed=3), torch.randn(m, k)
    q = quantize_int8(w, scale_dtype=torch.float32, fmt="w8a8")
    out = qlinear(x, q.qweight, q.scales, None, None, "w8a8", 0, k, n)
    ref = qlinear_reference(x, q.qweight, q.scales, None, None, "w8a8", 0, k, n)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)  # integer sums are exact either way
    xq, xs = quantize_per_token_int8(x)
    assert _rel(out, x @ w.T) < 0.02


def test_fake_implementation_gives_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = quantize_int4(_weight(32, 64), 32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(2, 5, 64)
        out = qlinear(x, q.qweight, q.scales, q.zeros, None, "int4", 32, 64, 32)
    assert out.shape == (2, 5, 32)


@pytest.mark.parametrize("m", [1, 17])
def test_fp8_dynamic_scaled_mm_equals_reference(m):
    from lqc.runtime.quantization.formats import quantize_per_token_fp8

    n, k = 32, 96
    w, x = _weight(n, k, seed=4), torch.randn(m, k)
    q = quantize_fp8(w, fmt="fp8_dyn")
    out = qlinear(x, q.qweight, q.scales, None, None, "fp8_dyn", 0, k, n)
    ref = qlinear_reference(x, q.qweight, q.scales, None, None, "fp8_dyn", 0, k, n)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    xq, xs = quantize_per_token_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and _rel(xq.float() * xs, x) < 0.05
    assert _rel(out, x @ w.T) < 0.08
