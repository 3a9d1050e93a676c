"""Weight transforms on disk, so a new process does not recalibrate (``LQC_CACHE_DIR``).

The in-memory TransformCache keys on tensor identity, which dies with the process. This store
keys on content instead: the pass's cache key (name, options, calibration digest, its own key),
the digest of every weight of the model as captured (a calibrated transform depends on all the
layers before it), the passes that ran before this one, the source weights' content, and the
source code of lqc's passes and runtime (a fixed bug must not be served from an old file). Any
change to any of these is a miss. A file that cannot be read is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
log = logging.getLogger("lqc")
_PACKAGES = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "runtime"
# id(tensor) -> (weakref, version, digest); a WeakKeyDictionary would compare tensors with ==
_tensor_digests: dict[int, tuple[weakref.ref, int, str]] = {}
_code_digest: str | None = None


def store_from_env() -> "TransformStore | None":
    folder = os.environ.get("LQC_CACHE_DIR")
    return TransformStore(Path(folder) / "transforms") if folder else None


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes; remembered per tensor while its version holds."""
    known = _tensor_digests.get(id(tensor))
    if known is not None and known[0]() is tensor and known[1] == tensor._version:
        return known[2]
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().contiguous().view(-1)
    digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    key = id(tensor)
    if known is None:  # forget it with the tensor (an id is reused once its tensor is gone)
        weakref.finalize(tensor, _tensor_digests.pop, key, None)
    _tensor_digests[key] = (weakref.ref(tensor), tensor._version, digest.hexdigest())
    return _tensor_digests[key][2]


def code_digest() -> str:
    global _code_digest
    if _code_digest is None:
        digest = hashlib.sha256()
        for folder in _PACKAGES:
            for path in sorted(folder.rglob("*.py")):
                digest.update(path.read_bytes())
        _code_digest = digest.hexdigest()
    return _code_digest


class TransformStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def key(self, cache_key: tuple, model_digest: str, passes_before: Sequence[str], sources: Sequence[torch.Tensor]) -> str:
        text = repr((cache_key, model_digest, tuple(passes_before), [tensor_digest(s) for s in sources], code_digest()))
        return hashlib.sha256(text.encode()).hexdigest()

    def get_or_compute(self, key: str, compute: Callable[[], T]) -> T:
        path = self.folder / key[:2] / f"{key}.pt"
        if path.is_file():
            try:
                return _load(path)
            except Exception as exc:  # noqa: BLE001 - a damaged file is recomputed
                log.warning("lqc: transform cache file %s is unreadable (%s); recomputing", path, exc)
        value = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(value, partial)
            partial.replace(path)  # atomic: a reader never sees half a file
        except Exception as exc:  # noqa: BLE001 - values that do not pickle stay in memory only
            log.debug("lqc: transform not stored on disk (%s)", exc)
        return value


def _load(path: Path) -> Any:
    """torch.load on a fresh thread: inside dynamo's backend call, this thread's state makes
    torch.load build meta tensors (seen on torch 2.13), whatever fake modes are unset."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(torch.load, path, weights_only=False).result()  # lqc's own files


def model_digest(constants: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in constants:
        digest.update(tensor_digest(tensor).encode())
    return digest.hexdigest()
