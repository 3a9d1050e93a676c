"""Low-rank keys and values (Palu, Chang et al., 2024): the cache holds a latent per token.

For each attention layer, ``k_proj`` and ``v_proj`` are factorized, ``W ~ up @ down`` with a
rank-r ``down`` [r, hidden] (whitened by the calibration activations when given, as SVD-LLM does:
it minimizes the error of ``x @ W.T`` on them, not of W), in float64. The cache stores
``x @ down.T`` for keys and for values: r_k + r_v numbers per token instead of 2 x KV heads x
head_dim.

- **Keys** are reconstructed from the latents at every step, *before* RoPE (the latent has no
  position), and rotated at their own positions.
- **Values** are never reconstructed: ``up_v`` folds into ``o_proj``. Query head h reads KV head
  g, so its output ``P_h @ V_g = (P_h @ latent_v) @ up_v[g].T`` and ``o_proj``'s block for head h
  becomes ``W_o[:, h] @ up_v[g]``: attention mixes the latents directly.

``lowrank_kv(model, rank=0.5, calibration=ids)`` swaps every Llama-style attention module
(q/k/v/o projections, ``num_key_value_groups``, the model's ``rotary_emb``) for a
``LowRankKVAttention`` in place and returns the model. Any transformers cache holds the latents
(as one "head" of r channels); a ``CompressedKVCache`` quantizes them as well.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def whitened_factors(weight: torch.Tensor, rank: int, inputs_gram: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (up [out, rank], down [rank, in]) minimizing ||X (W - up down)^T|| for
    the inputs X whose Gram matrix X^T X is ``inputs_gram`` (plain truncated SVD without it)."""
    w = weight.to(torch.float64)
    if inputs_gram is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :rank] * s[:rank]).to(weight.dtype), vh[:rank].to(weight.dtype)
    gram = inputs_gram.to(torch.float64)
    gram = gram + 1e-6 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)  # full rank
    chol = torch.linalg.cholesky(gram)  # gram = L L^T, so ||X A^T|| = ||L^T A^T||
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    down = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)  # vh_r L^-1
    return (u[:, :rank] * s[:rank]).to(weight.dtype), down.to(weight.dtype)


