"""What Inductor sees of lqc's graphs on the CPU: C++ ops where lqc has them, and decode attention
as reductions it generates.

``lqc::qlinear`` is implemented in Python (lqc.runtime.quantization.qlinear): handed to Inductor
as is, every call of every layer crosses into the interpreter (~10 us each, 211 calls a SmolLM2
decode step), and Inductor's C++ wrapper would take the GIL to call it. ``use_cpu_kernel_ops``
points the ``int4_vnni`` and ``w8a8_vnni`` qlinears of a graph about to be compiled (the lowered
copy: those layouts exist only after pack_cpu_layouts) at the C++ ops computing the same thing
whole (``lqc_cpu::qlinear_int4_vnni``, ``lqc_cpu::qlinear_w8a8_vnni``). Not a decomposition:
Inductor refuses a table entry for an op some nodes keep (the other layouts), and one op per
linear is all it needs.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from lqc.ir import op_name


def use_cpu_kernel_ops(gm: fx.GraphModule) -> int:
    """Point ``lqc::qlinear`` nodes in the int4_vnni / w8a8_vnni layouts at lqc's C++ ops; how many."""
    count = 0
    for node in gm.graph.nodes:
        if op_name(node) != "lqc::qlinear" or node.args[5] not in ("int4_vnni", "w8a8_vnni") or len(node.args) > 9:
            continue  # a qlinear with low-rank factors keeps the Python op, which adds them
        x, qweight, _, _, bias, fmt, group_size, in_features, out_features = node.args
        if fmt == "int4_vnni":
            node.target = torch.ops.lqc_cpu.qlinear_int4_vnni.default
            node.args = (x, qweight, bias, group_size, in_features, out_features)
        else:
            node.target = torch.ops.lqc_cpu.qlinear_w8a8_vnni.default
            node.args = (x, qweight, bias, in_features, out_features)
        count += 1
    if count:
        gm.recompile()
    return count


# Up to this many query rows (decode steps, speculative drafts), attention runs as the two reductions
# below rather than ATen's CPU flash-attention kernel, whose fixed cost per call (~200 us for one
# token over a 192-slot cache, SmolLM2, measured) is 40% of a decode step.
DECODE_QUERY_ROWS = 16


def _decode_attention(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (what SDPA becomes on the CPU) for a few
    query rows, as two fused reductions Inductor generates: scores = q . k over the head dim,
    softmax over the slots, sum of p * v over the slots, in float32. The broadcast K/V of
    grouped-query attention (transformers' repeat_kv) is read through its index expression."""
    rows, head_dim = query.shape[-2], query.shape[-1]
    if not isinstance(rows, int) or rows > DECODE_QUERY_ROWS or dropout_p or is_causal or query.dim() != 4:
        return NotImplemented
    scale = scale if scale is not None else head_dim ** -0.5
    scores = (query.float()[:, :, :, None, :] * key.float()[:, :, None, :, :]).sum(-1) * scale  # [B, H, q, S]
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    logsumexp = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - logsumexp[..., None])
    out = (probs[..., None] * value.float()[:, :, None, :, :]).sum(-2)  # [B, H, q, D]
    # the kernel's output is [B, q, H, D] in memory, viewed as [B, H, q, D]: keep that layout
    return out.transpose(1, 2).contiguous().transpose(1, 2).to(query.dtype), logsumexp


class _SourceVersion(CustomGraphPass):
    """Inductor's caches (FX graph, AOTAutograd) key a compiled graph on its graph and config, not on
    the code of the decompositions that lowered it: this pass changes nothing but puts a hash of
    this module and of lqc's C++ kernel into the key, so editing either never serves stale code."""

    def __call__(self, graph) -> None:
        return None

    def uuid(self) -> str:
        return _source_hash()


@functools.cache
def _source_hash() -> str:
    from lqc.runtime.quantization.int4_int8_cpu import SOURCE

    return hashlib.sha256(Path(__file__).read_bytes() + SOURCE.read_bytes()).hexdigest()


def inductor_config_patches(cpp_wrapper: bool = False) -> dict:
    """Inductor config for lqc's graphs: the cache-key pass (unless the user set a pass of their own there)."""
    from torch._inductor import config

    patches = {"cpp_wrapper": True} if cpp_wrapper else {}
    if config.post_grad_custom_post_pass is None:
        patches["post_grad_custom_post_pass"] = _SourceVersion()
    return patches


@functools.cache
def inductor_decompositions() -> dict:
    """Inductor's default decomposition table plus lqc's."""
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: _decode_attention}
