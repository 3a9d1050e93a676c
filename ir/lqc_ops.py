"""lqc's own ops: schemas, shape (fake) implementations and graph invariants.

The implementations that compute live in ``lqc.runtime`` (reference math and fast CPU kernels);
here is what a graph needs to be checked and shape-propagated without running anything. The ops
of target lowerings (``fused_qlinear``, ``moe_ffn_grouped``) are in ``kernel_ops``.

``lqc::qlinear(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features,
lowrank_a=None, lowrank_b=None, lowrank_scale=None)`` computes ``x @ W.T + bias`` for a quantized
weight W, plus ``((x @ A.T) @ B.T) * scale`` where the lowrank pass gave it error-compensation
factors (lqc.runtime.quantization.lowrank: int8 or bf16). ``fmt`` names the format and layout:

| fmt | qweight | scales | zeros | computed by |
| --- | --- | --- | --- | --- |
| ``int8`` | int8 [N, K] | [N] | - | reference: dequantize, matmul in x's dtype |
| ``int8_cpu`` | int8 [N, K] | [N] bf16 | - | ``torch._weight_int8pack_mm`` in bf16 |
| ``int4`` | uint8 [N, K/2] (two codes a byte) | [N, K/g] | [N, K/g] | reference |
| ``int4_cpu`` | torch's CPU int4 layout [N, K/2] | [K/g, N, 2] bf16 scales and zeros | - | ``torch._weight_int4pack_mm_for_cpu`` in bf16 |
| ``int4_vnni`` | uint8 [ceil(N/16), bytes]: codes, fp16 scales and zeros in one stream | empty | - | activations to int8 per token, ``lqc_cpu::int4_int8_mm`` (AVX-512 VNNI) |
| ``w8a8`` | int8 [N, K] | [N] | - | activations to int8 per token, int8 x int8 matmul |
| ``w8a8_vnni`` | uint8 [ceil(N/16), K/4 * 64 + 128]: codes, row sums, float32 scales | empty | - | as w8a8, ``lqc_cpu::int8_int8_mm`` (AVX-512 VNNI) |
| ``fp8`` | float8_e4m3fn [N, K] | [N] | - | reference |
| ``fp8_dyn`` | float8_e4m3fn [N, K] | [N] | - | activations to fp8 e4m3 per token, ``torch._scaled_mm`` |

K is the padded width (a multiple of the group size); ``in_features`` is x's width.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._library.opaque_object import get_opaque_type_name, register_opaque_type
from torch._opaque_base import OpaqueBase

from . import kernel_ops  # noqa: F401  (the ops target lowerings put in: fused_qlinear, moe_ffn_grouped)
from .errors import VerificationError
from .graph import Graph
from .lint import register_op_verifier

QLINEAR_FORMATS = ("int8", "int8_cpu", "int4", "int4_cpu", "int4_vnni", "w8a8", "w8a8_vnni", "fp8", "fp8_dyn")

_lib = torch.library.Library("lqc", "FRAGMENT")
_lib.define(
    "qlinear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, str fmt, "
    "int group_size, int in_features, int out_features, Tensor? lowrank_a=None, Tensor? lowrank_b=None, "
    "Tensor? lowrank_scale=None) -> Tensor"
)


@torch.library.register_fake("lqc::qlinear")
def _qlinear_fake(x, qweight, scales, zeros, bias, fmt, group_size, in_features, out_features,
                  lowrank_a=None, lowrank_b=None, lowrank_scale=None):
    return x.new_empty((*x.shape[:-1], out_features))


QLINEAR_ARGS = ("x", "qweight", "scales", "zeros", "bias", "fmt", "group_size", "in_features", "out_features",
                "lowrank_a", "lowrank_b", "lowrank_scale")


def qlinear_args(node: fx.Node) -> dict:
    """The node's arguments by name; the low-rank ones are None where the node has none."""
    return {**dict.fromkeys(QLINEAR_ARGS[9:]), **dict(zip(QLINEAR_ARGS, node.args)), **node.kwargs}


