"""``torch.compile(model, backend="lqc", options={...})``: the adapter from dynamo's string backend
to an lqc.pipeline.Session.

torch.compile hands the backend the same ``options`` object for every graph of one call, so the
options object identifies the call: its first graph makes a Session (the recipe resolved once),
later graphs reuse it. The index below only finds live sessions; it holds none (a session lives as
long as a compiled graph refers to it) and no results (those are in ``session.compilations``).
``session_of(compiled)`` finds the session of a compiled model or function.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Sequence

import torch.fx as fx

from lqc.ir.errors import LqcError

from .pipeline import Session

_live_sessions: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()  # id(options) -> session
_lock = threading.Lock()


def lqc_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None, mode: str | None = None):
    """The dynamo backend. ``options``: see lqc.options.CompileOptions."""
    return _session_for(options)(gm, example_inputs)


def _session_for(options: Any) -> Session:
    with _lock:
        session = _live_sessions.get(id(options))
        if session is None or session.source_options is not options:
            session = Session(options)
            session.source_options = options  # keeps the key's object alive (and its id unique) with the session
            _live_sessions[id(options)] = session
        return session


def session_of(compiled: Any) -> Session:
    """The lqc Session behind ``compiled``: a Session itself, a module from ``lqc.compress`` or
    ``lqc.load``, or what ``torch.compile(..., backend="lqc" or a Session)`` returned (a module or
    a function). Its ``compilations`` hold every graph's record."""
    if isinstance(compiled, Session):
        return compiled
    compression = getattr(compiled, "_lqc_compression", None)
    if compression is not None:
        return compression.session
    backend = _dynamo_backend(compiled)
    if isinstance(backend, Session):
        return backend
    compiler_fn = getattr(backend, "compiler_fn", None)  # torch._TorchCompileWrapper
    if isinstance(compiler_fn, Session):
        return compiler_fn
    if compiler_fn is lqc_backend:
        session = _live_sessions.get(id(backend.kwargs.get("options")))
        if session is not None:
            return session
        raise LqcError("this model was compiled with backend='lqc' but has not run yet: call it once, then ask again")
    raise LqcError(f"{type(compiled).__name__} was not compiled by lqc: pass what torch.compile(..., backend='lqc') "
                   f"or lqc.compress returned, or compile with backend=lqc.Session(...)")


def _dynamo_backend(compiled: Any) -> Any:
    """The backend object torch.compile was given, found through dynamo's wrappers."""
    ctx = getattr(compiled, "dynamo_ctx", None)  # an OptimizedModule
    if ctx is None and callable(compiled):  # a compiled function: its context is in the wrapper's closure
        cells = getattr(getattr(compiled, "forward", compiled), "__closure__", None) or ()
        ctx = next((c.cell_contents for c in cells if hasattr(c.cell_contents, "callback")), None)
    fn = getattr(ctx, "callback", None)
    while hasattr(fn, "_torchdynamo_orig_backend"):
        fn = fn._torchdynamo_orig_backend
    return fn
