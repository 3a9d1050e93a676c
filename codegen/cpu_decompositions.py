"""What Inductor sees of ``lqc::qlinear`` on the CPU: ATen ops around lqc's C++ kernel, not a Python op.

``lqc::qlinear`` is implemented in Python (lqc.runtime.quantization.qlinear): handed to Inductor
as is, every call of every layer crosses into the interpreter (~10 us each, 211 calls a SmolLM2
decode step), and with Inductor's C++ wrapper it would take the GIL from C++ too. For the
``int4_vnni`` layout the op is decomposed here, at Inductor's trace, into the C++ op
``lqc_cpu::int4_int8_mm`` (decode-shaped inputs) or ``lqc_cpu::int4_dequantize`` and one bf16
matmul (prefill-shaped ones), the choice made on the static number of rows, with the slice,
cast and bias as ATen ops Inductor fuses into their neighbours. Other layouts keep the op
(``NotImplemented``: Inductor calls it as before).
"""

from __future__ import annotations

import functools

import torch

from lqc.runtime.quantization.int4_int8_cpu import VNNI_MAX_ROWS


def _qlinear(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features):
    if fmt != "int4_vnni" or not isinstance(x.shape[0], int):
        return NotImplemented
    rows = x.numel() // in_features
    x2 = x.reshape(rows, in_features)
    if rows <= VNNI_MAX_ROWS:
        y = torch.ops.lqc_cpu.int4_int8_mm(x2, qweight, group_size)[:, :out_features].to(x.dtype)
    else:
        weight = torch.ops.lqc_cpu.int4_dequantize(qweight, group_size)
        x2 = torch.nn.functional.pad(x2.to(torch.bfloat16), (0, weight.shape[1] - in_features))
        y = torch.mm(x2, weight[:out_features].t()).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], out_features)


@functools.cache
def inductor_decompositions() -> dict:
    """Inductor's default decomposition table plus lqc's."""
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), torch.ops.lqc.qlinear.default: _qlinear}
