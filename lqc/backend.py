"""``torch.compile(model, backend="lqc", options={...})``.

For every graph dynamo captures (prefill, decode, each new shape): capture it (freeze weights,
shapes, regions), run the recipe through the pass manager, compile the result for the target,
and hand dynamo a callable that also guards against weights changed after compilation.

Weight transforms are cached per model and recipe (lqc.passes.DEFAULT_CACHE), so the second and
later graphs of a model reuse the first one's compressed weights.

Errors: a bad recipe or option raises (a fallback would hide the mistake). A graph lqc cannot
handle falls back to Inductor with a warning, and if Inductor fails too, to the graph as dynamo
captured it: compiling never crashes on a graph lqc does not understand.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx

from lqc.codegen.targets import compile_graph
from lqc.data import calibration_from
from lqc.ir import capture
from lqc.ir.errors import LqcConfigError
from lqc.ir.inputs import CalibrationUnavailable
from lqc.ir.lqc_ops import STATEFUL_OPS
from lqc.passes import GraphReport, PassContext, PassManager, load_recipe
from lqc.recipes import resolve_recipe
from lqc.runtime.compiled import CompiledGraph
from lqc.runtime.kv.graph_cache import is_handle

from .options import CompileOptions

log = logging.getLogger("lqc")

_graph_ids = itertools.count()
_reports: list[GraphReport] = []
_reports_lock = threading.Lock()
_compiled: list[weakref.ref] = []  # every CompiledGraph, for lqc.compress to find its own


def reports() -> list[GraphReport]:
    """Pass reports of every graph lqc compiled in this process, oldest first."""
    with _reports_lock:
        return list(_reports)


def compiled_graph_count() -> int:
    with _reports_lock:
        return len(_compiled)


def compiled_graphs_since(count: int) -> list[CompiledGraph]:
    """CompiledGraphs built after ``compiled_graph_count()`` returned ``count`` (still alive)."""
    with _reports_lock:
        return [c for ref in _compiled[count:] if (c := ref()) is not None]


def clear_reports() -> None:
    with _reports_lock:
        _reports.clear()


def lqc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None, mode: str | None = None):
    """The dynamo backend. ``options``: see lqc.options.CompileOptions."""
    opts = CompileOptions.parse(options)
    recipe = load_recipe(resolve_recipe(opts.recipe))  # raises on unknown passes or options
    calibration = calibration_from(opts.calibration, opts.tokenizer)
    name = f"graph{next(_graph_ids)}"

    if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
        return _fallback(
            gm, example_inputs, name,
            "lqc compiles inference graphs and this one is traced with autograd on; call the model under "
            "torch.no_grad() or torch.inference_mode() to compress it",
        )

    def build(args: Sequence[Any], rebuilding: bool = False) -> CompiledGraph:
        start = time.perf_counter()
        graph = capture(gm, args, name=name)
        capture_seconds = time.perf_counter() - start
        ctx = PassContext(calibration=calibration, progress=opts.progress)
        if opts.verify and any(n.target in STATEFUL_OPS for n in graph.gm.graph.nodes):
            warnings.warn(f"lqc: {name} is not verified: it updates a compressed KV cache (lqc::kv_attention), so "
                          f"running it again to check a pass would store its tokens twice", stacklevel=2)
        elif opts.verify:
            # a size input of a dynamic graph is a SymInt here: the check runs on the value it stands for
            ctx.check_inputs = [tuple(_concrete(args[i.index]) for i in graph.inputs)]
            if calibration is not None:
                try:
                    ctx.check_inputs += calibration.inputs_for(graph, max_windows=2)
                except CalibrationUnavailable:
                    pass  # decode graphs: the example inputs are the check
        debug_dir = Path(opts.debug_dir) / name if opts.debug_dir else None
        viz = opts.viz or debug_dir is not None
        report = PassManager(recipe, verify=opts.verify, debug_dir=debug_dir, snapshots=viz).run(graph, ctx)
        report.capture_seconds = capture_seconds
        if viz:
            _annotate_for_viz(report, graph, ctx.reference, args, debug_dir)
        target = opts.target
        # Outside dynamo's tracing context Inductor would specialize a dynamic graph to these shapes:
        # such a rebuild runs eagerly (at target triton: its kernels, the rest eagerly).
        inductor = not (rebuilding and any(i.role == "size" for i in graph.inputs))
        if not inductor and target != "triton":
            target = "eager"
        start = time.perf_counter()
        fn = compile_graph(graph, target, [args[i.index] for i in graph.inputs], debug_dir, opts.autotune, inductor,
                           opts.share_blocks)
        report.codegen_seconds = time.perf_counter() - start
        with _reports_lock:
            _reports.append(report)
        frozen = [(f.index, f.tensor, f.version) for f in graph.frozen]
        compiled = CompiledGraph(
            fn, [i.index for i in graph.inputs], frozen, rebuild=lambda a: build(a, rebuilding=True), name=name, graph=graph
        )
        with _reports_lock:
            _compiled.append(weakref.ref(compiled))
        return compiled

    try:
        return build(list(example_inputs))
    except LqcConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure on a graph becomes a warned fallback
        log.debug("lqc failed on %s", name, exc_info=True)
        return _fallback(gm, example_inputs, name, f"{type(exc).__name__}: {exc}")


def _annotate_for_viz(report: GraphReport, graph, reference, args: Sequence[Any], debug_dir: Path | None) -> None:
    """Fusion groups and per-node error for lqc.viz; with a debug_dir, the report page itself."""
    from lqc.viz import annotate, write_html

    annotate.annotate_kernels(report, graph)
    inputs = tuple(_concrete(args[i.index]) for i in graph.inputs)
    shapes = ", ".join(f"{i.name} {list(x.shape)}" for i, x in zip(graph.inputs, inputs) if isinstance(x, torch.Tensor) and i.role != "size")
    annotate.annotate_errors(report, graph, reference, inputs, f"measured on the inputs this graph was compiled with ({shapes})")
    if debug_dir is not None:
        try:
            write_html([report], debug_dir / "report.html", title=f"lqc: {graph.name}")
        except Exception as exc:  # noqa: BLE001 - a debugging aid must not fail the compile
            warnings.warn(f"lqc: could not write {debug_dir / 'report.html'}: {type(exc).__name__}: {exc}", stacklevel=2)


def _concrete(value: Any) -> Any:
    return value.node.hint if isinstance(value, torch.SymInt) and value.node.hint is not None else value


def _fallback(gm: fx.GraphModule, example_inputs: Sequence[Any], name: str, reason: str):
    warnings.warn(f"lqc: {name} falls back to Inductor, uncompressed: {reason}", stacklevel=2)
    with _reports_lock:
        _reports.append(GraphReport(graph=name, capture_nodes=len(gm.graph.nodes), fallback=reason))
    try:
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, list(example_inputs))
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"lqc: Inductor also failed on {name} ({type(exc).__name__}: {exc}); running it eagerly")
        fn = gm.forward
    return _refusing_compressed_cache(fn, name, reason)


def _refusing_compressed_cache(fn, name: str, reason: str):
    """``fn``, unless it is handed a dynamic cache that an earlier graph compressed (compress_kv):
    the cache then holds lqc's handles, not keys, and an unrewritten attention would read them."""

    def run(*args):
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args  # boxed or not
        if any(is_handle(a) for a in inputs):
            raise RuntimeError(
                f"lqc: {name} could not be compressed ({reason}), but the KV cache it was given was compressed by an "
                f"earlier graph (compress_kv), so it cannot attend over it. Fix what the warning for {name} names, "
                f"or drop compress_kv from the recipe"
            )
        return fn(*args)

    if getattr(fn, "_boxed_call", False):
        run._boxed_call = True
    return run
