"""Where each box, cluster and edge of a view goes: Graphviz ``dot``, or networkx without it.

``dot -Tjson0`` gives positions, cluster bounding boxes and edge splines; the report's script
only draws them. Without Graphviz, networkx's ``multipartite_layout`` over topological
generations gives a plain layered drawing with straight edges (and the report says so).

Layouts are cached by the DOT text: a view a pass did not change is laid out once for the whole
report. The ``dot`` runs go in parallel, one per core.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import networkx as nx

from .views import View, to_dot

POINTS_PER_INCH = 72.0
_BOX_HEIGHT = 0.26 * POINTS_PER_INCH
_CHAR_WIDTH = 6.0  # points per character of a 10-point Helvetica label, near enough for the fallback


def dot_binary() -> str | None:
    return shutil.which("dot")


def engine_name() -> str:
    """What lays the report out, for its footer."""
    binary = dot_binary()
    if binary is None:
        return "networkx layered layout (install Graphviz, e.g. apt-get install graphviz, for dot's layout)"
    version = subprocess.run([binary, "-V"], capture_output=True, text=True).stderr.strip()
    return version or "graphviz dot"


class Layouts:
    """Lays out views, once per distinct DOT text. ``add`` returns the id of a layout in ``layouts``."""

    def __init__(self, use_dot: bool | None = None):
        self.use_dot = dot_binary() is not None if use_dot is None else use_dot
        self.layouts: list[dict[str, Any] | None] = []
        self._ids: dict[str, int] = {}
        self._pending: list[tuple[int, str, View]] = []

    def add(self, view: View) -> int:
        text = to_dot(view)
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest not in self._ids:
            self._ids[digest] = len(self.layouts)
            self.layouts.append(None)
            self._pending.append((self._ids[digest], text, view))
        return self._ids[digest]

    def run(self) -> list[dict[str, Any]]:
        """Lay out every view added so far; returns all layouts, in id order."""
        pending, self._pending = self._pending, []
        work = (lambda item: dot_layout(item[1])) if self.use_dot else (lambda item: networkx_layout(item[2]))
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            for (index, _text, _view), layout in zip(pending, pool.map(work, pending)):
                self.layouts[index] = layout
        return self.layouts  # type: ignore[return-value]


def dot_layout(dot_text: str) -> dict[str, Any]:
    """Positions from ``dot -Tjson0``: ``{"width", "height", "boxes": {key: [cx, cy, w, h]},
    "clusters": [[key, label, x, y, w, h]], "edges": [[tail, head, svg path, faint]]}``, y pointing down."""
    result = subprocess.run([dot_binary() or "dot", "-Tjson0"], input=dot_text, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"graphviz dot failed: {result.stderr.strip()[:500]}")
    data = json.loads(result.stdout)
    _x0, _y0, width, height = (float(v) for v in data["bb"].split(","))

    def point(text: str) -> tuple[float, float]:
        x, y = (float(v) for v in text.split(","))
        return round(x, 1), round(height - y, 1)

    boxes, clusters, names = {}, [], {}
    for obj in data.get("objects", []):
        names[obj["_gvid"]] = obj["name"]
        if "bb" in obj:
            llx, lly, urx, ury = (float(v) for v in obj["bb"].split(","))
            key = obj["name"].removeprefix("cluster_")
            clusters.append([key, obj.get("label", ""), round(llx, 1), round(height - ury, 1), round(urx - llx, 1), round(ury - lly, 1)])
        elif "pos" in obj:
            x, y = point(obj["pos"])
            boxes[obj["name"]] = [x, y, round(float(obj["width"]) * POINTS_PER_INCH, 1), round(float(obj["height"]) * POINTS_PER_INCH, 1)]
    edges = []
    for edge in data.get("edges", []):
        # an edge left out of the ranking (views._constraining) is drawn faint
        weak = 1 if edge.get("constraint") == "false" else 0
        edges.append([names[edge["tail"]], names[edge["head"]], _spline_path(edge.get("pos", ""), point), weak])
    return {"width": round(width, 1), "height": round(height, 1), "boxes": boxes, "clusters": clusters, "edges": edges}


def _spline_path(pos: str, point) -> str:
    """dot's ``e,x,y p0 p1 ... p3k`` (a cubic B-spline's Bezier points, then the arrow tip) as an SVG path."""
    end = None
    points = []
    for part in pos.split():
        if part.startswith("e,"):
            end = point(part[2:])
        elif part.startswith("s,"):
            continue
        else:
            points.append(point(part))
    if not points:
        return ""
    path = [f"M{points[0][0]},{points[0][1]}"]
    for i in range(1, len(points) - 2, 3):
        (ax, ay), (bx, by), (cx, cy) = points[i : i + 3]
        path.append(f"C{ax},{ay} {bx},{by} {cx},{cy}")
    if end is not None:
        path.append(f"L{end[0]},{end[1]}")
    return "".join(path)


def networkx_layout(view: View) -> dict[str, Any]:
    """The fallback: layers = topological generations (networkx), boxes spread evenly in each layer."""
    graph = nx.DiGraph()
    graph.add_nodes_from(view.boxes)
    graph.add_edges_from(view.edges)
    for layer, generation in enumerate(nx.topological_generations(graph)):
        for key in generation:
            graph.nodes[key]["layer"] = layer
    widths = {key: max(40.0, len(label) * _CHAR_WIDTH + 12) for key, label in view.boxes.items()}
    spacing_x = max(widths.values(), default=40.0) + 16
    layers = nx.get_node_attributes(graph, "layer")
    widest = max((sum(1 for v in layers.values() if v == layer) for layer in set(layers.values())), default=1)
    positions = nx.multipartite_layout(graph, subset_key="layer", align="horizontal", scale=1.0) if graph else {}
    # multipartite_layout centres the drawing on 0 and scales it into [-1, 1]; turn that into points.
    xs = [float(p[0]) for p in positions.values()] or [0.0]
    span_x = (max(xs) - min(xs)) or 1.0
    width = max(widest * spacing_x, spacing_x) + 40
    height = (max(layers.values(), default=0) + 1) * (_BOX_HEIGHT + 30) + 40
    boxes = {}
    for key, (x, _y) in positions.items():
        x = float(x)  # numpy's
        cx = 20 + (x - min(xs)) / span_x * (width - 40) if len(xs) > 1 else width / 2
        cy = 20 + layers[key] * (_BOX_HEIGHT + 30) + _BOX_HEIGHT / 2
        boxes[key] = [round(cx, 1), round(cy, 1), round(widths[key], 1), round(_BOX_HEIGHT, 1)]
    edges = []
    for tail, head in view.edges:
        (x1, y1, _, h1), (x2, y2, _, h2) = boxes[tail], boxes[head]
        edges.append([tail, head, f"M{x1},{round(y1 + h1 / 2, 1)}L{x2},{round(y2 - h2 / 2, 1)}", 0])
    clusters = []
    for key, (label, _parent) in view.clusters.items():
        inside = [boxes[b] for b, c in view.placement.items() if c is not None and _within(view, c, key)]
        if inside:
            x0 = min(b[0] - b[2] / 2 for b in inside) - 8
            y0 = min(b[1] - b[3] / 2 for b in inside) - 18
            x1 = max(b[0] + b[2] / 2 for b in inside) + 8
            y1 = max(b[1] + b[3] / 2 for b in inside) + 8
            clusters.append([key, label, round(x0, 1), round(y0, 1), round(x1 - x0, 1), round(y1 - y0, 1)])
    return {"width": round(width, 1), "height": round(height, 1), "boxes": boxes, "clusters": clusters, "edges": edges}


def _within(view: View, cluster: str, outer: str) -> bool:
    while cluster is not None:
        if cluster == outer:
            return True
        cluster = view.clusters[cluster][1]
    return False
