"""``lqc::moe_ffn``: a routed mixture of FFN experts (schema and semantics: lqc.ir.lqc_ops).

Two implementations of the same math:

- ``moe_ffn_reference``: for each expert, gather the tokens routed to it, run its FFN, scatter
  the result back (index_add). Plain and obviously right; the tests' reference.
- ``moe_ffn``: what the op runs. Few routed pairs (decode: one token, top_k experts) take the
  gathered path: the picked experts' weights are gathered into [T*k, m, d] and two batched
  matmuls do the work, so a step reads top_k / E of the expert weights. Many tokens (prefill)
  take the grouped path: token-expert pairs sorted by expert, one matmul per expert on its
  contiguous group of tokens.

Routed experts are summed with weight 1 (the carve of a dense FFN: all experts active is the
dense FFN). Ties in the router scores go to the lower expert index (``torch.topk`` on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lqc.ir.lqc_ops import check_moe_ffn_shapes

_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
}


def route(x2: torch.Tensor, router_weight: torch.Tensor, router_bias: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """[T, top_k] expert indices per token, highest score first."""
    scores = F.linear(x2, router_weight.to(x2.dtype), None if router_bias is None else router_bias.to(x2.dtype))
    return scores.topk(top_k, dim=-1).indices


def _hidden(x: torch.Tensor, w_in, w_gate, b_in, act) -> torch.Tensor:
    """Neuron activations of one expert for tokens x [n, d]: [n, m]."""
    up = F.linear(x, w_in, b_in)
    return act(F.linear(x, w_gate)) * up if w_gate is not None else act(up)


def moe_ffn_reference(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, top_k: int, activation: str) -> torch.Tensor:
    check_moe_ffn_shapes(x.shape[-1], router_weight, router_bias, w_in, w_gate, b_in, w_out, top_k, activation)
    act = _ACTIVATIONS[activation]
    x2 = x.reshape(-1, x.shape[-1])
    experts = route(x2, router_weight, router_bias, top_k)
    out = x2.new_zeros(x2.shape[0], w_out.shape[1])
    for e in range(w_in.shape[0]):
        tokens = (experts == e).any(dim=-1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        h = _hidden(x2[tokens], w_in[e], None if w_gate is None else w_gate[e], None if b_in is None else b_in[e], act)
        out.index_add_(0, tokens, F.linear(h, w_out[e]))
    return out.reshape(*x.shape[:-1], w_out.shape[1])


def moe_ffn(x, router_weight, router_bias, w_in, w_gate, b_in, w_out, top_k: int, activation: str) -> torch.Tensor:
    act = _ACTIVATIONS[activation]
    experts_count = w_in.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    tokens = x2.shape[0]
    experts = route(x2, router_weight, router_bias, top_k)  # [T, k]
    pairs = experts.reshape(-1)  # pair p is token p // k with expert pairs[p]
    if tokens * top_k <= experts_count:
        # gathered: read only the picked experts' weights
        xs = x2.repeat_interleave(top_k, dim=0)[:, :, None]  # [P, d, 1]
        up = torch.bmm(w_in[pairs], xs)[..., 0]  # [P, m]
        if b_in is not None:
            up = up + b_in[pairs]
        h = act(torch.bmm(w_gate[pairs], xs)[..., 0]) * up if w_gate is not None else act(up)
        out = torch.bmm(w_out[pairs], h[:, :, None])[..., 0]  # [P, d_out]
        out = out.reshape(tokens, top_k, -1).sum(dim=1)
    else:
        # grouped: pairs sorted by expert, one matmul per expert on its tokens
        order = pairs.argsort(stable=True)
        token_of = order // top_k
        counts = torch.bincount(pairs, minlength=experts_count).tolist()
        out = x2.new_zeros(tokens, w_out.shape[1])
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            start += count
            h = _hidden(x2[rows], w_in[e], None if w_gate is None else w_gate[e], None if b_in is None else b_in[e], act)
            out.index_add_(0, rows, F.linear(h, w_out[e]))
    return out.reshape(*x.shape[:-1], w_out.shape[1])


# registered after the definition: the decorator form returns None, and the tests call moe_ffn directly
torch.library.impl("lqc::moe_ffn", "CompositeExplicitAutograd")(moe_ffn)
