"""A cache of weight transforms, so calibration, clustering and GPTQ run once per model.

Dynamo compiles one graph per shape (prefill, first decode, dynamic decode...) and every one of
them goes through the recipe. The expensive part of a pass, transforming weights, depends only
on the weights, the pass options and the calibration data, so it is cached here and reused by
every graph.

An entry is keyed by what the pass says (its name, options digest, the weight's module path...)
plus the identity of its source tensors, and is valid while each source is the same object at
the same ``_version``. Dynamo passes parameters "unguarded": it does not recompile when a
weight changes in place (``load_state_dict``, an optimizer step), so this version check is what
keeps stale compressed weights from being served. Entries die with their source tensors.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch

T = TypeVar("T")


@dataclass
class _Entry:
    sources: list[weakref.ref]
    versions: list[int]
    value: Any

    def valid_for(self, sources: Sequence[torch.Tensor]) -> bool:
        return all(ref() is s and s._version == v for ref, s, v in zip(self.sources, sources, self.versions))


class TransformCache:
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        # Re-entrant: dropping an entry can free the last reference to a tensor that is the source
        # of another entry (a folded weight that was then rotated), whose finalizer drops that
        # entry from inside the first drop, on the same thread.
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.computed: Counter = Counter()  # key[0] (usually the pass name) -> computations

    def get_or_compute(self, key: tuple, sources: Sequence[torch.Tensor], compute: Callable[[], T]) -> T:
        """``compute()`` once per (key, sources at their current versions); the cached value after."""
        full_key = (key, tuple(id(s) for s in sources))
        with self._lock:
            entry = self._entries.get(full_key)
            if entry is not None and entry.valid_for(sources):
                self.hits += 1
                return entry.value
        value = compute()
        with self._lock:
            self.misses += 1
            self.computed[key[0] if key else None] += 1
            self._entries[full_key] = _Entry([weakref.ref(s) for s in sources], [s._version for s in sources], value)
        for source in sources:
            weakref.finalize(source, self._drop, full_key)
        return value

    def _drop(self, full_key: Hashable) -> None:
        with self._lock:
            self._entries.pop(full_key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0
            self.computed.clear()

    def __len__(self) -> int:
        return len(self._entries)


# The process-wide cache the backend uses: shared by every graph of every compiled model.
DEFAULT_CACHE = TransformCache()
