"""lqc.viz: one static HTML page showing what every pass did to a compiled graph.

``lqc.viz.report(model, recipe, out="report.html")`` compresses ``model`` with ``recipe`` and writes
the page; ``lqc viz --model ... --recipe ... --out ...`` does the same from the command line, and
the backend writes one into each graph's ``debug_dir`` folder. The page shows the pass timeline,
each pass's graph before and after with added / rewired / removed nodes highlighted, module
groups (decoder blocks, then attention and MLP) collapsed until clicked, a node panel (op, shapes,
bytes, provenance, fusion group), search, parameter bytes per module, and each node's error
against the uncompressed graph on calibration tokens. ``export_dot`` / ``export_svg`` write the
final graph for Graphviz.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from lqc.ir.errors import LqcConfigError
from lqc.passes.report import GraphReport

from .html import read_page_data, render_html, report_data, write_html
from .layout import dot_binary
from .views import build_view, groups, to_dot

DEFAULT_TOKENS = 64  # calibration tokens the per-node errors are measured on

__all__ = ["report", "compressed_reports", "write_html", "render_html", "report_data", "read_page_data", "export_dot", "export_svg"]


def report(
    model: torch.nn.Module,
    recipe: Any = "default",
    out: str | Path = "lqc-report.html",
    *,
    calibration: Any = "calib",
    tokenizer: Any = None,
    example_inputs: torch.Tensor | None = None,
    tokens: int = DEFAULT_TOKENS,
    title: str | None = None,
) -> Path:
    """Compress ``model`` with ``recipe`` and write the report page to ``out``.

    The graph is captured on ``example_inputs`` (default: the first ``tokens`` calibration tokens,
    which needs ``tokenizer`` for text calibration; with ``calibration=None``, ``tokens`` random
    ids), and each node's error against the uncompressed graph is measured on them.
    """
    made = compressed_reports(model, recipe, calibration=calibration, tokenizer=tokenizer,
                              example_inputs=example_inputs, tokens=tokens)
    name = title or f"lqc: {type(model).__name__}, recipe {recipe if isinstance(recipe, str) else 'custom'}"
    return write_html(made, out, title=name)


def compressed_reports(model: torch.nn.Module, recipe: Any = "default", *, calibration: Any = "calib", tokenizer: Any = None,
                       example_inputs: torch.Tensor | None = None, tokens: int = DEFAULT_TOKENS) -> list[GraphReport]:
    """``lqc.compress`` with what the page draws kept (snapshots, fusion groups, per-node error):
    the reports of its session's graphs."""
    from lqc.compress import compress
    from lqc.data import calibration_from, example_token_ids

    calibration_data = calibration_from(calibration, tokenizer)
    if example_inputs is None:
        example_inputs = example_token_ids(model, calibration_data, tokens, "lqc.viz.report")
    compressed = compress(model, recipe, calibration=calibration_data, tokenizer=tokenizer, example_inputs=example_inputs,
                          progress=False, viz=True)
    return compressed._lqc_compression.session.reports


def export_dot(graph_report: GraphReport, out: str | Path, *, step: int = -1) -> Path:
    """The graph after pass ``step`` (default: the last; 0 is the capture) as Graphviz DOT, every
    module group drawn as a cluster of its nodes."""
    if not graph_report.snapshots:
        raise LqcConfigError("this graph report has no snapshots: compile with options={'viz': True} or a debug_dir")
    snapshot = graph_report.snapshots[step]
    out = Path(out)
    out.write_text(to_dot(build_view(snapshot, expanded=groups(snapshot)), title=graph_report.graph))
    return out


def export_svg(dot_path: str | Path, out: str | Path) -> Path:
    """Render a DOT file to SVG with Graphviz (``dot`` must be installed)."""
    binary = dot_binary()
    if binary is None:
        raise LqcConfigError("SVG export needs Graphviz's dot: install it (apt-get install graphviz), or open the DOT file elsewhere")
    subprocess.run([binary, "-Tsvg", str(dot_path), "-o", str(out)], check=True, capture_output=True)
    return Path(out)

