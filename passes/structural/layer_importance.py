"""Importance of decoder blocks and their sublayers, measured on the residual stream.

A residual decoder block writes into the residual stream twice:

    h_mid = h_in + attention(norm(h_in))
    h_out = h_mid + ffn(norm(h_mid))

(Gemma 2/3 also norm each sublayer's output before the add, OLMo 2 only after, Granite scales it:
the add is found through such per-token steps.)

A sublayer that barely changes the stream's direction can be dropped with little loss. One
interpreted run of the graph over calibration windows (torch.fx's Interpreter: no
model-specific hooks) records h_in, h_mid and h_out of every block, and scores, averaged over
every calibration token:

- attention: cos(h_in, h_mid), high = unimportant (LLM-Drop, "What Matters in Transformers?
  Not All Attention is Needed", He et al. 2024);
- mlp: cos(h_mid, h_out), high = unimportant (same paper);
- block: Block Influence 1 - cos(h_in, h_out), low = unimportant (ShortGPT, Men et al. 2024);
- span of n blocks starting at i: angular distance arccos(cos(h_in_i, h_out_{i+n-1})) / pi, low =
  unimportant ("The Unreasonable Ineffectiveness of the Deeper Layers", Gromov et al. 2024).

The boundaries are found from the graph's structure, not module names: the attention region's
output feeds an ``add`` with the stream (its result is h_mid, the other operand h_in), and the FFN
region's output feeds the ``add`` that gives h_out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from lqc.ir import Graph, op_name
from lqc.ir.patterns import from_weights

from lqc.passes.numerics import clone_inputs


@dataclass
class BlockBoundary:
    """Where block ``block`` reads and writes the residual stream. A dropped sublayer has no add:
    its ``attn_add`` (or ``ffn_add``) is None and h_mid (or h_out) is the stream value before it."""

    block: int
    path: str  # module path of the block, e.g. "model.layers.3"
    h_in: fx.Node
    attn_add: fx.Node | None  # h_mid = h_in + attention output
    ffn_add: fx.Node | None  # h_out = h_mid + ffn output
    attn_region: Any = None  # ir.regions.Region of the attention (None once dropped)
    ffn_region: Any = None
    # a dropped sublayer's stand-in (stream + compensation), when it has one
    attn_replacement: fx.Node | None = None
    ffn_replacement: fx.Node | None = None

    @property
    def h_mid(self) -> fx.Node:
        if self.attn_add is not None:
            return self.attn_add
        return self.attn_replacement if self.attn_replacement is not None else self.h_in

    @property
    def h_out(self) -> fx.Node:
        if self.ffn_add is not None:
            return self.ffn_add
        return self.ffn_replacement if self.ffn_replacement is not None else self.h_mid

    def replace(self, old: fx.Node, new: fx.Node) -> None:
        """Follow a rewrite that replaced ``old`` by ``new`` in the stream."""
        if self.h_in is old:
            self.h_in = new


# ops a sublayer's output may pass through, token by token, on its way to the residual add: a
# post-norm (Gemma 2/3, OLMo 2), a constant scale (Granite's residual_multiplier), eval-mode dropout
_PER_TOKEN_OPS = {"mul", "div", "truediv", "to", "type", "type_as", "float", "contiguous", "dropout", "pow", "mean", "rsqrt",
                  "sqrt", "add", "sub", "layer_norm", "rms_norm", "getitem", "clone"}


def _constant(node: Any) -> bool:
    """A number, or computed from frozen weights alone (Gemma's ``1 + w``)."""
    return not isinstance(node, fx.Node) or from_weights(node)


def _residual_add(nodes: list[fx.Node], max_steps: int = 24) -> tuple[fx.Node, fx.Node] | None:
    """The ``add(stream, y)`` that writes a sublayer into the residual stream: y is one of
    ``nodes`` (the sublayer's output), or computed from it token by token outside the sublayer
    (a post-norm, a constant scale), with nothing else mixed in. Returns (the add, its stream
    operand)."""
    inside = set(nodes)
    derived: set[fx.Node] = set()  # outside the sublayer, computed from its output alone
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    frontier = sorted({u for n in nodes for u in n.users if u not in inside}, key=order.get)
    candidates = []
    steps = 0
    while frontier and steps < max_steps:
        node = frontier.pop(0)
        steps += 1
        if node in derived:
            continue
        from_sublayer = [a for a in node.all_input_nodes if a in inside or a in derived]
        others = [a for a in node.all_input_nodes if a not in inside and a not in derived and not _constant(a)]
        if op_name(node) == "add" and len(node.args) == 2 and len(from_sublayer) == 1 and len(others) == 1:
            candidates.append((node, others[0]))
            continue
        if others or op_name(node) not in _PER_TOKEN_OPS:
            continue  # mixes in something else, or is not a per-token op: not on the way to the add
        derived.add(node)
        frontier = sorted(set(frontier) | {u for u in node.users if u not in derived}, key=order.get)
    if not candidates:
        return None
    return min(candidates, key=lambda c: order[c[0]])


def find_boundaries(graph: Graph) -> list[BlockBoundary]:
    """The stream boundaries of every decoder block, in block order. Raises ValueError naming the
    block when a block is not a pre-norm residual block (BERT's post-norm adds sit inside its
    attention and FFN modules)."""
    by_name = {n.name: n for n in graph.nodes}
    boundaries = []
    for block in sorted(graph.regions_of_kind("block"), key=lambda r: r.block):
        attention = [r for r in graph.regions_of_kind("attention") if r.block == block.block and r.path.startswith(block.path + ".")]
        ffn = [r for r in graph.regions_of_kind("ffn") if r.block == block.block and r.path.startswith(block.path + ".")]
        if len(attention) != 1 or len(ffn) != 1:
            raise ValueError(f"block {block.path} has {len(attention)} attention and {len(ffn)} FFN regions; expected one of each")
        found = []
        for region in (attention[0], ffn[0]):
            add = _residual_add([by_name[n] for n in region.nodes if n in by_name])
            if add is None:
                raise ValueError(
                    f"the output of {region} is not added to the residual stream outside it (a post-norm block "
                    f"like BERT's, or parallel attention and MLP like GPT-NeoX's): only residual blocks "
                    f"h + post(sublayer(pre(h))) are supported"
                )
            found.append(add)
        (attn_add, h_in), (ffn_add, h_mid) = found
        if h_mid is not attn_add:
            raise ValueError(
                f"in {block.path} the FFN's residual add reads {h_mid.name}, not the attention's add {attn_add.name} "
                f"(a post-norm block like BERT's, or parallel attention and MLP like GPT-NeoX's): only residual blocks "
                f"h + post(sublayer(pre(h))) are supported"
            )
        boundaries.append(BlockBoundary(block.block, block.path, h_in, attn_add, ffn_add, attention[0], ffn[0]))
    return boundaries


@dataclass
class LayerImportance:
    """Scores per block (None for a sublayer already dropped). ``spans[n][i]``: angular distance
    from the input of block i to the output of block i+n-1."""

    blocks: list[int]
    paths: list[str]
    attention: list[float | None]
    mlp: list[float | None]
    block: list[float | None]
    spans: dict[int, list[float]] = field(default_factory=dict)
    tokens: int = 0

    def table(self) -> list[dict[str, Any]]:
        """One row per block: its path and the three scores, rounded for reports."""
        rows = []
        for i, block in enumerate(self.blocks):
            rows.append(
                {
                    "block": block,
                    "path": self.paths[i],
                    "attention_cos": _round(self.attention[i]),
                    "mlp_cos": _round(self.mlp[i]),
                    "block_influence": _round(self.block[i]),
                }
            )
        return rows


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


class _StreamRecorder(fx.Interpreter):
    def __init__(self, graph: Graph, watched: set[fx.Node]):
        super().__init__(graph.gm, garbage_collect_values=True)
        self.watched = watched
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node in self.watched:
            self.values[node] = result.detach()
        return result


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each token's vectors (last dimension), float64, flattened over tokens."""
    a = a.reshape(-1, a.shape[-1]).to(torch.float64)
    b = b.reshape(-1, b.shape[-1]).to(torch.float64)
    return F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)


