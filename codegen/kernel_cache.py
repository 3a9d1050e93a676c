"""Generated kernel sources on disk, keyed by a hash of their content.

A generated kernel is a Python module (Triton's ``@triton.jit`` reads a kernel's source from its
file, so it has to be one). ``load_or_write(source)`` names it by the SHA-256 of the source: the
first compile that needs a kernel writes ``<cache>/<hash>.py``; every later one, in this process or
another, finds the file and imports it, generating nothing. Modules already imported in this
process are reused without touching the disk.

The folder is ``$LQC_KERNEL_CACHE``, else ``~/.cache/lqc/kernels``. ``stats`` counts what was
written, read back from disk, and reused in memory, so tests and benchmarks can see a warm compile
generate nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType


@dataclass
class CacheStats:
    written: int = 0  # sources generated and written (cold)
    loaded: int = 0  # found on disk, imported
    reused: int = 0  # already imported in this process


stats = CacheStats()
_modules: dict[str, ModuleType] = {}
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("LQC_KERNEL_CACHE") or Path.home() / ".cache" / "lqc" / "kernels")


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def load_or_write(source: str) -> tuple[str, ModuleType]:
    """(key, module) for ``source``: imported from memory, else from the cache folder, else written there first."""
    key = source_key(source)
    with _lock:
        module = _modules.get(key)
        if module is not None:
            stats.reused += 1
            return key, module
        folder = cache_dir()
        path = folder / f"k{key}.py"
        if path.exists() and path.read_text() == source:
            stats.loaded += 1
        else:
            folder.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(source)
            temporary.replace(path)  # atomic: a concurrent compile never reads half a file
            stats.written += 1
        spec = importlib.util.spec_from_file_location(f"lqc_kernels.k{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[key] = module
        return key, module


def loaded(key: str) -> ModuleType | None:
    """The module imported for ``key`` in this process (None if none)."""
    return _modules.get(key)


def forget_loaded() -> None:
    """Drop the imported modules (the files stay): the next compile reads them back from disk."""
    with _lock:
        _modules.clear()
