"""The demo's helper process: plumbing to run one compile in a second process on the other core.

``lqc.demo`` starts it before loading the model (its imports overlap the load), tells it when the
model is loaded, and waits for its answer: ("ok", first calls' seconds) or ("error", why). A
marker file records the code fingerprint that last filled the caches, so a repeat run with warm
caches skips the helper.
"""

from __future__ import annotations

import hashlib
import importlib
import multiprocessing
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Helper:
    process: multiprocessing.Process
    loaded: "multiprocessing.synchronize.Event"  # set once the main process has loaded (and converted) the model
    results: multiprocessing.Queue  # one ("ok", first_calls) or ("error", message)
    answer: tuple | None = None  # what it put on ``results``


def start_helper(main: Callable, *args) -> Helper:
    """A spawned process running ``main(*args, loaded, results, started)``; ``started`` is the
    parent's clock (the last of ``args``), so both processes' log lines carry the same times."""
    context = multiprocessing.get_context("spawn")
    loaded, results = context.Event(), context.Queue()
    *head, started = args
    process = context.Process(target=main, args=(*head, loaded, results, started), daemon=True)
    process.start()
    return Helper(process, loaded, results)


def helper_answered(helper: Helper, timeout: float = 0.0) -> bool:
    """Whether the helper has answered (or died), waiting at most ``timeout`` seconds; the answer
    is kept in ``helper.answer``."""
    if helper.answer is None:
        try:
            helper.answer = helper.results.get(timeout=timeout) if timeout else helper.results.get_nowait()
        except queue.Empty:
            if helper.process.is_alive():
                return False
            helper.answer = ("error", f"it exited with code {helper.process.exitcode}")
    return True


def wait_for_helper(helper: Helper, log: Callable[[str], None], started: float) -> tuple[float, float] | None:
    """The helper's (first prefill, first decode step) seconds, or None when it failed: then this
    process compiles from scratch, only slower."""
    if not helper_answered(helper):
        log(f"[{clock(started)}] waiting for the helper process ...")
        while not helper_answered(helper, timeout=1.0):
            pass
    kind, value = helper.answer
    if kind == "ok":
        return value
    log(f"[{clock(started)}] the helper process failed ({value}); compiling here")
    return None


def stop_helper(helper: Helper) -> None:
    if helper.answer is not None:  # it is exiting
        helper.process.join(timeout=10)
    if helper.process.is_alive():
        helper.process.terminate()
        helper.process.join()
    helper.results.close()


def helper_marker(cache_dir: Path, model_name: str, write: str | None = None) -> str:
    """The code fingerprint of the last helper that compiled ``model_name`` into ``cache_dir``
    (or "" when none did); ``write``: record one."""
    path = cache_dir / f"helper-{Path(model_name).name}.done"
    if write is not None:
        path.write_text(write)
    return path.read_text() if path.exists() else ""


def code_fingerprint() -> str:
    """A digest of torch's version and lqc's code and recipes: what built the caches."""
    digest = hashlib.sha256(torch.__version__.encode())
    for package in ("lqc", "lqc.passes", "lqc.ir", "lqc.codegen", "lqc.runtime"):
        for root in importlib.import_module(package).__path__:
            for path in sorted([*Path(root).rglob("*.py"), *Path(root).rglob("*.yaml")]):
                digest.update(path.read_bytes())
    return digest.hexdigest()


def clock(started: float) -> str:
    return f"{time.perf_counter() - started:6.1f}s"
