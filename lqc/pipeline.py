"""One ``torch.compile`` call, as data: a ``Session`` and the ``Compilation`` of each graph.

A session is what dynamo calls for every graph it captures (prefill, decode, each new shape). It
resolves its recipe once, when it is made; then, per graph:

    capture -> the recipe's passes -> the target's lowering passes -> the target's code

all in lqc's pass manager (verify-each, provenance, snapshots for lqc.viz), and it keeps a
``Compilation`` record of each graph: the captured reference, the compressed graph (what
``lqc.save`` writes), the lowered one, every pass's report and the callable handed to dynamo.
``lqc.compress``, ``lqc.viz``, ``lqc bench`` and the CLI read ``session.compilations``.

Errors: a bad recipe or option raises (a fallback would hide the mistake). So do bad token ids
(non-integer, empty, outside the embedding table): the first call checks them right after capture,
before any pass runs, and every later call checks their range in one reduction (``check_inputs``;
see lqc.runtime.compiled). A graph lqc cannot handle falls back to Inductor with a warning, and if
Inductor fails too, to the graph as dynamo captured it: compiling never crashes on a graph lqc does
not understand.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from lqc.codegen.targets import compile_graph, resolve_target
from lqc.ir import Graph, capture
from lqc.ir.errors import LqcConfigError
from lqc.ir.inputs import CalibrationUnavailable
from lqc.ir.lqc_ops import STATEFUL_OPS
from lqc.ir.ops import SHAPE_ONLY_OPS, op_name
from lqc.passes import GraphReport, PassContext, PassManager, load_recipe
from lqc.recipes import resolve_recipe
from lqc.runtime.compiled import CompiledGraph, check_token_ids
from lqc.runtime.kv.graph_cache import is_handle

from .data import calibration_from
from .lowering import lowering_passes
from .options import CompileOptions

log = logging.getLogger("lqc")


@dataclass(eq=False)
class Compilation:
    """One captured graph, from capture to the callable dynamo runs."""

    name: str
    report: GraphReport  # capture, then one record per pass: the recipe's, then the lowering's
    reference: Graph | None = None  # the graph as captured (the passes' numeric reference)
    graph: Graph | None = None  # after the recipe: what lqc.save writes
    lowered: Graph | None = None  # after the lowering passes: what the target compiled
    target: str = ""
    fn: Callable | None = None  # what dynamo calls (a CompiledGraph, or the fallback)

    @property
    def fallback(self) -> str:
        return self.report.fallback


class Session:
    """A dynamo backend with a memory: ``torch.compile(model, backend=lqc.Session(recipe="int8"))``.

    Options are those of ``torch.compile(..., backend="lqc", options={...})`` (lqc.options), given
    as a dict, a CompileOptions or keywords. The recipe is resolved and validated here, once.
    """

    __name__ = "lqc"  # dynamo names backends in its logs

    def __init__(self, options: Any = None, **values: Any):
        if values:  # keywords on top of the options given
            options = {**(vars(options) if isinstance(options, CompileOptions) else options or {}), **values}
        self.options = CompileOptions.parse(options)
        self.recipe = load_recipe(resolve_recipe(self.options.recipe))  # raises on unknown passes or options
        self.calibration = calibration_from(self.options.calibration, self.options.tokenizer)
        self.compilations: list[Compilation] = []
        self.source_options: Any = None  # the options object torch.compile passed (lqc.backend)
        self._names = itertools.count()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"lqc.Session(recipe={self.options.recipe!r}, {len(self.compilations)} graphs)"

    @property
    def reports(self) -> list[GraphReport]:
        return [c.report for c in self.compilations]

    @property
    def graphs(self) -> list[Graph]:
        """The compressed graphs (after the recipe), oldest first."""
        return [c.graph for c in self.compilations if c.graph is not None]

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """Dynamo's entry: compile one captured graph."""
        name = f"graph{next(self._names)}"
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            return self._fallback(
                gm, example_inputs, name,
                "lqc compiles inference graphs and this one is traced with autograd on; call the model under "
                "torch.no_grad() or torch.inference_mode() to compress it",
            )
        try:
            compilation = self.compile(gm, list(example_inputs), name)
        except LqcConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure on a graph becomes a warned fallback
            log.debug("lqc failed on %s", name, exc_info=True)
            return self._fallback(gm, example_inputs, name, f"{type(exc).__name__}: {exc}")
        self._add(compilation)
        return compilation.fn

    def compile(self, gm: fx.GraphModule, args: Sequence[Any], name: str, rebuilding: bool = False) -> Compilation:
        """Capture, compress, lower and compile one graph (``rebuilding``: its weights changed)."""
        opts = self.options
        start = time.perf_counter()
        graph = capture(gm, args, name=name)
        capture_seconds = time.perf_counter() - start
        # Token ids are checked before any pass runs: an id outside the embedding table would
        # otherwise fail inside calibration or a generated kernel, far from its cause.
        token_inputs = embedding_inputs(graph)
        for index, rows in token_inputs.items():
            if not is_fake(args[index]):  # dynamo passes real tensors; a fake one has no values to check
                check_token_ids(args[index], rows, f"lqc ({name})")
        ctx = self._context(graph, args, name)
        debug_dir = Path(opts.debug_dir) / name if opts.debug_dir else None
        viz = opts.viz or debug_dir is not None
        with said_once(name):
            report = PassManager([copy.copy(p) for p in self.recipe], verify=opts.verify, debug_dir=debug_dir,
                                 snapshots=viz).run(graph, ctx)
        report.capture_seconds = capture_seconds
        compilation = Compilation(name=name, report=report, reference=ctx.reference, graph=graph)

        # Outside dynamo's tracing context Inductor would specialize a dynamic graph to these shapes:
        # such a rebuild runs eagerly (at target triton: its kernels, the rest eagerly).
        inputs = [args[i.index] for i in graph.inputs]
        inductor = not (rebuilding and any(i.role == "size" for i in graph.inputs))
        target = resolve_target(opts.target)
        if not inductor and target != "triton":
            target = "eager"
        compilation.target = target
        lowering = lowering_passes(target, inputs, debug_dir, opts.autotune)
        lowered = graph.copy() if lowering else graph  # the compressed graph stays as the recipe left it
        if lowering:
            PassManager(lowering, verify=opts.verify, debug_dir=debug_dir, snapshots=viz).run(lowered, ctx, report=report)
        compilation.lowered = lowered
        if viz:
            from .viz.annotate import annotate_for_viz

            annotate_for_viz(compilation, [_concrete(args[i.index]) for i in graph.inputs], debug_dir)
        start = time.perf_counter()
        lowering_record = report.records[-1].details if target == "triton" else None  # lower_triton's Lowering
        fn = compile_graph(lowered, target, inputs, lowering_record, inductor=inductor, share_blocks=opts.share_blocks,
                           cpp_wrapper=opts.cpp_wrapper)
        report.codegen_seconds = time.perf_counter() - start
        frozen = [(f.index, f.tensor, f.version) for f in graph.frozen]
        token_checks = list(token_inputs.items()) if opts.check_inputs else []
        compilation.fn = _SessionGraph(fn, [i.index for i in graph.inputs], frozen, name, self, gm, token_checks)
        return compilation

    def _add(self, compilation: Compilation) -> None:
        with self._lock:
            self.compilations.append(compilation)

    def _context(self, graph: Graph, args: Sequence[Any], name: str) -> PassContext:
        ctx = PassContext(calibration=self.calibration, progress=self.options.progress)
        if self.options.verify and any(n.target in STATEFUL_OPS for n in graph.gm.graph.nodes):
            warnings.warn(f"lqc: {name} is not verified: it updates a compressed KV cache (lqc::kv_attention), so "
                          f"running it again to check a pass would store its tokens twice", stacklevel=3)
        elif self.options.verify:
            # a size input of a dynamic graph is a SymInt here: the check runs on the value it stands for
            ctx.check_inputs = [tuple(_concrete(args[i.index]) for i in graph.inputs)]
            if self.calibration is not None:
                try:
                    ctx.check_inputs += self.calibration.inputs_for(graph, max_windows=2)
                except CalibrationUnavailable:
                    pass  # decode graphs: the example inputs are the check
        return ctx

    def _fallback(self, gm: fx.GraphModule, example_inputs: Sequence[Any], name: str, reason: str) -> Callable:
        warnings.warn(f"lqc: {name} falls back to Inductor, uncompressed: {reason}", stacklevel=3)
        report = GraphReport(graph=name, capture_nodes=len(gm.graph.nodes), fallback=reason)
        try:
            from torch._inductor.compile_fx import compile_fx

            fn = compile_fx(gm, list(example_inputs))
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"lqc: Inductor also failed on {name} ({type(exc).__name__}: {exc}); running it eagerly")
            fn = gm.forward
        fn = _refusing_compressed_cache(fn, name, reason)
        fn.lqc_session = self  # the compiled graphs hold their session (lqc.backend finds it while they live)
        compilation = Compilation(name=name, report=report, target="fallback", fn=fn)
        self._add(compilation)
        return compilation.fn


