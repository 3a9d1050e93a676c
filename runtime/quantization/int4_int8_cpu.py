"""lqc's AVX-512 VNNI CPU kernels: int4 (``int4_vnni``) and int8 (``w8a8_vnni``) weights times per-token int8 activations.

torch's ``_weight_int4pack_mm_for_cpu`` dequantizes every weight to float32 and multiplies with
FMAs; at one token per step it reaches a fraction of this machine's memory bandwidth (SmolLM2's
int4 linears: ~2.5-5 GB/s of the ~15 GB/s a streaming read gets). llama.cpp quantizes the
activations to 8 bits once per matmul and takes four products per instruction with VNNI's
``vpdpbusd``; this kernel (``int4_int8_cpu.cpp``, built on first use with torch's C++ extension
toolchain) does the same in lqc's canonical int4 format: same codes, same fp16 scales and zeros.
Only the activations lose precision: int8 with one scale per token, where llama.cpp's q8_1 keeps
one per 32 inputs (finer; not done here yet).

Prefill-shaped inputs run it too, four tokens per loaded chunk: at 512 tokens it beats dequantizing
to bfloat16 plus a bf16 GEMM (one-off microbenchmark, 1 thread, SmolLM2's block linears: 408 ms against 647 ms, and 526 ms
for the bf16 GEMM alone), and perplexity then measures exactly what decode computes.
``int4_int8_reference`` computes the kernel's result from the same packed bytes with torch ops:
the tests hold the kernel to it (integer parts bit-exact, float epilogue to rounding).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from lqc.runtime.quantization.formats import QuantizedWeight, unpack_int4

ROWS = 16  # output rows per packed block (one AVX-512 register of int32 lanes)
CHUNK = 8  # inputs per 64-byte chunk: low nibbles k..k+3, high nibbles k+4..k+7 of 16 rows
SOURCE = Path(__file__).with_name("int4_int8_cpu.cpp")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni", "f16c")


def cpu_supports_vnni() -> bool:
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return False
    return all(f in flags for f in CPU_FLAGS)


@functools.cache
def load_kernel() -> str | None:
    """Build (first call in a fresh cache: ~30 s) and load the kernel; None when it is available,
    else why not (this CPU lacks AVX-512 VNNI, or the C++ build failed), for the caller's warning."""
    if not cpu_supports_vnni():
        return f"this CPU lacks one of {', '.join(CPU_FLAGS)}"
    from torch.utils.cpp_extension import load

    build = Path(os.environ.get("LQC_KERNEL_BUILD_DIR", Path.home() / ".cache" / "lqc" / "cpu_kernels"))
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-fopenmp"]
    try:
        load(name="lqc_int4_int8_cpu", sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
             build_directory=str(build), is_python_module=False, verbose=False)
    except (RuntimeError, OSError) as error:  # no compiler, no ninja: say so, the caller falls back
        return f"building {SOURCE.name} failed ({str(error).splitlines()[0][:200]}); pip install ninja and check g++"
    _register_fakes()
    return None


