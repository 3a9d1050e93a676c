"""How good a per-layer choice is: the KL divergence of its next-token distribution from the float
model's, per token, on calibration windows (never the evaluation text).

The candidate is the user's own model with its linears' weights swapped for the chosen levels'
effective weights (LevelTable), run eagerly: one forward per window, no compilation, so a search
can score hundreds of candidates. The float model's log-probabilities are computed once per
window and kept (float32: a low-precision copy would blur KLs of a few hundredths).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from lqc.auto.levels import LevelTable
from lqc.passes.structural.drop_choice import kl_per_token


class KLFitness:
    def __init__(self, model: torch.nn.Module, windows: Sequence[torch.Tensor], table: LevelTable,
                 fixed: dict[str, torch.Tensor] | None = None):
        """``windows``: [1, L] token ids; ``fixed``: weights (by parameter name) every candidate
        shares, e.g. the int8 embedding table of the recipe's last entry."""
        self.model, self.windows, self.table = model, list(windows), table
        self.modules = {u: model.get_submodule(u) for u in table.units}
        params = dict(model.named_parameters(remove_duplicate=False))
        self.fixed = {params[name]: tensor for name, tensor in (fixed or {}).items()}
        self._reference: dict[int, torch.Tensor] = {}
        self.forwards = 0

    @contextlib.contextmanager
    def swapped(self, config: dict[str, str]) -> Iterator[None]:
        """The model computing with ``config``'s levels (unit -> level name) inside the block."""
        saved = [(p, p.data) for p in self.fixed] + [(m.weight, m.weight.data) for m in self.modules.values()]
        try:
            for param, tensor in self.fixed.items():
                param.data = tensor
            for unit, level in config.items():
                self.modules[unit].weight.data = self.table.weights[level][unit]
            yield
        finally:
            for param, data in saved:
                param.data = data

    @torch.no_grad()
    def reference(self, i: int) -> torch.Tensor:
        if i not in self._reference:
            self._reference[i] = F.log_softmax(self._logits(self.windows[i]), dim=-1)
        return self._reference[i]

    @torch.no_grad()
    def __call__(self, config: dict[str, str], window_ids: Sequence[int]) -> float:
        """Mean KL(p_float || p_config) per token over the windows ``window_ids``."""
        references = [self.reference(i) for i in window_ids]  # before the swap: the float model's
        total = tokens = 0
        with self.swapped(config):
            for i, ref in zip(window_ids, references):
                part, n = kl_per_token(self._logits(self.windows[i]), ref)
                total, tokens = total + part, tokens + n
        return total / tokens

    @torch.no_grad()
    def perplexity(self, config: dict[str, str], window_ids: Sequence[int]) -> float:
        """Perplexity of the next tokens of the windows ``window_ids`` with ``config``'s levels
        (an empty config: the float model)."""
        nll = tokens = 0
        with self.swapped(config):
            for i in window_ids:
                ids = self.windows[i].reshape(-1)
                nll += float(F.cross_entropy(self._logits(self.windows[i])[:-1], ids[1:], reduction="sum"))
                tokens += ids.numel() - 1
        return math.exp(nll / tokens)

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        out = self.model(ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.reshape(-1, logits.shape[-1]).float()
