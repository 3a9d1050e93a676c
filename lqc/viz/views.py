"""What one drawing of a graph snapshot shows: module groups collapsed to one box, or expanded.

A 30-layer model has about 2,000 nodes; drawn flat, nobody can read it. So a view draws every
decoder block (and any other module with several nodes, the rotary embedding, say) as one box,
except the group the user expanded, whose nodes are drawn inside a cluster with one sub-cluster per
child module (attention, MLP, the norms); attention and MLP can in turn be folded into one box. Constants (get_attr nodes) are never boxes of their own:
the node panel lists them with the op that reads them.

Views are written as Graphviz DOT (``to_dot``); lqc.viz.layout asks ``dot`` where to put them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable

# A module with fewer nodes than this is drawn as its nodes, not as a box of its own.
MIN_GROUP_SIZE = 3
# Inside an expanded block, the children holding these regions can be folded into one box.
FOLDABLE_REGIONS = ("attention", "ffn")
MAX_COLLAPSIBLE_CHILDREN = 3
# A box with this many readers (or inputs) has all but one of those edges left out of the layout's
# ranking (see _constraining).
WIDE = 4

NodeDict = dict[str, Any]


@dataclass
class View:
    """Boxes, clusters and edges of one drawing. Keys: ``n:<node>`` for a node, ``g:<module>`` for a
    collapsed group; clusters are keyed ``c:<module>`` and nest through ``parent``."""

    boxes: dict[str, str] = field(default_factory=dict)  # key -> label
    clusters: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # key -> (label, parent key)
    placement: dict[str, str | None] = field(default_factory=dict)  # box key -> cluster key (None: top level)
    edges: list[tuple[str, str]] = field(default_factory=list)


def group_of(node: NodeDict, block_paths: dict[int, str]) -> str | None:
    """The module group a node is drawn in when collapsed: its decoder block, else its module two
    levels down (``model.rotary_emb``, ``lm_head``). None for inputs and outputs, and for nodes of
    a module that holds the blocks (``model``: grouping it would hide the whole network)."""
    if node["block"] is not None:
        return block_paths[node["block"]]
    module = node["module"]
    if not module or node["op"] in ("placeholder", "output"):
        return None
    group = ".".join(module.split(".")[:2])
    if any(path.startswith(group + ".") for path in block_paths.values()):
        return None
    return group


def groups(snapshot: dict[str, Any]) -> dict[str, list[str]]:
    """Collapsible groups of a snapshot: module path -> names of its drawn nodes (constants excluded)."""
    block_paths = {index: path for path, index in snapshot["blocks"].items()}
    members: dict[str, list[str]] = {}
    for node in snapshot["nodes"]:
        if node["op"] == "get_attr":
            continue
        group = group_of(node, block_paths)
        if group is not None:
            members.setdefault(group, []).append(node["name"])
    return {path: names for path, names in members.items() if len(names) >= MIN_GROUP_SIZE}


def collapsible_children(snapshot: dict[str, Any], group: str) -> list[str]:
    """Children of a block that can be folded into one box inside it: those holding its attention
    or its FFN (``model.layers.3.self_attn``, ``model.layers.3.mlp``), by region, not by name.
    Every combination is one more layout in the page, so the norms stay open, and at most
    ``MAX_COLLAPSIBLE_CHILDREN`` (the largest) fold."""
    index = snapshot["blocks"].get(group)
    sizes: dict[str, int] = {}
    for node in snapshot["nodes"]:
        if index is not None and node["block"] == index and node["child"] and node["op"] != "get_attr":
            if node["region"].split(":", 1)[0] in FOLDABLE_REGIONS:
                sizes[node["child"]] = sizes.get(node["child"], 0) + 1
    largest = sorted(sizes, key=lambda c: -sizes[c])[:MAX_COLLAPSIBLE_CHILDREN]
    return [f"{group}.{child}" for child in sorted(largest)]


def child_combinations(children: list[str]) -> list[tuple[str, ...]]:
    """Every set of children that may be folded at once: (), each one, both..."""
    return [combo for r in range(len(children) + 1) for combo in itertools.combinations(children, r)]


def view_key(expanded: str | None, folded: Iterable[str] = ()) -> str:
    """How the report names a view: "" (all collapsed), a group, or ``group|child,child`` with folded children."""
    if not expanded:
        return ""
    folded = sorted(folded)
    return expanded + ("|" + ",".join(folded) if folded else "")


def build_view(snapshot: dict[str, Any], expanded: Iterable[str] = (), folded: Iterable[str] = (),
               collapsible: dict[str, list[str]] | None = None) -> View:
    """The view of ``snapshot`` with the groups in ``expanded`` drawn node by node, except the
    children in ``folded`` (``model.layers.3.mlp``), each drawn as one box inside its block.
    ``collapsible``: ``groups(snapshot)``, when the caller has it already."""
    expanded, folded = set(expanded), set(folded)
    block_paths = {index: path for path, index in snapshot["blocks"].items()}
    collapsible = groups(snapshot) if collapsible is None else collapsible
    view = View()
    key_of: dict[str, str | None] = {}  # node name -> the box it is drawn in (None: not drawn)
    for node in snapshot["nodes"]:
        name = node["name"]
        if node["op"] == "get_attr":
            key_of[name] = None
            continue
        group = group_of(node, block_paths)
        if group in collapsible and group not in expanded:
            key_of[name] = _group_box(view, group, group, None)
            continue
        child = f"{group}.{node['child']}" if node["child"] else None
        if child in folded:
            key_of[name] = _group_box(view, child, node["child"], f"c:{group}")
            view.clusters.setdefault(f"c:{group}", (group, None))
            continue
        key = f"n:{name}"
        key_of[name] = key
        view.boxes[key] = node_label(node)
        view.placement[key] = _cluster_for(view, node, group if group in collapsible else None)
    seen = set()
    for node in snapshot["nodes"]:
        head = key_of[node["name"]]
        if head is None:
            continue
        for source in node["inputs"]:
            tail = key_of.get(source)
            if tail is not None and tail != head and (tail, head) not in seen:
                seen.add((tail, head))
                view.edges.append((tail, head))
    return view


def _group_box(view: View, path: str, label: str, cluster: str | None) -> str:
    key = f"g:{path}"
    if key not in view.boxes:
        view.boxes[key] = label
        view.placement[key] = cluster
    return key


def _cluster_for(view: View, node: NodeDict, group: str | None) -> str | None:
    """The cluster an expanded group's node goes in, made on first use: the group's, then its child's."""
    if group is None:
        return None
    outer = f"c:{group}"
    view.clusters.setdefault(outer, (group, None))
    child = node["child"]
    if not child:
        return outer
    inner = f"c:{group}.{child}"
    view.clusters.setdefault(inner, (child, outer))
    return inner