@torch.no_grad()
def layer_importance(
    graph: Graph,
    inputs: Sequence[tuple],
    boundaries: list[BlockBoundary] | None = None,
    *,
    progress: bool = False,
) -> LayerImportance:
    """Score every block of ``graph`` over the calibration ``inputs`` (argument tuples of the graph).

    ``boundaries`` (from :func:`find_boundaries`, possibly updated by drops) default to the graph's.
    """
    if boundaries is None:
        boundaries = find_boundaries(graph)
    count = len(boundaries)
    watched = set()
    for b in boundaries:
        watched.update((b.h_in, b.h_mid, b.h_out))
    attn_sum = [0.0] * count
    mlp_sum = [0.0] * count
    # angle_sum[i][j]: sum of arccos(cos(h_in_i, h_out_j)) for j >= i; cos_sum likewise
    angle_sum = [[0.0] * count for _ in range(count)]
    cos_sum = [[0.0] * count for _ in range(count)]
    tokens = 0
    for args in tqdm(inputs, desc="layer importance", disable=not progress, leave=False):
        recorder = _StreamRecorder(graph, watched)
        recorder.run(*clone_inputs(args))
        values = recorder.values
        for i, b in enumerate(boundaries):
            attn_sum[i] += float(_cos(values[b.h_in], values[b.h_mid]).sum())
            mlp_sum[i] += float(_cos(values[b.h_mid], values[b.h_out]).sum())
            for j in range(i, count):
                cos = _cos(values[b.h_in], values[boundaries[j].h_out])
                cos_sum[i][j] += float(cos.sum())
                angle_sum[i][j] += float(torch.arccos(cos).sum())
        if count:
            tokens += values[boundaries[0].h_in][..., 0].numel()
    n = max(tokens, 1)
    return LayerImportance(
        blocks=[b.block for b in boundaries],
        paths=[b.path for b in boundaries],
        attention=[attn_sum[i] / n if b.attn_add is not None else None for i, b in enumerate(boundaries)],
        mlp=[mlp_sum[i] / n if b.ffn_add is not None else None for i, b in enumerate(boundaries)],
        block=[
            1.0 - cos_sum[i][i] / n if (b.attn_add is not None or b.ffn_add is not None) else None
            for i, b in enumerate(boundaries)
        ],
        spans={
            length: [angle_sum[i][i + length - 1] / n / math.pi for i in range(count - length + 1)]
            for length in range(1, count + 1)
        },
        tokens=tokens,
    )


def sublayer_nodes(stream: fx.Node, add: fx.Node, region) -> set[fx.Node]:
    """Nodes computed from ``stream`` inside the sublayer (its region and its block's norms),
    other than through the residual ``add``."""
    kind = region.kind
    tainted: set[fx.Node] = set()
    frontier = [u for u in stream.users if u is not add]
    while frontier:
        node = frontier.pop()
        if node in tainted or node.op == "output":
            continue
        where = node.meta.get("lqc_region")
        if where is None or where.block != region.block or where.kind not in (kind, "norm"):
            continue
        tainted.add(node)
        frontier.extend(node.users)
    return tainted
