"""Parameter sweeps that cover every value without running every product.

The Triton interpreter pays per program launch, so the kernel tests' full products (hundreds of
cases) cost minutes of CI. ``covering`` keeps every combination of the axes that matter most
(e.g. kernel program x format) and pairs each with one combination of the other axes in turn,
so every shape, dtype and split is still exercised, with several formats each.
``LQC_FULL_SWEEPS=1`` runs the whole product.
"""

from __future__ import annotations

import itertools
import os


def covering(primary: list[list], secondary: list[list]) -> list[tuple]:
    """Tuples (primary values..., secondary values...): every primary combination once; the
    secondary combinations cycled over them (all of them, when there are at least as many
    primary combinations)."""
    firsts = list(itertools.product(*primary))
    seconds = list(itertools.product(*secondary))
    if os.environ.get("LQC_FULL_SWEEPS") == "1":
        return [a + b for a in firsts for b in seconds]
    # a stride coprime with the cycle, so neighbouring primaries (same kernel, next format) differ
    stride = next(s for s in (5, 7, 11, 13, 1) if len(seconds) % s)
    return [a + seconds[(i * stride) % len(seconds)] for i, a in enumerate(firsts)]