def has_lowrank(node: fx.Node) -> bool:
    """Whether a qlinear node carries low-rank compensation factors (the lowrank pass)."""
    return qlinear_args(node)["lowrank_a"] is not None


def _check_qlinear(graph: Graph, node: fx.Node) -> None:
    a = qlinear_args(node)
    where = f"lqc::qlinear %{node.name}"
    _check_weight(graph, a, where)
    _check_lowrank(graph, a, where)


def _check_weight(graph: Graph, a: dict, where: str) -> None:
    fmt, n, k_in, g = a["fmt"], a["out_features"], a["in_features"], a["group_size"]
    if fmt not in QLINEAR_FORMATS:
        raise VerificationError(f"{where}: unknown format {fmt!r}; formats: {', '.join(QLINEAR_FORMATS)}")
    x = a["x"].meta.get("val") if isinstance(a["x"], fx.Node) else None
    if x is not None and x.shape[-1] != k_in:
        raise VerificationError(f"{where}: input has {x.shape[-1]} features, the weight expects {k_in}")
    q = graph.constant(a["qweight"]) if graph.is_constant(a["qweight"]) else a["qweight"].meta.get("val")
    if fmt == "int4_vnni":  # blocks of 16 rows, each a byte stream of K / g groups (int4_int8_cpu.py)
        per_group = g // 8 * 64 + 64 if g > 0 and g % 8 == 0 else 0
        if not per_group or q.shape[0] != -(-n // 16) or q.shape[1] % per_group or q.shape[1] // per_group * g < k_in:
            raise VerificationError(f"{where}: packed int4_vnni weight {tuple(q.shape)} does not hold [{n}, {k_in}] "
                                    f"in groups of {g}")
        return
    if fmt == "w8a8_vnni":  # blocks of 16 rows: K/4 chunks of 64 bytes, then row sums and scales
        if q.shape[0] != -(-n // 16) or (q.shape[1] - 128) % 64 or (q.shape[1] - 128) // 16 < k_in:
            raise VerificationError(f"{where}: packed w8a8_vnni weight {tuple(q.shape)} does not hold [{n}, {k_in}]")
        return
    packed = fmt.startswith("int4")
    k = q.shape[1] * (2 if packed else 1)
    if q.shape[0] != n or k < k_in:
        raise VerificationError(f"{where}: qweight {tuple(q.shape)} does not fit [{n}, {k_in}] in format {fmt}")
    if packed and (g <= 0 or k % g):
        raise VerificationError(f"{where}: padded width {k} is not a multiple of the group size {g}")


def _check_lowrank(graph: Graph, a: dict, where: str) -> None:
    """Factors a [r, in_features] and b [out_features, r], both or neither; a scale [out_features] with int8 ones."""
    if a["lowrank_a"] is None and a["lowrank_b"] is None:
        return
    value = lambda n: graph.constant(n) if graph.is_constant(n) else n.meta.get("val")  # noqa: E731
    fa, fb = value(a["lowrank_a"]), value(a["lowrank_b"]) if a["lowrank_b"] is not None else None
    if fa is None or fb is None or fa.dim() != 2 or fb.dim() != 2:
        raise VerificationError(f"{where}: low-rank factors need both a [r, K] and b [N, r]")
    if fa.shape[1] != a["in_features"] or fb.shape[0] != a["out_features"] or fa.shape[0] != fb.shape[1]:
        raise VerificationError(f"{where}: low-rank factors a {tuple(fa.shape)} and b {tuple(fb.shape)} do not fit "
                                f"[{a['out_features']}, {a['in_features']}]")
    if fa.dtype == torch.int8 and a["lowrank_scale"] is None:
        raise VerificationError(f"{where}: int8 low-rank factors need their scale [{a['out_features']}]")


register_op_verifier("lqc::qlinear", _check_qlinear)


# ``lqc::hadamard(x, left, right)``: ``x @ kron(left, right)`` on the last dimension, the online
# rotation QuaRot puts before a down projection (implementation: lqc.runtime.quantization.hadamard).
_lib.define("hadamard(Tensor x, Tensor left, Tensor right) -> Tensor")


@torch.library.register_fake("lqc::hadamard")
def _hadamard_fake(x, left, right):
    return x.new_empty(x.shape)


def _check_hadamard(graph: Graph, node: fx.Node) -> None:
    x, left, right = node.args
    width = x.meta["val"].shape[-1] if isinstance(x, fx.Node) and "val" in x.meta else None
    m, p = (graph.constant(c).shape[0] if graph.is_constant(c) else c.meta["val"].shape[0] for c in (left, right))
    if width is not None and width != m * p:
        raise VerificationError(f"lqc::hadamard %{node.name}: input width {width} is not {m} x {p}")


register_op_verifier("lqc::hadamard", _check_hadamard)


# ``lqc::moe_ffn(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation)``:
# an FFN carved into E experts of m neurons (lqc.passes.structural.ffn_to_moe). Experts 0..shared-1 are
# always active; of the others, the router scores ``x @ router_weight.T + router_bias`` pick the
# top_k per token. Each active expert e adds ``h_e @ w_out[e].T`` with weight 1, where h_e is
# ``act(x @ w_gate[e].T) * (x @ w_in[e].T)`` (gated, SwiGLU) or ``act(x @ w_in[e].T + b_in[e])``.
# Shapes: router_weight [E - shared, d], router_bias [E - shared], w_in / w_gate [E, m, d],
# b_in [E, m], w_out [E, d_out, m]. With top_k = E - shared it is the dense FFN of all E x m
# neurons (output bias excluded: the graph adds it). Implementations: lqc.runtime.structural.moe.
# int8 experts (the quantize pass): w_in, w_gate and w_out hold int8 codes and the optional
# trailing operands w_in_scale / w_gate_scale [E, m] and w_out_scale [E, d_out] their symmetric
# per-output-channel scales, the weight being ``codes * scale[..., None]``.
MOE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
_lib.define(
    "moe_ffn(Tensor x, Tensor router_weight, Tensor? router_bias, Tensor w_in, Tensor? w_gate, Tensor? b_in, "
    "Tensor w_out, int shared, int top_k, str activation, Tensor? w_in_scale=None, Tensor? w_gate_scale=None, "
    "Tensor? w_out_scale=None) -> Tensor"
)


@torch.library.register_fake("lqc::moe_ffn")
def _moe_ffn_fake(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                  w_in_scale=None, w_gate_scale=None, w_out_scale=None):
    # checked when a graph is traced, not on every eager call (decode calls it per layer per token)
    check_moe_ffn_shapes(x.shape[-1], router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                         w_in_scale, w_gate_scale, w_out_scale)
    return x.new_empty((*x.shape[:-1], w_out.shape[1]))


MOE_FFN_ARGS = ("x", "router_weight", "router_bias", "w_in", "w_gate", "b_in", "w_out", "shared", "top_k", "activation",
                "w_in_scale", "w_gate_scale", "w_out_scale")
MOE_FFN_SCALES = {"w_in": "w_in_scale", "w_gate": "w_gate_scale", "w_out": "w_out_scale"}


def moe_ffn_args(node: fx.Node) -> dict:
    """The node's operands by name, the omitted trailing scales as None."""
    return {**dict.fromkeys(MOE_FFN_SCALES.values()), **dict(zip(MOE_FFN_ARGS, node.args)), **node.kwargs}


def check_moe_ffn_shapes(x_width, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                         w_in_scale=None, w_gate_scale=None, w_out_scale=None) -> None:
    """Raise ValueError naming the first inconsistency between the operands."""
    if w_in.dim() != 3:
        raise ValueError(f"w_in must be [experts, neurons, width], got {tuple(w_in.shape)}")
    experts, neurons, width = w_in.shape
    routed = experts - shared
    if x_width is not None and x_width != width:
        raise ValueError(f"the input has {x_width} features, the experts expect {width}")
    if not 0 <= shared < experts:
        raise ValueError(f"shared is {shared}; it must be between 0 and {experts - 1} (at least one routed expert)")
    if tuple(router_weight.shape) != (routed, width):
        raise ValueError(f"router_weight is {tuple(router_weight.shape)}, expected [{routed}, {width}] (one row per routed expert)")
    if router_bias is not None and tuple(router_bias.shape) != (routed,):
        raise ValueError(f"router_bias is {tuple(router_bias.shape)}, expected [{routed}]")
    if w_gate is not None and w_gate.shape != w_in.shape:
        raise ValueError(f"w_gate is {tuple(w_gate.shape)}, expected {tuple(w_in.shape)} like w_in")
    if b_in is not None and tuple(b_in.shape) != (experts, neurons):
        raise ValueError(f"b_in is {tuple(b_in.shape)}, expected [{experts}, {neurons}]")
    if w_out.dim() != 3 or w_out.shape[0] != experts or w_out.shape[2] != neurons:
        raise ValueError(f"w_out is {tuple(w_out.shape)}, expected [{experts}, out_features, {neurons}]")
    if not 1 <= top_k <= routed:
        raise ValueError(f"top_k is {top_k}; it must be between 1 and the {routed} routed experts")
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {', '.join(MOE_ACTIVATIONS)}")
    for name, weight, scale in (("w_in", w_in, w_in_scale), ("w_gate", w_gate, w_gate_scale), ("w_out", w_out, w_out_scale)):
        if weight is None:
            if scale is not None:
                raise ValueError(f"{name}_scale is given without {name}")
            continue
        if (weight.dtype == torch.int8) != (scale is not None):
            raise ValueError(f"{name} is {weight.dtype}: int8 codes need {name}_scale, and {name}_scale needs int8 codes")
        if scale is not None and tuple(scale.shape) != tuple(weight.shape[:2]):
            raise ValueError(f"{name}_scale is {tuple(scale.shape)}, expected {list(weight.shape[:2])} (one per expert row of {name})")


def _check_moe_ffn(graph: Graph, node: fx.Node) -> None:
    a = moe_ffn_args(node)

    def value(arg):
        if arg is None:
            return None
        return graph.constant(arg) if graph.is_constant(arg) else arg.meta.get("val")

    x = value(a["x"])
    tensors = [value(a[k]) for k in MOE_FFN_ARGS[1:7]]
    scales = [value(a[k]) for k in MOE_FFN_SCALES.values()]
    try:
        check_moe_ffn_shapes(None if x is None else x.shape[-1], *tensors, a["shared"], a["top_k"], a["activation"], *scales)
    except ValueError as exc:
        raise VerificationError(f"lqc::moe_ffn %{node.name}: {exc}") from None


register_op_verifier("lqc::moe_ffn", _check_moe_ffn)


# ``lqc::keep_top_neurons(hidden, gate, neuron_weight, k)``: an FFN routed neuron by neuron (each
# neuron an expert of one; the gate projection is the router). ``hidden`` [..., n] is the down
# projection's input, ``gate`` [..., n] the activated gate (for an ungated FFN, hidden itself),
# ``neuron_weight`` [n] a calibrated per-neuron scale. Per token, the k neurons with the highest
# ``|gate| * neuron_weight`` keep their value and the others become 0 (ties go to the lower index).
# Implementations: lqc.runtime.structural.neuron_routing.
_lib.define("keep_top_neurons(Tensor hidden, Tensor gate, Tensor neuron_weight, int k) -> Tensor")


def check_keep_top_neurons_shapes(hidden_shape, gate_shape, weight_shape, k: int) -> None:
    """Raise ValueError naming the first inconsistency between the operands."""
    n = hidden_shape[-1]
    if tuple(gate_shape) != tuple(hidden_shape):
        raise ValueError(f"gate is {tuple(gate_shape)}, expected {tuple(hidden_shape)} like hidden")
    if tuple(weight_shape) != (n,):
        raise ValueError(f"neuron_weight is {tuple(weight_shape)}, expected [{n}] (one per neuron)")
    if not 1 <= k <= n:
        raise ValueError(f"k is {k}; it must be between 1 and the {n} neurons")


@torch.library.register_fake("lqc::keep_top_neurons")
def _keep_top_neurons_fake(hidden, gate, neuron_weight, k):
    check_keep_top_neurons_shapes(hidden.shape, gate.shape, neuron_weight.shape, k)
    return torch.empty_like(hidden)


def _check_keep_top_neurons(graph: Graph, node: fx.Node) -> None:
    hidden, gate, weight, k = node.args
    shapes = [graph.constant(a).shape if graph.is_constant(a) else a.meta.get("val", None) for a in (hidden, gate, weight)]
    shapes = [s.shape if isinstance(s, torch.Tensor) else s for s in shapes]
    if any(s is None for s in shapes):
        return
    try:
        check_keep_top_neurons_shapes(*shapes, k)
    except ValueError as exc:
        raise VerificationError(f"lqc::keep_top_neurons %{node.name}: {exc}") from None


register_op_verifier("lqc::keep_top_neurons", _check_keep_top_neurons)


# ``lqc::kv_attention(store, query, keys, values, attention_mask, scaling)``: one attention layer's
# cache update and attention over a compressed KV cache, as one op. ``store`` is the layer's
# ``KVStore``: a handle torch.compile passes into the graph as an opaque input, so the cache's
# state (quantized blocks closing, eviction) lives outside the graph and never becomes a guard;
# a graph of decode steps compiles once, not once per block. ``keys`` and ``values`` [B, Hkv, q, D]
# are this step's new tokens, appended by the op; ``query`` [B, Hq, q, D]; ``attention_mask`` over
# token positions as transformers builds it (boolean or additive), or None. Returns
# [B, q, Hq, D], as transformers' attention functions do. Implementation: lqc.runtime.kv.attention.
class KVStore(OpaqueBase):
    """One attention layer's compressed cache, as lqc's KV ops receive it (``layer``: the
    lqc.runtime cache layer that holds the tensors)."""

    def __init__(self, layer) -> None:
        self.layer = layer

    def __repr__(self) -> str:
        return f"KVStore({type(self.layer).__name__})"


register_opaque_type(KVStore, typ="reference")
_lib.define(
    f"kv_attention({get_opaque_type_name(KVStore)} store, Tensor query, Tensor keys, Tensor values, "
    "Tensor? attention_mask, float scaling, float softcap=0.0) -> Tensor"
)

# The same, for transformers' own caches, put in by the ``compress_kv`` pass in place of the
# cache update and SDPA of a compiled graph (implementation: lqc.runtime.kv.graph_cache). The
# compressed layer is found from the tensors transformers' cache holds; the options say how a
# new one compresses (bits 0: no quantization; window and snapkv 0: no eviction).
#
# ``kv_dynamic_attention``: ``DynamicCache``. ``past_keys`` and ``past_values`` are what the
# cache holds for the layer ([B, Hkv, T, D], or the empty 1-d tensor before the first token).
# Returns the attention [B, Hq, q, D] (SDPA's layout) and, in place of the concatenated keys and
# values, two handles [B, Hkv, T + q, D] of stride 0 (one NaN each) for the cache to hold.
# ``sliding_window`` W > 0: the layer is transformers' ``DynamicSlidingWindowLayer``, whose past
# holds the last W - 1 tokens only and whose mask starts at the window; the handles are sliced
# to the last W - 1 tokens by the graph, as the keys were.
#
# ``softcap`` c > 0 (all three ops): the scores are soft-capped, c * tanh(scores / c), before the
# mask is added (Gemma 2's attention, rewritten from its eager form).
#
# ``kv_static_attention``: ``StaticCache``. ``key_buffer`` and ``value_buffer`` are its buffers
# (never written: the tokens go to the compressed layer); ``cache_position`` [q] the positions
# of the new tokens. Returns the attention [B, Hq, q, D].
KV_CACHE_OPTIONS = "int bits, int group, int residual, int sinks, int window, int snapkv, int observation"
_lib.define(
    "kv_dynamic_attention(Tensor past_keys, Tensor past_values, Tensor query, Tensor keys, Tensor values, "
    f"Tensor? attention_mask, float scaling, bool causal, {KV_CACHE_OPTIONS}, int sliding_window=0, "
    "float softcap=0.0) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "kv_static_attention(Tensor key_buffer, Tensor value_buffer, Tensor cache_position, Tensor query, Tensor keys, "
    f"Tensor values, Tensor? attention_mask, float scaling, bool causal, {KV_CACHE_OPTIONS}, float softcap=0.0) -> Tensor"
)

# ``kv_placeholder(past, new)``: what a dynamic cache keeps for an attention layer no attention
# reads (drop_layers removed it): a handle-like tensor of the concatenated shape, one NaN, no layer
# behind it. Pure.
_lib.define("kv_placeholder(Tensor past, Tensor new) -> Tensor")

# Ops that change state outside the graph: a pass must neither drop nor merge two calls, and a
# graph holding one cannot be run a second time to check it (its tokens would be appended twice).
# (dynamo's graphs call the packet, torch.ops.lqc.kv_attention; traced ones the overload)
STATEFUL_OPS = tuple(
    op for packet in (torch.ops.lqc.kv_attention, torch.ops.lqc.kv_dynamic_attention, torch.ops.lqc.kv_static_attention)
    for op in (packet, packet.default)
)
for _op in STATEFUL_OPS:
    torch.fx.node.has_side_effect(_op)


def _attention_like(query: torch.Tensor) -> torch.Tensor:
    """An output of SDPA's shape and strides: [B, Hq, q, D], computed as [B, q, Hq, D]."""
    b, query_heads, length, head_dim = query.shape
    return query.new_empty((b, length, query_heads, head_dim)).transpose(1, 2)


def kv_handle_shape(past_keys: torch.Tensor, keys: torch.Tensor) -> tuple:
    """[B, Hkv, T + q, D]: the concatenated shape the dynamic cache's handles stand for."""
    past = past_keys.shape[-2] if past_keys.dim() == 4 else 0
    b, heads, new, head_dim = keys.shape
    return (b, heads, past + new, head_dim)


@torch.library.register_fake("lqc::kv_dynamic_attention")
def _kv_dynamic_attention_fake(past_keys, past_values, query, keys, values, attention_mask, scaling, causal, *options,
                               **kwargs):
    check_kv_attention_shapes(query, keys, values)
    return (_attention_like(query), keys.new_empty(()).expand(kv_handle_shape(past_keys, keys)),
            values.new_empty(()).expand(kv_handle_shape(past_values, values)))


@torch.library.register_fake("lqc::kv_placeholder")
def _kv_placeholder_fake(past, new):
    return new.new_empty(()).expand(kv_handle_shape(past, new))


@torch.library.register_fake("lqc::kv_static_attention")
def _kv_static_attention_fake(key_buffer, value_buffer, cache_position, query, keys, values, attention_mask, scaling,
                              causal, *options, **kwargs):
    check_kv_attention_shapes(query, keys, values)
    return _attention_like(query)


@torch.library.register_fake("lqc::kv_attention")
def _kv_attention_fake(store, query, keys, values, attention_mask, scaling, softcap=0.0):
    check_kv_attention_shapes(query, keys, values)
    b, query_heads, length, head_dim = query.shape
    return query.new_empty((b, length, query_heads, head_dim))


def check_kv_attention_shapes(query, keys, values) -> None:
    """Raise ValueError naming the first inconsistency between the query and the new keys and values."""
    if query.dim() != 4 or keys.dim() != 4 or keys.shape != values.shape:
        raise ValueError(f"lqc::kv_attention takes query [B, Hq, q, D] and keys = values [B, Hkv, q, D]; "
                         f"got {tuple(query.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    if query.shape[-1] != keys.shape[-1] or query.shape[-2] != keys.shape[-2] or query.shape[1] % keys.shape[1]:
        raise ValueError(f"lqc::kv_attention: query {tuple(query.shape)} and keys {tuple(keys.shape)} differ in tokens or "
                         f"head size, or the query heads are not a multiple of the KV heads")
