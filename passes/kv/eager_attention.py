"""Eager attention read as SDPA's arguments, so ``compress_kv`` can rewrite it like an SDPA.

Models that soft-cap their attention scores (Gemma 2) run transformers' ``eager_attention_forward``,
which a captured graph spells out as:

    scores = matmul(query, repeat_kv(keys).transpose(2, 3)) * scaling
    scores = tanh(scores / softcap) * softcap          # soft-capping, if the model has it
    scores = scores + mask                              # if there is a mask
    probs = softmax(scores, dim=-1, dtype=float32).to(dtype)
    probs = dropout(probs, p, training=False)
    out = matmul(probs, repeat_kv(values))              # [B, Hq, q, D]: SDPA's output layout

``match_eager_attention(softmax)`` walks that pattern from its softmax and returns SDPA's arguments,
the soft-cap, the node SDPA's output would replace, and the nodes that only that output needs.
Any other spelling (another scaling, an op in between, a node read elsewhere) is None: the
attention keeps its float cache and ``compress_kv`` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from lqc.ir import op_name


@dataclass
class EagerAttention:
    args: dict  # SDPA's: query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa
    softcap: float  # 0.0: no soft-capping
    output: fx.Node  # matmul(probs, values), where SDPA's output goes
    nodes: list[fx.Node]  # between the output and the keys, each before its inputs: dead once the output is replaced


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _constant(node: fx.Node, name: str, index: int = 1) -> float | None:
    """The number ``node`` (an ``op name``) multiplies or divides by, if it is one."""
    if op_name(node) != name or len(node.users) != 1 or len(node.args) <= index:
        return None
    value = node.args[index]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _probabilities_to_output(softmax: fx.Node) -> tuple[fx.Node, float, list[fx.Node]] | None:
    """From softmax down to matmul(probs, values): (that matmul, dropout p, the nodes in between)."""
    node, between, dropout_p = _only_user(softmax), [], 0.0
    while node is not None and op_name(node) in ("to", "dropout"):
        if op_name(node) == "dropout":
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            dropout_p = float(p) if training else 0.0
        between.append(node)
        node = _only_user(node)
    last = between[-1] if between else softmax
    if node is None or op_name(node) != "matmul" or node.args[0] is not last:
        return None
    return node, dropout_p, between


def _scores(node: fx.Node) -> tuple[fx.Node, float, float, list[fx.Node]] | None:
    """From softmax's input up to matmul(query, keys^T): (that matmul, scaling, softcap, nodes)."""
    nodes, softcap, scaling = [], 0.0, 1.0
    cap = _constant(node, "mul")
    if cap is not None and op_name(node.args[0]) == "tanh" and len(node.args[0].users) == 1:
        divided = node.args[0].args[0]
        if _constant(divided, "div") != cap:
            return None
        nodes += [node, node.args[0], divided]
        softcap, node = cap, divided.args[0]
    scale = _constant(node, "mul")
    if scale is not None:
        nodes.append(node)
        scaling, node = scale, node.args[0]
    if op_name(node) != "matmul" or len(node.users) != 1:
        return None
    return node, scaling, softcap, nodes + [node]


def match_eager_attention(softmax: fx.Node) -> EagerAttention | None:
    kwargs = dict(zip(("input", "dim"), softmax.args)) | softmax.kwargs
    if op_name(softmax) != "softmax" or kwargs.get("dim") not in (-1, 3) or len(softmax.users) != 1:
        return None
    down = _probabilities_to_output(softmax)
    if down is None:
        return None
    output, dropout_p, after = down
    scores, mask = kwargs["input"], None
    if op_name(scores) == "add" and len(scores.users) == 1 and len(scores.args) == 2:
        mask, scores = scores.args[1], scores.args[0]
        added = [softmax.args[0]]
    else:
        added = []
    up = _scores(scores)
    if up is None:
        return None
    product, scaling, softcap, before = up
    query, transposed = product.args[:2]
    if op_name(transposed) != "transpose" or len(transposed.users) != 1 or \
            {d % 4 for d in transposed.args[1:3] if isinstance(d, int)} != {2, 3}:
        return None
    args = {"query": query, "key": transposed.args[0], "value": output.args[1], "attn_mask": mask,
            "dropout_p": dropout_p, "is_causal": False, "scale": scaling, "enable_gqa": False}
    nodes = [*reversed(after), softmax, *added, *before, transposed]
    return EagerAttention(args, softcap, output, nodes)
