"""Per-pass records and the debug directory: one readable file per pass plus a summary table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from lqc.ir import Graph
from lqc.ir.printer import format_graph


@dataclass
class PassRecord:
    """What one pass did to one graph."""

    index: int
    name: str
    options: dict[str, Any]
    stage: str = "recipe"  # or "lowering": chosen by the target, after the recipe
    seconds: float = 0.0
    matches: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    nodes_added: list[str] = field(default_factory=list)
    nodes_removed: list[str] = field(default_factory=list)
    nodes_changed: list[str] = field(default_factory=list)  # kept, but with inputs rewired
    bytes_before: int = 0
    bytes_after: int = 0
    rel_error: float | None = None  # of the final outputs against the reference graph
    cosine: float | None = None
    provenance: dict[str, list[str]] = field(default_factory=dict)  # new node -> nodes it came from
    details: Any = None  # the pass's typed report (PassResult.details)
    message: str = ""


@dataclass
class GraphReport:
    """Every pass record for one compiled graph."""

    graph: str
    records: list[PassRecord] = field(default_factory=list)
    capture_nodes: int = 0
    capture_bytes: int = 0
    fallback: str = ""  # why this graph fell back to Inductor, if it did
    capture_seconds: float = 0.0  # freezing, shape propagation, regions
    codegen_seconds: float = 0.0  # compiling the result for the target (Inductor's time, say)
    # For lqc.viz (filled when the backend runs with viz=True or a debug_dir):
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # ir.snapshot after capture, then each pass
    kernels: dict[str, dict[str, Any]] = field(default_factory=dict)  # final node -> its fusion group
    kernel_sources: dict[str, str] = field(default_factory=dict)  # generated kernel key -> its source
    node_errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # final node -> error vs the reference
    error_inputs: str = ""  # what node_errors were measured on, or why they were not
    annotated_step: int = -1  # the snapshot kernels and node_errors describe (-1: the last)

    @property
    def bytes_after(self) -> int:
        return self.records[-1].bytes_after if self.records else self.capture_bytes

    def to_json(self) -> dict[str, Any]:
        """Everything but the snapshots (the viz report holds those)."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "snapshots"}
        data["records"] = [asdict(r) for r in self.records]
        return data


def details_json(details: Any) -> Any:
    """A pass's typed report as plain data (dataclasses to dicts, recursively)."""
    return asdict(details) if is_dataclass(details) and not isinstance(details, type) else details


SUMMARY_COLUMNS = ("#", "pass", "time ms", "nodes +", "nodes -", "nodes", "bytes before", "bytes after", "rel err", "cosine", "matches")


def summary_rows(report: GraphReport) -> list[list[str]]:
    rows = [["0", "capture", "-", "-", "-", str(report.capture_nodes), "-", f"{report.capture_bytes:,}", "-", "-", "-"]]
    for r in report.records:
        rows.append(
            [
                str(r.index),
                r.name,
                f"{r.seconds * 1e3:.1f}",
                str(len(r.nodes_added)),
                str(len(r.nodes_removed)),
                str(r.nodes_after),
                f"{r.bytes_before:,}",
                f"{r.bytes_after:,}",
                _fmt(r.rel_error, ".2e"),
                _fmt(r.cosine, ".6f"),
                str(r.matches),
            ]
        )
    return rows


def format_table(columns, rows) -> str:
    """A plain-text table: text columns left-aligned, numeric columns right-aligned."""
    widths = [max([len(str(c))] + [len(row[i]) for row in rows]) for i, c in enumerate(columns)]
    numeric = [all(_looks_numeric(row[i]) for row in rows) for i in range(len(columns))]

    def line(cells) -> str:
        return "  ".join(
            str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric)
        ).rstrip()

    return "\n".join([line(columns), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]) + "\n"


def _looks_numeric(cell: str) -> bool:
    text = cell.replace(",", "").replace("%", "").replace("x", "").strip()
    if text in ("-", ""):
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_summary(report: GraphReport) -> str:
    head = f"# {report.graph}" + (f"  (fell back to Inductor: {report.fallback})" if report.fallback else "")
    head += f"  capture {report.capture_seconds:.2f}s"
    if report.codegen_seconds:
        head += f", codegen {report.codegen_seconds:.2f}s"
    return head + "\n" + format_table(SUMMARY_COLUMNS, summary_rows(report))


def format_pass_changes(reports: list[GraphReport]) -> str:
    """What the CLI prints after compressing: one line per pass of the first compiled graph (the
    ahead-of-time capture, what lqc.save writes) with the modules it changed (its ``matches``,
    the rewrite sites it reported), so a recipe that changed nothing shows it. A later graph whose
    counts differ (another shape) gets its own lines; a graph that fell back says why."""
    lines: list[str] = []
    shown: list[list[tuple[str, int]]] = []
    for report in reports:
        if report.fallback:
            lines.append(f"{report.graph} fell back to Inductor, uncompressed: {report.fallback}")
            continue
        counts = [(r.name + (" (lowering)" if r.stage == "lowering" else ""), r.matches) for r in report.records]
        if counts in shown:
            continue  # prefill at another length, decode steps: the same passes changed the same modules
        shown.append(counts)
        lines.append(f"passes on {report.graph}:" if counts else f"passes on {report.graph}: none ran")
        lines += [f"  {name}: {matches} modules changed" for name, matches in counts]
    return "\n".join(lines) + "\n" if lines else ""


def write_pass_dump(debug_dir: Path, record: PassRecord | None, graph: Graph) -> Path:
    """``NN_<pass>.txt``: what the pass did, then the whole graph after it."""
    debug_dir.mkdir(parents=True, exist_ok=True)
    if record is None:
        path = debug_dir / "00_capture.txt"
        header = ["# capture: the frozen graph before any pass"]
    else:
        path = debug_dir / f"{record.index:02d}_{record.name}.txt"
        header = [
            f"# pass {record.index}: {record.name}",
            f"# options: {json.dumps(record.options, default=str)}",
            f"# time: {record.seconds * 1e3:.1f} ms   matches: {record.matches}",
            f"# nodes: {record.nodes_before} -> {record.nodes_after} (+{len(record.nodes_added)} -{len(record.nodes_removed)}, "
            f"{len(record.nodes_changed)} rewired)",
            f"# parameter bytes: {record.bytes_before:,} -> {record.bytes_after:,}",
            f"# error vs reference: rel {_fmt(record.rel_error, '.3e')}, cosine {_fmt(record.cosine, '.6f')}",
        ]
        if record.message:
            header.append(f"# {record.message}")
        if record.nodes_removed:
            header.append("# removed: " + ", ".join(record.nodes_removed))
        for new, sources in record.provenance.items():
            header.append(f"# created {new} from {', '.join(sources) or '(no recorded source)'}")
        if record.details is not None:
            header.append("# details: " + json.dumps(details_json(record.details), default=str))
    path.write_text("\n".join(header) + "\n\n" + format_graph(graph))
    return path


def write_summary(debug_dir: Path, report: GraphReport) -> None:
    debug_dir.mkdir(parents=True, exist_ok=True)
    (debug_dir / "summary.txt").write_text(format_summary(report))
    (debug_dir / "summary.json").write_text(json.dumps(report.to_json(), indent=1, default=str))


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return format(value, spec)
