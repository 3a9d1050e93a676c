"""The ops target lowerings put in a graph: schemas and shape (fake) implementations.

Their implementations are the generated kernels, registered by lqc.codegen against these schemas
(``torch.library.impl``) when the Triton target is used.

``lqc::fused_qlinear(x, qweight, scales, zeros, bias, norm_weight, norm_eps, inputs, kernel, fmt,
group_size, in_features, out_features, out_dtype, autotune)``: a qlinear fusion group,
``epilogue(norm(x) @ W.T + bias)`` by the generated kernel ``kernel`` (no norm when ``norm_eps``
is None; ``inputs`` the epilogue's other operands; ``fmt`` a canonical qlinear format).
Implementation: lqc.codegen.qlinear_kernels.

``lqc::moe_ffn_grouped(..., residual)``: ``lqc::moe_ffn`` (same operands) plus ``residual``, the
fusion group's epilogue, by two grouped-GEMM launches. Implementation: lqc.codegen.moe_gemm.
"""

from __future__ import annotations

import torch

_lib = torch.library.Library("lqc", "FRAGMENT")
_lib.define(
    "fused_qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, Tensor? norm_weight, "
    "float? norm_eps, Tensor[] inputs, str kernel, str fmt, SymInt group_size, SymInt in_features, SymInt out_features, "
    "ScalarType out_dtype, bool autotune) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)
_lib.define(
    "moe_ffn_grouped(Tensor x, Tensor router_weight, Tensor? router_bias, Tensor w_in, Tensor? w_gate, Tensor? b_in, "
    "Tensor w_out, SymInt shared, SymInt top_k, str activation, Tensor? w_in_scale=None, Tensor? w_gate_scale=None, "
    "Tensor? w_out_scale=None, Tensor? residual=None) -> Tensor",
    tags=(torch.Tag.pt2_compliant_tag,),
)

# Kernels whose epilogue reads the two halves of the GEMM's output (concat_linears' gate+up:
# ``act(y[:, :N]) * y[:, N:]``) and so write out_features / 2 columns. Only the code generating
# a kernel knows its program: lqc.codegen.qlinear_kernels adds its key here when it does.
HALF_WIDTH_KERNELS: set[str] = set()


@torch.library.register_fake("lqc::fused_qlinear")
def _fused_qlinear_fake(x, qweight, scales, zeros, bias, norm_weight, norm_eps, inputs, kernel, fmt, group_size,
                        in_features, out_features, out_dtype, autotune):
    width = out_features // 2 if kernel in HALF_WIDTH_KERNELS else out_features
    return x.new_empty((*x.shape[:-1], width), dtype=out_dtype)


@torch.library.register_fake("lqc::moe_ffn_grouped")
def _moe_ffn_grouped_fake(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                          w_in_scale=None, w_gate_scale=None, w_out_scale=None, residual=None):
    return x.new_empty((*x.shape[:-1], w_out.shape[1]))