class LowRankKVAttention(nn.Module):
    """A Llama-style attention whose cache holds key and value latents (see the module doc)."""

    def __init__(self, attention: nn.Module, rotary: nn.Module, key_rank: int, value_rank: int,
                 key_gram: torch.Tensor | None = None, value_gram: torch.Tensor | None = None):
        super().__init__()
        self.layer_idx, self.head_dim = attention.layer_idx, attention.head_dim
        self.scaling, self.config = attention.scaling, attention.config
        self.num_key_value_groups = attention.num_key_value_groups
        self.kv_heads = attention.k_proj.out_features // self.head_dim
        self.q_proj, self.rotary = attention.q_proj, rotary
        key_up, key_down = whitened_factors(attention.k_proj.weight.detach(), key_rank, key_gram)
        value_up, value_down = whitened_factors(attention.v_proj.weight.detach(), value_rank, value_gram)
        self.key_down = nn.Linear(key_down.shape[1], key_rank, bias=False)
        self.key_down.weight.data = key_down
        self.key_up = nn.Parameter(key_up, requires_grad=False)  # [kv heads * head_dim, key_rank]
        self.key_bias = attention.k_proj.bias
        self.value_down = nn.Linear(value_down.shape[1], value_rank, bias=False)
        self.value_down.weight.data = value_down
        self.o_proj = self._fold_value_up(attention.o_proj, value_up, attention.v_proj.bias)

    def _fold_value_up(self, o_proj: nn.Linear, value_up: torch.Tensor, value_bias) -> nn.Linear:
        heads = o_proj.in_features // self.head_dim
        w_o = o_proj.weight.detach().to(torch.float64).reshape(o_proj.out_features, heads, self.head_dim)
        up = value_up.to(torch.float64).reshape(self.kv_heads, self.head_dim, -1)[torch.arange(heads) // self.num_key_value_groups]
        folded = torch.einsum("ohd,hdr->ohr", w_o, up).reshape(o_proj.out_features, -1)
        out = nn.Linear(folded.shape[1], o_proj.out_features, bias=o_proj.bias is not None or value_bias is not None)
        out.weight.data = folded.to(o_proj.weight.dtype)
        if out.bias is not None:  # attention weights sum to 1, so the value bias passes through to o_proj
            bias = o_proj.bias.detach().to(torch.float64) if o_proj.bias is not None else 0
            if value_bias is not None:  # query head h reads KV head h // groups
                per_head = value_bias.detach().to(torch.float64).reshape(self.kv_heads, self.head_dim)
                bias = bias + w_o.reshape(o_proj.out_features, -1) @ per_head[torch.arange(heads) // self.num_key_value_groups].reshape(-1)
            out.bias.data = torch.as_tensor(bias).to(o_proj.weight.dtype)
        return out

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, cache=None,
                **kwargs):
        past_key_values = cache if cache is not None else past_key_values  # transformers >= 5.24 passes `cache`
        b, length = hidden_states.shape[:2]
        query = self.q_proj(hidden_states).view(b, length, -1, self.head_dim).transpose(1, 2)
        key_latent = self.key_down(hidden_states)[:, None]  # [B, 1, L, r_k]
        value_latent = self.value_down(hidden_states)[:, None]
        if past_key_values is not None:
            key_latent, value_latent = past_key_values.update(key_latent, value_latent, self.layer_idx)
            if not isinstance(key_latent, torch.Tensor):  # a CompressedKVCache's pending tokens: this attention reads tensors
                pending = key_latent
                key_latent, value_latent = pending.store.layer.dequantized_update(pending.keys, pending.values)
        tokens = key_latent.shape[-2]
        keys = key_latent[:, 0] @ self.key_up.T
        if self.key_bias is not None:
            keys = keys + self.key_bias
        keys = keys.view(b, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        positions = torch.arange(tokens, device=hidden_states.device).expand(b, tokens)
        key_cos, key_sin = self.rotary(keys, positions)  # keys rotated at their own positions, after reconstruction
        query = query * cos[:, None] + _rotate_half(query) * sin[:, None]
        keys = keys * key_cos[:, None] + _rotate_half(keys) * key_sin[:, None]
        values = value_latent.expand(b, self.kv_heads, tokens, value_latent.shape[-1])
        causal = attention_mask is None and length > 1 and length == tokens
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=attention_mask, is_causal=causal,
                                             scale=self.scaling, enable_gqa=True)  # [B, Hq, L, r_v]
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1)), None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if all(hasattr(child, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "num_key_value_groups", "layer_idx")):
                found.append((parent, name, child))
    return found


@torch.no_grad()
def lowrank_kv(model: nn.Module, rank: float = 0.5, calibration: torch.Tensor | None = None) -> nn.Module:
    """Swap every Llama-style attention of ``model`` for a ``LowRankKVAttention`` keeping ``rank``
    (a fraction of KV heads x head_dim) of its keys and values; ``calibration``: token ids [N, L]
    whose activations whiten the factorization. Returns ``model`` (changed in place)."""
    attentions = _attention_modules(model)
    rotary = getattr(getattr(model, "model", model), "rotary_emb", None)
    if not attentions or rotary is None:
        raise ValueError("lowrank_kv needs Llama-style attention modules (q_proj, k_proj, v_proj, o_proj, "
                         "num_key_value_groups) and a model.model.rotary_emb; this model has "
                         f"{len(attentions)} such modules and {'a' if rotary else 'no'} rotary_emb")
    if not 0 < rank <= 1:
        raise ValueError(f"rank is the fraction of KV heads x head_dim kept, in (0, 1]; got {rank}")
    grams = _input_grams(model, attentions, calibration) if calibration is not None else {}
    for parent, name, attention in attentions:
        full = attention.k_proj.out_features
        kept = max(1, round(rank * full))
        gram = grams.get(id(attention))
        setattr(parent, name, LowRankKVAttention(attention, rotary, kept, kept, gram, gram))
    return model


def _input_grams(model, attentions, calibration: torch.Tensor) -> dict[int, torch.Tensor]:
    """X^T X of each attention's input (k_proj and v_proj read the same), in float64, over ``calibration``."""
    grams, hooks = {}, []
    for _, _, attention in attentions:
        def accumulate(module, args, key=id(attention)):
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            grams[key] = grams.get(key, 0) + x.T @ x
        hooks.append(attention.k_proj.register_forward_pre_hook(accumulate))
    try:
        for window in calibration:
            model(input_ids=window[None], use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return grams
