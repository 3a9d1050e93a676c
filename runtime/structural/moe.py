"""``lqc::moe_ffn``: shared plus routed FFN experts (schema and semantics: lqc.ir.lqc_ops).

Two implementations of the same math:

- ``moe_ffn_reference``: every token's active experts as a mask; for each expert, gather the
  tokens that use it, run its FFN, scatter the result back (index_add). Plain and obviously
  right: the tests' reference.
- ``moe_ffn``: what the op runs. Shared experts run on every token. Routed experts: with few
  token-expert pairs (decode: one token, top_k experts) each pair is one FFN on views of that
  expert's weights, so a step reads only the active experts' weights and copies none; with many
  (prefill) the pairs are sorted by expert and each expert runs one matmul on its contiguous
  group of tokens.

Experts are summed with weight 1 (a carve of a dense FFN: all experts active is the dense FFN).
int8 experts (codes plus per-row scales) are computed expert by expert, only the active ones.
With bfloat16 scales on the CPU, torch's int8 kernel (``torch._weight_int8pack_mm``) runs the
expert in bfloat16. Otherwise the codes are widened to x's dtype and the scales multiply the
matmul's output, which is ``x @ (codes * scale).T`` without building the scaled weight.
Ties in the router scores go to the lower expert index (``torch.topk`` on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lqc.ir.lqc_ops import check_moe_ffn_shapes

from lqc.runtime.quantization.qlinear import INT8_CPU_K_MULTIPLE

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}


def route(x2: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """[T, top_k] routed-expert indices (0 = the first routed expert) per token, best first."""
    scores = F.linear(x2, router_weight.to(x2.dtype), None if router_bias is None else router_bias.to(x2.dtype))
    return scores.topk(top_k, dim=-1).indices


def _linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a float weight, or int8 codes with per-row scales."""
    if scale is None:
        out = F.linear(x, weight.to(x.dtype))
    elif (scale.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 and x.device.type == "cpu"
          and weight.shape[1] % INT8_CPU_K_MULTIPLE == 0):  # other widths crash the kernel (a segfault)
        out = torch._weight_int8pack_mm(x, weight, scale)  # torch's int8 CPU kernel (bfloat16)
    else:
        out = F.linear(x, weight.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias.to(out.dtype)


def expert_ffn(x: torch.Tensor, e: int, w_in, w_gate, b_in, w_out, act, scales=(None, None, None)) -> torch.Tensor:
    """Expert ``e`` on tokens x [n, d]: [n, d_out]. ``scales``: w_in's, w_gate's and w_out's
    per-row scales [E, rows] when they hold int8 codes; bfloat16 scales run the expert in
    bfloat16 on torch's int8 CPU kernel (as lqc::qlinear's int8_cpu format does)."""
    s_in, s_gate, s_out = (None if s is None else s[e] for s in scales)
    dtype = x.dtype
    if s_in is not None and s_in.dtype == torch.bfloat16 and x.device.type == "cpu":
        x = x.to(torch.bfloat16)
    up = _linear(x, w_in[e], s_in, None if b_in is None else b_in[e])
    h = act(_linear(x, w_gate[e], s_gate)) * up if w_gate is not None else act(up)
    return _linear(h, w_out[e], s_out).to(dtype)


def moe_ffn_reference(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared: int, top_k: int, activation: str,
                      w_in_scale=None, w_gate_scale=None, w_out_scale=None):
    check_moe_ffn_shapes(x.shape[-1], router_weight, router_bias, w_in, w_gate, b_in, w_out, shared, top_k, activation,
                         w_in_scale, w_gate_scale, w_out_scale)
    act = _ACTIVATIONS[activation]
    # int8 experts: the reference widens every weight up front, then computes in float
    w_in, w_gate, w_out = (w if s is None else w.to(x.dtype) * s.to(x.dtype)[..., None]
                           for w, s in ((w_in, w_in_scale), (w_gate, w_gate_scale), (w_out, w_out_scale)))
    x2 = x.reshape(-1, x.shape[-1])
    active = torch.zeros(x2.shape[0], w_in.shape[0], dtype=torch.bool)
    active[:, :shared] = True
    active.scatter_(1, route(x2, router_weight, router_bias, top_k) + shared, True)
    out = x2.new_zeros(x2.shape[0], w_out.shape[1])
    for e in range(w_in.shape[0]):
        tokens = active[:, e].nonzero().flatten()
        if tokens.numel():
            out.index_add_(0, tokens, expert_ffn(x2[tokens], e, w_in, w_gate, b_in, w_out, act))
    return out.reshape(*x.shape[:-1], w_out.shape[1])


def moe_ffn(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, shared: int, top_k: int, activation: str,
            w_in_scale=None, w_gate_scale=None, w_out_scale=None):
    act = _ACTIVATIONS[activation]
    scales = (w_in_scale, w_gate_scale, w_out_scale)
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    routed = w_in.shape[0] - shared
    out = x2.new_zeros(tokens, w_out.shape[1])
    for e in range(shared):
        out += expert_ffn(x2, e, w_in, w_gate, b_in, w_out, act, scales)
    picked = route(x2, router_weight, router_bias, top_k)  # [T, k]
    if tokens * top_k <= routed:
        # few pairs: one expert FFN per pair, on views of its weights
        for t, experts in enumerate(picked.tolist()):
            for e in experts:
                out[t] += expert_ffn(x2[t : t + 1], shared + e, w_in, w_gate, b_in, w_out, act, scales)[0]
    else:
        # many pairs: sorted by expert, one matmul per expert on its tokens
        pairs = picked.reshape(-1)
        order = pairs.argsort(stable=True)
        token_of = order // top_k
        start = 0
        for e, count in enumerate(torch.bincount(pairs, minlength=routed).tolist()):
            if count:
                rows = token_of[start : start + count]
                out.index_add_(0, rows, expert_ffn(x2[rows], shared + e, w_in, w_gate, b_in, w_out, act, scales))
                start += count
    return out.reshape(*x.shape[:-1], w_out.shape[1])


# registered after the definition: the decorator form returns None, and the tests call moe_ffn directly
torch.library.impl("lqc::moe_ffn", "CompositeExplicitAutograd")(moe_ffn)