class _SessionGraph(CompiledGraph):
    """What dynamo calls for one graph: a CompiledGraph that, when a frozen weight changed after
    compilation (dynamo passes parameters unguarded and will not recompile), compiles the graph
    again through its session, warned, instead of serving the old weights."""

    def __init__(self, fn, user_indices, frozen, name: str, session: Session, gm: fx.GraphModule, token_checks=()):
        super().__init__(fn, user_indices, frozen, name, token_checks)
        self.session, self.gm = session, gm
        # Two threads calling one model after its weights changed would both recompress it, at once,
        # on the shape-inference state capture shares with dynamo (not thread-safe): one at a time,
        # and the second finds the weights current again.
        self._recompressing = threading.Lock()

    def weights_changed(self, args: Sequence[Any]) -> None:
        with self._recompressing:
            if self.weights_unchanged(args):  # another thread recompressed them while this one waited
                return
            warnings.warn(f"lqc: weights of {self.name} changed after compilation (in-place update or new tensors); "
                          f"recompressing them", stacklevel=4)
            compilation = self.session.compile(self.gm, args, self.name, rebuilding=True)
            self.session._add(compilation)
            fresh = compilation.fn
            self.fn, self.user_indices, self.frozen, self.token_checks = fresh.fn, fresh.user_indices, fresh.frozen, fresh.token_checks