def node_label(node: NodeDict) -> str:
    if node["op"] == "placeholder":
        return node["name"]
    if node["op"] == "output":
        return "output"
    return node["target"].removeprefix("lqc::")


def to_dot(view: View, *, title: str = "lqc") -> str:
    """Graphviz DOT for a view: boxes, nested clusters, edges. Labels are all the layout depends on,
    so views that draw the same structure give the same text (and share one layout)."""
    lines = [
        f"digraph {_quote(title)} {{",
        '  graph [rankdir=TB, nodesep=0.18, ranksep=0.28, fontname="Helvetica", fontsize=10, labeljust=l];',
        '  node [shape=box, fontname="Helvetica", fontsize=10, height=0.26, margin="0.08,0.02"];',
        "  edge [arrowsize=0.5];",
    ]
    children: dict[str | None, list[str]] = {}
    for key, (_label, parent) in view.clusters.items():
        children.setdefault(parent, []).append(key)
    boxes_in: dict[str | None, list[str]] = {}
    for key, cluster in view.placement.items():
        boxes_in.setdefault(cluster, []).append(key)

    def emit(cluster: str | None, indent: str) -> None:
        for key in boxes_in.get(cluster, []):
            label = view.boxes[key]
            extra = ", penwidth=2" if key.startswith("g:") else ""
            lines.append(f"{indent}{_quote(key)} [label={_quote(label)}{extra}];")
        for sub in children.get(cluster, []):
            lines.append(f"{indent}subgraph {_quote('cluster_' + sub)} {{")
            lines.append(f"{indent}  label={_quote(view.clusters[sub][0])};")
            emit(sub, indent + "  ")
            lines.append(f"{indent}}}")

    emit(None, "  ")
    for (tail, head), constrained in zip(view.edges, _constraining(view.edges)):
        lines.append(f"  {_quote(tail)} -> {_quote(head)}{'' if constrained else ' [constraint=false]'};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _constraining(edges: list[tuple[str, str]]) -> list[bool]:
    """Which edges may set the layout's ranks. A value read all down the network (rotary cos/sin,
    the attention mask) and the output reading every block's KV cache would otherwise pull each
    block towards their ranks and stagger the chain of blocks into a staircase. So from a box with
    many readers only the first edge constrains, and into a box with many inputs only the last."""
    fan_out: dict[str, int] = {}
    fan_in: dict[str, int] = {}
    for tail, head in edges:
        fan_out[tail] = fan_out.get(tail, 0) + 1
        fan_in[head] = fan_in.get(head, 0) + 1
    seen_out: dict[str, int] = {}
    seen_in: dict[str, int] = {}
    result = []
    for tail, head in edges:
        seen_out[tail] = seen_out.get(tail, 0) + 1
        seen_in[head] = seen_in.get(head, 0) + 1
        wide_out = fan_out[tail] >= WIDE and seen_out[tail] > 1
        wide_in = fan_in[head] >= WIDE and seen_in[head] < fan_in[head]
        result.append(not (wide_out or wide_in))
    return result


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
