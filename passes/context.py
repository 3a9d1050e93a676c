"""What a pass can reach besides the graph: calibration data, the reference graph, the weight
transform cache and a logger."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.fx as fx

from lqc.ir import Graph
from lqc.ir.errors import LqcConfigError
from lqc.ir.inputs import inputs_from_tokens, token_shape, token_windows

from lqc.passes.base import Pass
from lqc.passes.recipe import options_digest
from lqc.passes.transform_cache import DEFAULT_CACHE, TransformCache
from lqc.passes.transform_store import TransformStore, model_digest, store_from_env

T = TypeVar("T")


@dataclass
class Calibration:
    """Calibration data: token id sequences, cut into windows that fit the graph being compiled."""

    sequences: list[torch.Tensor]  # 1-D int64 token ids, one per document or sample
    max_windows: int = 32
    default_length: int = 512  # window length for graphs whose sequence length is symbolic
    # A token every window starts with: the BOS of a model trained to always see one first (Gemma
    # degenerates without it, so statistics taken without it describe a model nobody runs).
    bos: int | None = None

    def __post_init__(self) -> None:
        if not self.sequences:
            raise LqcConfigError("calibration data is empty: give at least one non-empty text or token sequence")
        self.sequences = [torch.as_tensor(s, dtype=torch.long).flatten() for s in self.sequences]
        digest = hashlib.sha256()
        for seq in self.sequences:
            digest.update(seq.numpy().tobytes())
        if self.bos is not None:
            digest.update(f"bos={self.bos}".encode())
        self.digest = digest.hexdigest()[:16]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def windows(self, batch: int, length: int, max_windows: int | None = None) -> list[torch.Tensor]:
        """Non-overlapping [batch, length] windows of the concatenated sequences (each row the BOS
        and ``length - 1`` text tokens when ``bos`` is set)."""
        text_length = length - (self.bos is not None)
        rows = token_windows(torch.cat(self.sequences), batch * text_length, max_windows or self.max_windows,
                             what="calibration data", fix=" (this graph's inputs): give more calibration text")
        rows = rows.view(-1, batch, text_length)
        if self.bos is not None:
            rows = torch.cat([rows.new_full((*rows.shape[:2], 1), self.bos), rows], dim=-1)
        return list(rows)

    def inputs_for(self, graph: Graph, max_windows: int | None = None, *, tokens: int | None = None) -> list[tuple]:
        """Inputs for ``graph``: windows of the token shape it was captured with. ``tokens`` asks for
        a token budget instead of a window count (a graph captured on a short prompt then gets
        many short windows rather than a handful of tokens)."""
        batch, length = token_shape(graph, self.default_length)
        if tokens is not None:
            max_windows = max(1, -(-tokens // (batch * length)))
        return [inputs_from_tokens(graph, w) for w in self.windows(batch, length, max_windows)]


@dataclass
class PassContext:
    calibration: Calibration | None = None
    cache: TransformCache = field(default_factory=lambda: DEFAULT_CACHE)
    reference: Graph | None = None  # the graph before any pass (set by the manager)
    check_inputs: list[tuple] = field(default_factory=list)  # inputs for the numeric check
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("lqc"))
    progress: bool = True  # whether long passes show progress bars
    current_pass: Pass | None = None
    passes_before: list[str] = field(default_factory=list)  # options digests of the passes run so far (set by the manager)
    store: TransformStore | None = field(default_factory=store_from_env)  # on disk, when LQC_CACHE_DIR is set
    _model_digest: str | None = None

    def require_calibration(self) -> Calibration:
        if self.calibration is None:
            name = self.current_pass.name if self.current_pass else "this pass"
            raise LqcConfigError(
                f"pass {name!r} needs calibration data. Pass it as options={{'calibration': ..., 'tokenizer': ...}} "
                f"to torch.compile, or lqc.compress(model, recipe, calibration=...): a text file path, a list of "
                f"strings (with a tokenizer) or token id tensors."
            )
        return self.calibration

    def calibration_inputs(self, graph: Graph, max_windows: int | None = None, *, tokens: int | None = None) -> list[tuple]:
        return self.require_calibration().inputs_for(graph, max_windows, tokens=tokens)

    def transform(self, graph: Graph, key: Any, constants: Sequence[fx.Node | str], compute: Callable[[], T]) -> T:
        """Compute a weight transform once per model: cached under the current pass's name and
        options (and calibration, if the pass requires it), ``key``, and the source weights."""
        p = self.current_pass
        full_key = (
            p.name if p else "",
            options_digest(p) if p else "",
            self.calibration.digest if (p and "calibration" in p.requirements() and self.calibration) else "",
            key,
        )
        sources = [graph.source_tensor(c) for c in constants]
        if self.store is not None:
            disk_key = self.store.key(full_key, self.model_digest(), self.passes_before, sources)
            compute_in_memory = compute
            compute = lambda: self.store.get_or_compute(disk_key, compute_in_memory)  # noqa: E731
        return self.cache.get_or_compute(full_key, sources, compute)

    def model_digest(self) -> str:
        """Digest of every weight of the graph as captured (the reference): what calibration saw."""
        if self._model_digest is None:
            graph = self.reference
            self._model_digest = model_digest([graph.source_tensor(name) for name, _ in graph.constants()]) if graph else ""
        return self._model_digest
