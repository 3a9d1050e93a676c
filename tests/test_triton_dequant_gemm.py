"""The Triton dequantize-GEMM (lqc.codegen.dequant_gemm) against lqc::qlinear's reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter, which must be switched on
before the kernels are decorated: TRITON_INTERPRET=1 is set here before triton and the module are
imported. With a GPU, run with TRITON_INTERPRET=0 to test the compiled kernels instead. Shapes
stay tiny: the interpreter pays per program and per op.
"""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import triton  # noqa: E402 - a dev dependency: missing, the tests fail rather than skip
import triton.language as tl  # noqa: E402

from lqc.codegen import dequant_gemm as dg  # noqa: E402
from lqc.codegen import dequant_tile as dt  # noqa: E402
from lqc.runtime.quantization.qlinear import qlinear_reference  # noqa: E402
from lqc.runtime.quantization.formats import pad_columns, quantize_fp8, quantize_int4, quantize_int8  # noqa: E402
from tests.sweeps import covering  # noqa: E402

if dg.interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:  # a set-up mistake, not a reason to skip: CI must run these
    raise RuntimeError("lqc.codegen.dequant_gemm was imported before TRITON_INTERPRET=1 was set and there is no GPU; "
                       "set TRITON_INTERPRET=1 before anything imports it")

TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _quantized(fmt, group_size, n, k, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    if fmt == "int4":
        return quantize_int4(w, group_size)
    if fmt in ("fp8", "fp8_dyn"):
        return quantize_fp8(w, fmt=fmt)
    return quantize_int8(w, fmt=fmt)


def _args(q, fmt, x, bias):
    """(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features) on DEVICE."""
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return (dev(x), dev(q.qweight), dev(q.scales), dev(q.zeros), dev(bias), fmt, q.group_size, q.in_features, q.out_features)


def _assert_close(y, ref, dtype):
    assert y.dtype == ref.dtype == dtype and y.shape == ref.shape
    err = (y.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
    assert err <= TOLERANCE[dtype], f"relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


# K and N are ragged for every block size used (16 / 32); K odd: its last code is a low nibble.
@pytest.mark.parametrize("fmt_group, m, dtype, split_k, with_bias", covering(
    [[("int8", 0), ("int4", 16), ("int4", 32), ("fp8", 0), ("w8a8", 0), ("fp8_dyn", 0)], [1, 3, 17]],
    [[torch.float32, torch.bfloat16], [1, 3], [False, True]]))
def test_matches_reference(fmt_group, m, dtype, split_k, with_bias):
    fmt, group_size = fmt_group
    seed = m * 100 + group_size + split_k
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(40, 90, (1,), generator=gen)) | 1
    n = int(torch.randint(17, 60, (1,), generator=gen))
    if n % 16 == 0:
        n += 1
    q = _quantized(fmt, group_size, n, k, seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    args = _args(q, fmt, x, bias)
    # block_m 16 splits M=17 into a full block and a one-row one
    y = dg.dequant_gemm(*args, block_m=16, block_n=32, block_k=16, split_k=split_k)
    _assert_close(y, qlinear_reference(*args), dtype)


def test_batch_dims_and_strided_input():
    q = _quantized("int4", 32, 37, 50, seed=1)
    x = torch.randn(2, 3, 50)
    y = dg.dequant_gemm(*_args(q, "int4", x, None), block_k=32, block_n=16)
    assert y.shape == (2, 3, 37)
    _assert_close(y, qlinear_reference(*_args(q, "int4", x, None)), torch.float32)
    # rows 80 apart: the kernel reads x through its strides, no copy
    strided = torch.randn(5, 80)[:, :50]
    args = _args(q, "int4", strided, torch.randn(37))
    _assert_close(dg.dequant_gemm(*args, block_k=16), qlinear_reference(*args), torch.float32)
    # one token without a batch dimension, and no tokens at all
    args = _args(q, "int4", torch.randn(50), None)
    _assert_close(dg.dequant_gemm(*args), qlinear_reference(*args), torch.float32)
    assert dg.dequant_gemm(*_args(q, "int4", torch.randn(0, 50), None)).shape == (0, 37)


def test_int8_padded_width():
    # int8 codes padded with zero columns past in_features (as int8_cpu_layout pads them)
    q = _quantized("int8", 0, 30, 45, seed=2)
    q.qweight = pad_columns(q.qweight, 32)  # [30, 64]
    x = torch.randn(4, 45, dtype=torch.bfloat16)
    args = _args(q, "int8", x, torch.randn(30, dtype=torch.bfloat16))
    _assert_close(dg.dequant_gemm(*args, block_k=16, split_k=2), qlinear_reference(*args), torch.bfloat16)


def test_float16():
    q = _quantized("int4", 16, 20, 33, seed=3)
    x = torch.randn(3, 33, dtype=torch.float16)
    args = _args(q, "int4", x, torch.randn(20, dtype=torch.float16))
    _assert_close(dg.dequant_gemm(*args, block_k=16, split_k=2), qlinear_reference(*args), torch.float16)


def test_pick_split_k():
    # small M: doubled while the grid is short of SMs and each slice keeps >= 4 K blocks
    assert dg.pick_split_k(1, 45, 300, 16, 32, 16) == 4  # 19 K blocks: 4 slices of 4-5
    assert dg.pick_split_k(1, 4096, 4096, 16, 64, 64, num_sms=132) == 4  # 64 tiles: 2 x 64 is still short of 132
    assert dg.pick_split_k(1, 64, 8192, 16, 64, 64) == dg.MAX_SPLIT_K  # one tile, 128 K blocks
    assert dg.pick_split_k(1, 45, 100, 16, 32, 16) == 1  # 7 K blocks: halves would be under 4
    assert dg.pick_split_k(dg.SPLIT_K_MAX_M + 1, 45, 4096, 16, 32, 16) == 1  # large M: no split


def test_auto_split_k():
    q = _quantized("int4", 32, 45, 300, seed=4)
    x = torch.randn(1, 300)
    args = _args(q, "int4", x, torch.randn(45))
    _assert_close(dg.dequant_gemm(*args, block_n=32, block_k=16, split_k=None), qlinear_reference(*args), torch.float32)
    # more slices than K blocks: clamped, still right
    _assert_close(dg.dequant_gemm(*args, block_k=32, split_k=64), qlinear_reference(*args), torch.float32)


def _valid():
    q = _quantized("int4", 32, 8, 64)
    return dict(x=torch.randn(2, 64), qweight=q.qweight, scales=q.scales, zeros=q.zeros, bias=None,
                fmt="int4", group_size=32, in_features=64, out_features=8)


def _int8():
    q = _quantized("int8", 0, 8, 64)
    return {**_valid(), "qweight": q.qweight, "scales": q.scales, "zeros": None, "fmt": "int8", "group_size": 0}


@pytest.mark.parametrize("change,config,message", [
    (dict(fmt="int4_cpu"), {}, "computes formats int8, int4, fp8, w8a8, fp8_dyn; got fmt 'int4_cpu'"),
    (dict(x=torch.randn(2, 63)), {}, r"x has shape \(2, 63\): its last dimension must be in_features=64"),
    (dict(x=torch.randn(2, 64, dtype=torch.float64)), {}, "float32, bfloat16 or float16"),
    (dict(qweight=torch.zeros(8, 32, dtype=torch.int8)), {}, "int4 qweight must be torch.uint8"),
    (dict(out_features=9), {}, r"expected \[out_features=9, K\]"),
    (dict(in_features=70, x=torch.randn(2, 70)), {}, "holds 64 inputs per row, fewer than in_features=70"),
    (dict(group_size=24), {}, "group_size 24 must be positive and divide the padded width K=64"),
    (dict(zeros=None), {}, "int4 needs zeros"),
    (dict(scales=torch.ones(8, 3)), {}, r"int4 scales have shape \(8, 3\), expected \[8, 2\]"),
    (dict(bias=torch.zeros(7)), {}, r"bias has shape \(7,\), expected \[8\]"),
    (dict(group_size=8, scales=torch.ones(8, 8), zeros=torch.ones(8, 8)), {}, "group_size=8 leaves no block_k"),
    ({}, dict(block_k=64), "block_k=64 does not divide group_size=32.*use block_k=32"),
    ({}, dict(block_n=24), "block_n=24 must be a power of two >= 16"),
    ({}, dict(block_m=8), "block_m=8 must be a power of two >= 16"),
    ({}, dict(split_k=0), "split_k=0 must be a positive int"),
])
def test_errors(change, config, message):
    with pytest.raises(ValueError, match=message):
        dg.dequant_gemm(**{**_valid(), **change}, **config)


@pytest.mark.parametrize("change,message", [
    (dict(zeros=torch.zeros(8)), "int8 is symmetric and has no zeros; pass zeros=None"),
    (dict(scales=torch.ones(8, 2)), r"int8 scales have shape \(8, 2\), expected \[8\]"),
    (dict(qweight=torch.zeros(8, 64, dtype=torch.uint8)), "int8 qweight must be torch.int8"),
    (dict(fmt="fp8"), "fp8 qweight must be torch.float8_e4m3fn"),
    (dict(fmt="w8a8", scales=torch.ones(8, 2)), r"w8a8 scales have shape \(8, 2\), expected \[8\]"),
])
def test_int8_errors(change, message):
    with pytest.raises(ValueError, match=message):
        dg.dequant_gemm(**{**_int8(), **change})


def test_cpu_without_interpreter(monkeypatch):
    # A copy of the module decorated without the interpreter: CPU tensors get a clear error, not a crash.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    spec = importlib.util.spec_from_file_location("dequant_gemm_compiled", dg.__file__)
    compiled = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compiled)
    assert not compiled.interpreted()
    with pytest.raises(ValueError, match="x is on the CPU: Triton kernels need a GPU, or TRITON_INTERPRET=1"):
        compiled.dequant_gemm(**_valid())


@triton.jit
def _roundings_kernel(v_ptr, rint_ptr, e4m3_ptr, bf16_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    v = tl.load(v_ptr + offs)
    tl.store(rint_ptr + offs, dt._rint(v))
    tl.store(e4m3_ptr + offs, dt._round_to_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0)))
    tl.store(bf16_ptr + offs, dt._round_to_bf16(v))


def test_roundings_are_torchs():
    """The activation-quantization roundings (int8 codes, e4m3 values, the bf16 norm output) are
    bit for bit torch's: round half to even, subnormals, mantissa carries into the exponent."""
    gen = torch.Generator().manual_seed(0)
    v = torch.cat([
        torch.randn(1500, generator=gen) * 100, torch.randn(500, generator=gen) * 1e-2,
        torch.tensor([0.0, -0.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.5, 447.0, 464.0, 15.5, 0.0009765625, 0.00146484375]),
    ])
    v = torch.cat([v, torch.zeros(2048 - v.numel())]).to(DEVICE)
    rint, e4m3, bf16 = (torch.empty_like(v) for _ in range(3))
    _roundings_kernel[(1,)](v, rint, e4m3, bf16, N=2048)
    torch.testing.assert_close(rint, torch.round(v), rtol=0, atol=0)
    torch.testing.assert_close(e4m3, v.clamp(-448, 448).to(torch.float8_e4m3fn).float(), rtol=0, atol=0)
    torch.testing.assert_close(bf16, v.to(torch.bfloat16).float(), rtol=0, atol=0)