def pack_int4_vnni(weight: QuantizedWeight) -> torch.Tensor:
    """The packed bytes [ceil(N / 16), per-block bytes] of a canonical int4 weight (rows padded with zeros).
    Scales and zeros go in as float16, the quantize pass's dtype for them (other dtypes round to it)."""
    if weight.format != "int4" or weight.group_size % CHUNK:
        raise ValueError(f"int4_vnni packs int4 weights with a group size that is a multiple of {CHUNK}; "
                         f"got {weight.format} with group {weight.group_size}")
    codes, scales, zeros = unpack_int4(weight.qweight), weight.scales.to(torch.float16), weight.zeros.to(torch.float16)
    n, k = codes.shape
    extra = (-n) % ROWS
    if extra:
        codes = torch.cat([codes, codes.new_zeros(extra, k)])
        scales, zeros = (torch.cat([t, t.new_zeros(extra, t.shape[1])]) for t in (scales, zeros))
    g, blocks, groups = weight.group_size, (n + extra) // ROWS, k // weight.group_size
    # k = group * g + chunk * 8 + half * 4 + j  ->  byte [block, group, chunk, row, j] = low | high << 4
    c = codes.reshape(blocks, ROWS, groups, g // CHUNK, 2, 4).permute(0, 2, 3, 1, 5, 4)
    nibbles = (c[..., 0] | (c[..., 1] << 4)).reshape(blocks, groups, -1)
    as_bytes = lambda t: t.reshape(blocks, ROWS, groups).permute(0, 2, 1).contiguous().view(torch.uint8)  # noqa: E731
    return torch.cat([nibbles, as_bytes(scales), as_bytes(zeros)], dim=2).reshape(blocks, -1).contiguous()


def unpack_int4_vnni(packed: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 [N_padded, K_padded], scales fp16 [N_padded, K/g], zeros fp16): pack_int4_vnni undone."""
    chunks = group_size // CHUNK
    per_group = chunks * 64 + 64
    blocks, groups = packed.shape[0], packed.shape[1] // per_group
    p = packed.reshape(blocks, groups, per_group)
    nibbles = p[..., : chunks * 64].reshape(blocks, groups, chunks, ROWS, 4)
    codes = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1)  # [..., row, j, half]
    codes = codes.permute(0, 3, 1, 2, 5, 4).reshape(blocks * ROWS, groups * group_size)
    as_half = lambda t: t.contiguous().view(torch.float16).permute(0, 2, 1).reshape(blocks * ROWS, groups)  # noqa: E731
    return codes, as_half(p[..., chunks * 64: chunks * 64 + 32]), as_half(p[..., chunks * 64 + 32:])


def pack_w8a8_vnni(weight: QuantizedWeight) -> torch.Tensor:
    """The packed bytes [ceil(N / 16), K_padded / 4 * 64 + 128] of an int8 weight (w8a8 or int8 format):
    per block of 16 rows, the codes four inputs at a time, the rows' code sums (int32), the scales (float32)."""
    if weight.format not in ("w8a8", "int8"):
        raise ValueError(f"the w8a8_vnni layout packs int8 weights; got {weight.format}")
    codes, scales = weight.qweight, weight.scales.to(torch.float32)
    n, k = codes.shape
    codes = torch.nn.functional.pad(codes, (0, (-k) % 4, 0, (-n) % ROWS))
    scales = torch.nn.functional.pad(scales, (0, (-n) % ROWS))
    blocks, k_padded = codes.shape[0] // ROWS, codes.shape[1]
    chunks = codes.reshape(blocks, ROWS, k_padded // 4, 4).permute(0, 2, 1, 3).reshape(blocks, -1).view(torch.uint8)
    sums = codes.sum(1, dtype=torch.int32).reshape(blocks, ROWS).contiguous().view(torch.uint8)
    return torch.cat([chunks, sums, scales.reshape(blocks, ROWS).contiguous().view(torch.uint8)], dim=1).contiguous()


def int8_int8_reference(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """What ``lqc_cpu::int8_int8_mm`` computes, [M, N_padded] float32: exact integer dot products, scales in float64."""
    blocks, k_padded = packed.shape[0], (packed.shape[1] - 128) // 64 * 4
    body = packed[:, : k_padded * ROWS].contiguous().view(torch.int8).reshape(blocks, k_padded // 4, ROWS, 4)
    codes = body.permute(0, 2, 1, 3).reshape(blocks * ROWS, k_padded).to(torch.int64)
    scales = packed[:, k_padded * ROWS + 64:].contiguous().view(torch.float32).reshape(-1)
    x8, d = quantize_rows_int8_reference(x)
    x8 = torch.nn.functional.pad(x8, (0, k_padded - x8.shape[1])).to(torch.int64)
    return ((x8 @ codes.T).double() * scales.double() * d.double()[:, None]).to(torch.float32)


def quantize_rows_int8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization in torch ops: d = max|x| / 127 (>= 1e-8), x8 = round(x / d)."""
    x = x.to(torch.float32)
    d = (x.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    return torch.round(x / d[:, None]).clamp(-127, 127).to(torch.int8), d


def int4_int8_reference(x: torch.Tensor, packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """What ``lqc_cpu::int4_int8_mm`` computes, [M, N_padded] float32: the integer group sums exactly
    (int64), the per-group scale, zero and token scale in float64."""
    codes, scales, zeros = unpack_int4_vnni(packed, group_size)
    x8, d = quantize_rows_int8_reference(x)
    x8 = torch.nn.functional.pad(x8, (0, codes.shape[1] - x8.shape[1])).to(torch.int64)
    groups = codes.shape[1] // group_size
    xg = x8.reshape(x8.shape[0], groups, group_size)
    dots = torch.einsum("mgk,ngk->mng", xg, codes.to(torch.int64).reshape(codes.shape[0], groups, group_size))
    sums = xg.sum(-1)[:, None, :]
    y = (scales.double() * (dots - 8 * sums).double() + zeros.double() * sums.double()).sum(-1)
    return (y * d.double()[:, None]).to(torch.float32)


def vnni_qlinear(x, packed, bias, fmt: str, group_size: int, in_features: int, out_features: int) -> torch.Tensor:
    """``lqc::qlinear`` in the int4_vnni or w8a8_vnni layout: x [..., in_features] -> [..., out_features], x's dtype."""
    if (why := load_kernel()) is not None:
        raise RuntimeError(f"the {fmt} kernel is unavailable: {why}. Compile or load the model again "
                           "(pack_cpu_layouts and lqc.load then choose torch's kernels)")
    if fmt == "int4_vnni":
        return torch.ops.lqc_cpu.qlinear_int4_vnni(x, packed, bias, group_size, in_features, out_features)
    return torch.ops.lqc_cpu.qlinear_w8a8_vnni(x, packed, bias, in_features, out_features)


def _register_fakes() -> None:
    @torch.library.register_fake("lqc_cpu::qlinear_int4_vnni")
    def _qlinear(x, packed, bias, group_size, in_features, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("lqc_cpu::qlinear_w8a8_vnni")
    def _qlinear_w8a8(x, packed, bias, in_features, out_features):
        return x.new_empty(*x.shape[:-1], out_features)

    @torch.library.register_fake("lqc_cpu::int8_int8_mm")
    def _mm8(x, packed):
        return x.new_empty(x.shape[0], packed.shape[0] * ROWS, dtype=torch.float32)

    """Shapes for tracing (dynamo, Inductor): the ops exist only once the library is loaded."""

    @torch.library.register_fake("lqc_cpu::int4_int8_mm")
    def _mm(x, packed, group_size):
        return x.new_empty(x.shape[0], packed.shape[0] * ROWS, dtype=torch.float32)
