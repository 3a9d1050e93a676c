"""The pass manager: runs a recipe over a Graph and checks the graph after every pass.

After each pass, in the spirit of MLIR's pass manager: lint and re-propagate shapes (a pass that
breaks the graph is named in the error), optionally measure the numeric error of the final
outputs against the reference graph, time it, count nodes added/removed and parameter bytes,
record which nodes it created from which, and dump the graph to the debug directory.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch.fx as fx

from lqc.ir import Graph, annotate_regions
from lqc.ir.errors import LqcConfigError, VerificationError
from lqc.ir.lint import output_signature, verify_graph
from lqc.ir.snapshot import snapshot

from lqc.passes.base import Pass, PassResult
from lqc.passes.context import PassContext
from lqc.passes.numerics import graph_error, run_graph
from lqc.passes.recipe import load_recipe, options_digest
from lqc.passes.report import GraphReport, PassRecord, write_pass_dump, write_summary


class PassManager:
    """Run ``recipe`` (a list of Pass objects, recipe dicts, or a YAML path) over graphs.

    ``verify``: also measure the numeric error after every pass, on ``ctx.check_inputs``
    (lint, shapes and output checks always run). ``debug_dir``: write one readable file per pass
    plus ``summary.txt`` there. ``snapshots``: keep a plain-data snapshot of the graph after capture
    and after every pass in ``GraphReport.snapshots`` (what ``lqc.viz`` draws).
    """

    def __init__(
        self, recipe: Any = None, *, verify: bool = False, debug_dir: str | Path | None = None, snapshots: bool = False
    ):
        self.passes: list[Pass] = load_recipe(recipe)
        self.verify = verify
        self.debug_dir = Path(debug_dir) if debug_dir is not None else None
        self.snapshots = snapshots

    def run(self, graph: Graph, ctx: PassContext | None = None, report: GraphReport | None = None) -> GraphReport:
        """Run the passes over ``graph``. ``report``: a report to continue (the lowering after the
        recipe: its records follow the recipe's, on the timeline of the same graph)."""
        ctx = ctx or PassContext()
        expected_outputs = output_signature(graph)
        if ctx.reference is None:
            ctx.reference = graph.copy(name=f"{graph.name}-reference")
        reference_outputs = []
        if self.verify and ctx.check_inputs:
            reference_outputs = [run_graph(ctx.reference, inputs) for inputs in ctx.check_inputs]
        if report is None:
            report = GraphReport(graph=graph.name, capture_nodes=len(graph.gm.graph.nodes), capture_bytes=graph.param_bytes())
            if self.debug_dir is not None:
                write_pass_dump(self.debug_dir, None, graph)
            if self.snapshots:
                report.snapshots.append(snapshot(graph))

        for index, p in enumerate(self.passes, start=len(report.records) + 1):
            self._check_requirements(p, ctx)
            record = self._run_one(index, p, graph, ctx, expected_outputs)
            ctx.passes_before.append(options_digest(p))
            if reference_outputs:
                record.rel_error, record.cosine = graph_error(graph, ctx.check_inputs, reference_outputs)
            report.records.append(record)
            if self.snapshots:
                report.snapshots.append(snapshot(graph))
            if self.debug_dir is not None:
                write_pass_dump(self.debug_dir, record, graph)
                write_summary(self.debug_dir, report)
        if self.debug_dir is not None:
            write_summary(self.debug_dir, report)
        return report

    def _check_requirements(self, p: Pass, ctx: PassContext) -> None:
        if "calibration" in p.requirements() and ctx.calibration is None:
            ctx.current_pass = p
            ctx.require_calibration()
        unknown = set(p.requirements()) - {"calibration"}
        if unknown:
            raise LqcConfigError(f"pass {p.name!r} requires {sorted(unknown)}, which the pass manager does not provide")

    def _run_one(self, index: int, p: Pass, graph: Graph, ctx: PassContext, expected_outputs: list[str]) -> PassRecord:
        before = {n: n.name for n in graph.nodes}
        record = PassRecord(
            index=index,
            name=p.name,
            stage=p.stage,
            options=dataclasses.asdict(p.options),
            nodes_before=len(before),
            bytes_before=graph.param_bytes(),
        )
        tracker = _ChangeTracker(graph.gm)
        ctx.current_pass = p
        p.selected_paths = set()  # a fresh set: the pass may be a shallow copy sharing its original's
        start = time.perf_counter()
        try:
            with tracker:
                result = p.run(graph, ctx)
        finally:
            ctx.current_pass = None
        record.seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {p.name!r} returned {type(result).__name__}; run() must return a PassResult")
        _check_patterns(p, graph)

        graph.prune_constants()
        try:
            graph.recompile()
        except Exception as exc:
            raise VerificationError(f"pass {p.name!r} left an invalid graph: {type(exc).__name__}: {exc}") from exc
        verify_graph(graph, expected_outputs, after=p.name)
        if "regions" not in p.preserves:
            annotate_regions(graph)

        alive = set(graph.nodes)
        record.nodes_after = len(alive)
        record.nodes_removed = [name for node, name in before.items() if node not in alive]
        record.nodes_added = [n.name for n in tracker.created if n in alive]
        record.nodes_changed = [n.name for n in tracker.rewired if n in alive and n in before]
        record.bytes_after = graph.param_bytes()
        record.matches = result.matches
        record.details = result.details
        record.message = result.message
        for node in tracker.created:
            if node in alive:
                sources = list(dict.fromkeys(node.meta.get("lqc_derived_from", ()) + tuple(tracker.derived.get(node.name, ()))))
                node.meta["lqc_provenance"] = {"pass": p.name, "from": sources}
                node.meta.pop("lqc_derived_from", None)
                record.provenance[node.name] = sources
        return record


def _check_patterns(p: Pass, graph: Graph) -> None:
    """A ``targets``/``ignore`` pattern that matched no module path the pass looked at is a mistake
    (a typo, or a name from another model family): an error, or a warning under ``strict: false``.
    Every graph of one model (prefill, decode...) holds the same modules, so no graph is exempt."""
    unmatched = p.unmatched_patterns()
    if not unmatched:
        return
    paths = sorted(path for path in p.selected_paths if path)
    if paths:
        shown = ", ".join(paths[:: max(1, len(paths) // 6)][:6])  # spread over the model, not six of layer 0
        seen = f"module paths it looked at ({len(paths)}) include: {shown}"
    else:
        seen = "it found nothing it could rewrite in this graph"
    patterns = "; ".join(f"{option} pattern '{pattern}'" for option, pattern in unmatched)
    verb = "matches" if len(unmatched) == 1 else "match"
    message = (f"pass {p.name!r}: {patterns} {verb} no module ({seen}). Patterns are regexes searched in module "
               f"paths: fix the pattern")
    if p.options.strict:
        raise LqcConfigError(f"{message}, or set `strict: false` on this entry to only warn")
    # the same text for every graph of the model, so Python's warning filter shows it once
    warnings.warn(f"lqc: {message} (strict: false, so the pass ran on what its other patterns selected)", stacklevel=2)


class _ChangeTracker:
    """Watches a GraphModule during one pass: nodes created, and which replaced which."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.created: list[fx.Node] = []
        self.rewired: list[fx.Node] = []
        self.derived: dict[str, list[str]] = {}

    def _on_create(self, node: fx.Node) -> None:
        self.created.append(node)

    def _on_replace(self, old: fx.Node, new: str, user: fx.Node) -> None:
        self.derived.setdefault(new, [])
        if old.name not in self.derived[new]:
            self.derived[new].append(old.name)
        self.rewired.append(user)

    def __enter__(self) -> "_ChangeTracker":
        self.gm._register_create_node_hook(self._on_create)
        self.gm._register_replace_node_hook(self._on_replace)
        return self

    def __exit__(self, *exc) -> None:
        self.gm._unregister_create_node_hook(self._on_create)
        self.gm._unregister_replace_node_hook(self._on_replace)
