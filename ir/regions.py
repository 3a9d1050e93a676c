"""Regions: which nodes form a decoder block, its attention, its FFN, a norm, an embedding, the lm_head.

Module paths (``node.meta["nn_module_stack"]``) say where a node ran; structure says what it is.
Names alone would break on the next model family (``mlp`` vs ``feed_forward`` vs ``intermediate``),
so each region kind is recognised by the ops it contains:

- block: a module indexed inside a list (``model.layers.3``) that contains an attention op;
- attention: the child of a block that contains the attention op (sdpa, softmax over a matmul, or
  compress_kv's attention over a compressed cache);
- ffn: the other children of a block that hold linears and an activation (BERT splits its FFN
  over two modules, ``intermediate`` and ``output``; they form one region);
- norm: a module that normalizes (rsqrt of a mean, ``layer_norm``, ``rms_norm``) with no linear;
- embedding: a module with an ``embedding`` lookup of a constant table;
- lm_head: a linear outside the blocks whose weight has one row per vocabulary entry.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph import Graph
from .ops import ACTIVATION_OPS, LINEAR_OPS, SHAPE_ONLY_OPS, op_name

REGION_KINDS = ("block", "attention", "ffn", "norm", "embedding", "lm_head")

# When a node lies in several regions, it is annotated with the most specific one.
_SPECIFICITY = {"block": 0, "attention": 1, "ffn": 1, "lm_head": 2, "embedding": 2, "norm": 3}


@dataclass(frozen=True)
class Region:
    kind: str  # one of REGION_KINDS
    path: str  # module path, e.g. "model.layers.3.self_attn"
    block: int | None  # index of the decoder block it belongs to
    modules: tuple[str, ...]  # module paths it covers (BERT's FFN covers two)
    nodes: tuple[str, ...]  # names of its nodes, nested regions' nodes included

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def annotate_regions(graph: Graph) -> list[Region]:
    """Find the regions of ``graph``, store them on ``graph.regions`` and tag each node's
    ``meta["lqc_region"]`` with its most specific region."""
    nodes = list(graph.nodes)
    members, children = _module_tree(graph, nodes)
    regions = _block_regions(members, children, {n for n in nodes if is_attention_op(n)})
    block_of = {name: region.block for region in regions if region.kind == "block" for name in region.nodes}
    regions += _leaf_regions(members, block_of)
    regions += _lm_head_regions(graph, nodes, block_of)

    by_name = {n.name: n for n in nodes}
    for node in nodes:
        node.meta.pop("lqc_region", None)
    for region in sorted(regions, key=lambda r: _SPECIFICITY[r.kind]):
        for name in region.nodes:
            by_name[name].meta["lqc_region"] = region
    graph.regions = regions
    return regions


def _module_tree(graph: Graph, nodes: list[fx.Node]) -> tuple[dict[str, list[fx.Node]], dict[str | None, list[str]]]:
    """(module path -> the nodes run inside it, module path -> its child modules' paths)."""
    members: dict[str, list[fx.Node]] = defaultdict(list)
    parent: dict[str, str | None] = {}
    for node in nodes:
        previous = None
        for path, _cls in graph.module_stack(node):
            if path not in parent:
                parent[path] = previous
            members[path].append(node)
            previous = path
    children: dict[str | None, list[str]] = defaultdict(list)
    for path, par in parent.items():
        children[par].append(path)
    return members, children


def _block_regions(members: dict, children: dict, attention_ops: set[fx.Node]) -> list[Region]:
    """Blocks (list-indexed modules holding attention, innermost first), each followed by its
    attention and FFN regions."""

    def contains(path: str, pred) -> bool:
        return any(pred(n) for n in members[path])

    regions: list[Region] = []
    block_paths = [
        p for p in members if p.rsplit(".", 1)[-1].isdigit() and contains(p, lambda n: n in attention_ops)
    ]
    block_paths = [p for p in block_paths if not any(q != p and q.startswith(p + ".") for q in block_paths)]
    for path in block_paths:
        index = int(path.rsplit(".", 1)[-1])
        regions.append(_region("block", path, index, (path,), members[path]))
        ffn_modules = []
        for child in children[path]:
            if contains(child, lambda n: n in attention_ops):
                regions.append(_region("attention", child, index, (child,), members[child]))
            elif contains(child, _is_linear_with_weight):
                ffn_modules.append(child)
        ffn_nodes = [n for m in ffn_modules for n in members[m]]
        linears = [n for n in ffn_nodes if _is_linear_with_weight(n)]
        if len(linears) >= 2 and any(_is_activation(n) for n in ffn_nodes):
            regions.append(_region("ffn", ffn_modules[0], index, tuple(ffn_modules), ffn_nodes))
    return regions


def _leaf_regions(members: dict, block_of: dict[str, int]) -> list[Region]:
    """Norms and embeddings: the innermost modules doing the work."""
    regions = []
    for path, path_nodes in members.items():
        if any(q.startswith(path + ".") for q in members):
            continue  # only leaf modules
        index = block_of.get(path_nodes[0].name)
        if _is_norm(path_nodes):
            regions.append(_region("norm", path, index, (path,), path_nodes))
        elif any(op_name(n) == "embedding" and _weight_is_constant(n, 1) for n in path_nodes):
            regions.append(_region("embedding", path, index, (path,), path_nodes))
    return regions


def _lm_head_regions(graph: Graph, nodes: list[fx.Node], block_of: dict[str, int]) -> list[Region]:
    """lm_head: a linear outside blocks with a row per token of the vocabulary."""
    regions = []
    vocab_sizes = _token_vocab_sizes(graph)
    for node in nodes:
        if node.name in block_of or not _is_linear_with_weight(node):
            continue
        weight = node.args[1] if op_name(node) != "addmm" else node.args[2]
        rows = _weight_rows(graph, weight, op_name(node))
        if rows is not None and rows in vocab_sizes:
            path = graph.module_path(node) or "lm_head"
            # a weight tied to the embedding belongs to the embedding region, not to this one
            owned = [weight] if len(weight.users) == 1 else []
            regions.append(_region("lm_head", path, None, (path,), [node, *owned]))
    return regions


def _region(kind: str, path: str, block: int | None, modules: tuple[str, ...], nodes: list[fx.Node]) -> Region:
    return Region(kind, path, block, modules, tuple(dict.fromkeys(n.name for n in nodes)))


# compress_kv's attention over a compressed cache (lqc.ir.lqc_ops): still the block's attention
_LQC_ATTENTION_OPS = ("lqc::kv_attention", "lqc::kv_dynamic_attention", "lqc::kv_static_attention")


def is_attention_op(node: fx.Node) -> bool:
    name = op_name(node)
    if name == "scaled_dot_product_attention" or name in _LQC_ATTENTION_OPS:
        return True
    if name in ("softmax", "_softmax"):
        # softmax over scores that came from a matmul (eager attention), not a router's softmax.
        # 16 steps back: Gemma 2's soft-capping (div, tanh, mul) and its mask add lie in between.
        frontier, seen = [node], 0
        while frontier and seen < 16:
            current = frontier.pop(0)
            seen += 1
            for arg in current.all_input_nodes:
                if op_name(arg) in ("matmul", "bmm", "baddbmm"):
                    return True
                frontier.append(arg)
    return False


def _weight_is_constant(node: fx.Node, index: int) -> bool:
    return len(node.args) > index and isinstance(node.args[index], fx.Node) and node.args[index].op == "get_attr"


def _is_linear_with_weight(node: fx.Node) -> bool:
    name = op_name(node)
    if name not in LINEAR_OPS:
        return False
    weight_index = 2 if name == "addmm" else 1  # addmm(bias, x, W) from GPT-2's Conv1D
    return _weight_is_constant(node, weight_index)


def _is_activation(node: fx.Node) -> bool:
    name = op_name(node)
    # GPT-2's "gelu_new" is spelled out as 0.5*x*(1+tanh(...)); its tanh marks the activation.
    return name in ACTIVATION_OPS


def _is_norm(nodes: list[fx.Node]) -> bool:
    names = {op_name(n) for n in nodes}
    if names & LINEAR_OPS:
        return False
    if names & {"layer_norm", "rms_norm", "group_norm", "batch_norm"}:
        return True
    return "rsqrt" in names and "mean" in names


def _token_vocab_sizes(graph: Graph) -> set[int]:
    sizes = set()
    token_inputs = {inp.name for inp in graph.inputs if inp.role == "token_ids"}
    for node in graph.nodes:
        if op_name(node) == "embedding" and _weight_is_constant(node, 1):
            indices = node.args[0]
            # GPT-2 reshapes its ids before the lookup: walk back through shape-only ops.
            while isinstance(indices, fx.Node) and op_name(indices) in SHAPE_ONLY_OPS:
                indices = indices.args[0]
            if isinstance(indices, fx.Node) and (indices.name in token_inputs or not token_inputs):
                sizes.add(graph.constant(node.args[1]).shape[0])
    return sizes


def _weight_rows(graph: Graph, weight: fx.Node, name: str) -> int | None:
    tensor = graph.constant(weight)
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        return None
    # linear weights are [out, in]; GPT-2 Conv1D (addmm) weights are [in, out].
    return tensor.shape[1] if name == "addmm" else tensor.shape[0]
