"""The report file: every graph's pass records, snapshots and laid-out views, in one HTML page.

The page is ``static/report.html`` with its CSS, script and data written inline, so it opens from
disk with no server and no network. The data is JSON, gzip-compressed and base64-encoded (the
browser inflates it with its DecompressionStream); the script draws it (see report.js).
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from lqc.ir.errors import LqcError
from lqc.passes.report import GraphReport

from .layout import Layouts, engine_name
from .views import build_view, child_combinations, collapsible_children, group_of, groups, view_key


def report_data(reports: Sequence[GraphReport], *, title: str, use_dot: bool | None = None) -> dict[str, Any]:
    """What the page draws, for graphs that kept their snapshots (``viz=True`` or a ``debug_dir``)."""
    usable = [r for r in reports if r.snapshots]
    fell_back = [f"{r.graph}: {r.fallback}" for r in reports if r.fallback]
    if not usable and fell_back:
        raise LqcError(
            "lqc compressed no graph of this model, so there is nothing to draw: every graph fell back to Inductor ("
            + "; ".join(fell_back) + "). Fix what the reasons name"
        )
    if not usable:
        raise ValueError(
            "none of these graph reports has snapshots: compile with options={'viz': True} (or a debug_dir), "
            "or use lqc.viz.report(model, recipe), which does"
        )
    layouts = Layouts(use_dot=use_dot)
    graphs = [_graph_data(r, layouts) for r in usable]
    return {"title": title, "engine": engine_name() if layouts.use_dot else "networkx layered layout", "graphs": graphs,
            "layouts": layouts.run()}


def _graph_data(report: GraphReport, layouts: Layouts) -> dict[str, Any]:
    # Which children fold is read off the captured graph, where regions are plain to see (a
    # quantized FFN holds qlinears, which region detection does not count as its linears).
    captured = report.snapshots[0]
    foldable = {group: collapsible_children(captured, group) for group in groups(captured)}
    snapshots = [_snapshot_data(s, layouts, foldable) for s in report.snapshots]
    passes = [
        {
            "index": r.index, "name": r.name, "ms": r.seconds * 1e3, "added": r.nodes_added, "removed": r.nodes_removed,
            "changed": r.nodes_changed, "bytes_before": r.bytes_before, "bytes_after": r.bytes_after,
            "rel_error": _finite(r.rel_error), "cosine": _finite(r.cosine), "message": r.message,
            "options": json.loads(json.dumps(r.options, default=str)), "stage": r.stage,
        }
        for r in report.records[: len(report.snapshots) - 1]
    ]
    return {
        "name": report.graph,
        "fallback": report.fallback,
        "capture_bytes": report.capture_bytes,
        "passes": passes,
        "snapshots": snapshots,
        # the snapshot fusion groups and per-node errors describe (lqc.viz.annotate)
        "annotated_step": report.annotated_step % len(report.snapshots),
        "kernels": report.kernels,
        "kernel_sources": report.kernel_sources,
        "errors": {k: {**v, "sqnr_db": _finite(v["sqnr_db"]), "cosine": _finite(v["cosine"]) or 0.0,
                       "rel_error": _finite(v["rel_error"]) or 0.0} for k, v in report.node_errors.items()},
        "error_inputs": report.error_inputs,
        "rollup": module_rollup(report.snapshots[0], report.snapshots[-1]),
    }


def _snapshot_data(snapshot: dict[str, Any], layouts: Layouts, foldable: dict[str, list[str]]) -> dict[str, Any]:
    collapsible = groups(snapshot)
    block_paths = {index: path for path, index in snapshot["blocks"].items()}
    nodes, group_constants = [], {}
    for node in snapshot["nodes"]:
        group = group_of(node, block_paths)
        if node["op"] == "get_attr":
            if group in collapsible:
                group_constants.setdefault(group, []).append(node["name"])
            group = None
        nodes.append({**node, "group": group if group in collapsible else None})
    by_name = {n["name"]: n for n in snapshot["nodes"]}
    views = {view_key(None): layouts.add(build_view(snapshot, collapsible=collapsible))}
    group_data = {}
    for path, names in collapsible.items():
        children = foldable.get(path, [])
        for folded in child_combinations(children):
            views[view_key(path, folded)] = layouts.add(build_view(snapshot, [path], folded, collapsible))
        group_data[path] = {
            "members": names,
            "class": snapshot["modules"].get(path, ""),
            "children": {child: [n for n in names if f"{path}.{by_name[n]['child']}" == child] for child in children},
        }
    return {
        "name": snapshot["name"],
        "nodes": nodes,
        "groups": group_data,
        "group_constants": group_constants,
        "views": views,
    }


def module_rollup(first: dict[str, Any], last: dict[str, Any]) -> list[list[Any]]:
    """``[module, bytes captured, bytes after the last pass]`` per module, down to a block's children
    (``model.layers.3.mlp``); constants count once each, under the module that owns them."""
    before, after = _bytes_by_module(first), _bytes_by_module(last)
    paths = sorted((set(before) | set(after)) - {"(all)"}, key=_natural_key)
    return [["(all)", before.get("(all)", 0), after.get("(all)", 0)]] + [[p, before.get(p, 0), after.get(p, 0)] for p in paths]


def _bytes_by_module(snapshot: dict[str, Any]) -> dict[str, int]:
    depth = 1 + max((len(p.split(".")) for p in snapshot["blocks"]), default=1)
    totals: dict[str, int] = {}
    seen = set()
    for node in snapshot["nodes"]:
        if node["op"] != "get_attr" or node["call"] in seen:
            continue
        seen.add(node["call"])
        totals["(all)"] = totals.get("(all)", 0) + node["bytes"]
        parts = node["module"].split(".") if node["module"] else ["(no module)"]
        for i in range(1, min(len(parts), depth) + 1):
            prefix = ".".join(parts[:i])
            totals[prefix] = totals.get(prefix, 0) + node["bytes"]
    return totals


def _natural_key(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _finite(value):
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return value


def render_html(data: dict[str, Any]) -> str:
    static = resources.files("lqc.viz") / "static"
    page = (static / "report.html").read_text()
    # gzip + base64: a tenth of the JSON's size, and no "</" that could end the script element early
    payload = base64.b64encode(gzip.compress(json.dumps(data, separators=(",", ":"), allow_nan=False).encode(), 6)).decode()
    for marker, content in (
        ("__TITLE__", html.escape(data["title"])),
        ("__CSS__", (static / "report.css").read_text()),
        ("__JS__", (static / "report.js").read_text()),
        ("__DATA__", payload),
    ):
        page = page.replace(marker, content, 1)
    return page


def read_page_data(path: str | Path) -> dict[str, Any]:
    """The data a report page carries (what ``report_data`` returned), read back from the file."""
    match = re.search(r'<script id="lqc-data"[^>]*>(.*?)</script>', Path(path).read_text(), re.S)
    if match is None:
        raise ValueError(f"{path} is not an lqc viz report (no lqc-data element)")
    return json.loads(gzip.decompress(base64.b64decode(match.group(1).strip())))


def write_html(reports: Sequence[GraphReport], out: str | Path, *, title: str, use_dot: bool | None = None) -> Path:
    """Write the report page for ``reports`` to ``out``; returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(report_data(reports, title=title, use_dot=use_dot)))
    return out