def embedding_inputs(graph: Graph) -> dict[int, int]:
    """Dynamo argument index -> rows of the embedding table, for each token-id input of ``graph``
    that indexes a frozen embedding (a reshape on the way, as GPT-2 does, is allowed). Position
    inputs that index a learned table are left out: the error's fix would be another one, and
    lqc.compress and lqc.generate check the length against the model's positions up front."""
    placeholders = {inp.name: inp.index for inp in graph.inputs if inp.role == "token_ids"}
    found: dict[int, int] = {}
    for node in graph.nodes:
        if op_name(node) != "embedding" or len(node.args) < 2 or not graph.is_constant(node.args[1]):
            continue
        indices = node.args[0]
        while isinstance(indices, fx.Node) and op_name(indices) in SHAPE_ONLY_OPS and indices.args:
            indices = indices.args[0]
        if isinstance(indices, fx.Node) and indices.op == "placeholder" and indices.name in placeholders:
            rows = graph.constant(node.args[1]).shape[0]
            index = placeholders[indices.name]
            found[index] = min(rows, found.get(index, rows))  # ids feeding two tables must fit the smaller
    return found


def is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return isinstance(value, torch.Tensor) and _is_fake(value)


def _concrete(value: Any) -> Any:
    return value.node.hint if isinstance(value, torch.SymInt) and value.node.hint is not None else value


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


@contextlib.contextmanager
def said_once(graph_name: str):
    """What the recipe's passes warn about one graph (a region left uncompressed, a fallback), said
    in one warning: a model lqc only partly compresses gets one list, not a warning per pass."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # said even when a pass then fails
        _say_once(graph_name, caught)


def _say_once(graph_name: str, caught: list) -> None:
    ours = [w for w in caught if issubclass(w.category, UserWarning) and str(w.message).startswith("lqc")]
    for w in caught:
        if w not in ours or len(ours) == 1:  # others' warnings, and a single one of ours, as they were
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if len(ours) > 1:
        notes = "\n".join(f"  - {w.message}" for w in ours)
        warnings.warn(f"lqc: {graph_name}: {len(ours)} notes on what the recipe left as it was:\n{notes}", UserWarning,
                      stacklevel=2)
