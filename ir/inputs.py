"""Build a graph's inputs from token ids, for calibration and numeric checks.

A graph dynamo captured takes whatever the model's forward took: token ids, positions, a cache
counter, sizes of symbolic dims. Calibration data is token ids, so each input is derived from
them by its role (see ir.graph.INPUT_ROLES). Graphs that read a KV cache (decode steps) cannot
be fed this way; the error says so and what to do instead.
"""

from __future__ import annotations

import re

import torch

from .errors import LqcConfigError
from .graph import Graph

_SIZE_SOURCE = re.compile(r"^(?P<tensor>.+)\.size\(\)\[(?P<dim>\d+)\]$")


class CalibrationUnavailable(LqcConfigError):
    """The graph takes inputs that cannot be derived from token ids."""


def token_shape(graph: Graph, default_length: int = 512) -> tuple[int, int]:
    """(batch, length) a token window for ``graph`` must have: static dims as captured, symbolic ones
    take batch 1 and ``default_length``."""
    for inp in graph.inputs:
        if inp.role == "token_ids" and isinstance(inp.example, torch.Tensor) and inp.example.dim() == 2:
            batch, length = inp.example.shape
            batch = int(batch) if isinstance(batch, int) else 1
            length = int(length) if isinstance(length, int) else default_length
            return batch, length
    raise CalibrationUnavailable(
        f"{graph.name} has no token-id input, so calibration text cannot be fed to it "
        f"(inputs: {', '.join(f'{i.name} ({i.role})' for i in graph.inputs) or 'none'})"
    )


def inputs_from_tokens(graph: Graph, token_ids: torch.Tensor) -> tuple:
    """The graph's user inputs for a [batch, length] window of token ids."""
    if token_ids.dim() != 2:
        raise ValueError(f"token_ids must be [batch, length]; got shape {tuple(token_ids.shape)}")
    batch, length = token_ids.shape
    by_source = {inp.source: token_ids for inp in graph.inputs if inp.role == "token_ids" and inp.source}
    args = []
    for inp in graph.inputs:
        example = inp.example
        if inp.role == "token_ids":
            args.append(token_ids)
        elif inp.role in ("position_ids", "cache_position"):
            positions = torch.arange(length)
            args.append(positions.expand(batch, length) if _dims(example) == 2 else positions)
        elif inp.role == "attention_mask" and _dims(example) == 2:
            args.append(torch.ones(batch, length, dtype=example.dtype if example is not None else torch.long))
        elif inp.role == "cache_length":
            args.append(torch.zeros((), dtype=example.dtype if example is not None else torch.long))
        elif inp.role == "size" and (m := _SIZE_SOURCE.match(inp.source)) and m["tensor"] in by_source:
            args.append(int(by_source[m["tensor"]].shape[int(m["dim"])]))
        else:
            raise CalibrationUnavailable(
                f"{graph.name} takes {inp.name} ({inp.role}, {inp.source or 'no source'}), which cannot be built from "
                f"token ids. Calibrate on a prefill graph: lqc.compress(model, recipe, calibration=...), or run a "
                f"prefill through the compiled model before any decode step."
            )
    return tuple(args)


def _dims(example) -> int | None:
    return example.dim() if isinstance(example, torch.Tensor) else None


def token_windows(stream: torch.Tensor, length: int, max_windows: int | None = None, *, what: str = "the text",
                  fix: str = "") -> torch.Tensor:
    """Non-overlapping [n, length] windows from the start of a 1-D token stream (evaluation and
    calibration both cut their text this way)."""
    count = len(stream) // length
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise LqcConfigError(f"{what} has {len(stream)} tokens, fewer than one window of {length}{fix}")
    return stream[: count * length].view(count, length)
