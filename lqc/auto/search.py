"""The per-layer search: a budget in bytes, one level per linear, the smallest KL to the float model.

1. **Start** (a knapsack): each linear's KL when it alone takes the cheapest level (one forward
   each), scaled per level by the layer's output error energy ``tr(dW H dW^T)`` relative to that
   cheapest level, is its cost; a Lagrangian multiple-choice knapsack picks one level per linear
   under the budget. Summed per-layer costs are only a start: they do not predict the whole
   model's loss (EvoPress's finding), which is why step 2 exists.
2. **Evolve** (EvoPress, Sieberling et al. 2024): each generation mutates the parent into
   ``offspring`` children (a few linears one level up, then random linears one level down until
   the budget holds), scores them all on one calibration window, the best ``survivors`` and the
   parent on ``windows`` more (fresh windows each generation), and keeps the best. The parent
   only changes when a child beats it on the same tokens.

Deterministic for a seed; the state is written after every step to ``state_path`` (JSON) and a
rerun with the same settings resumes from it.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lqc.auto.fitness import KLFitness
from lqc.auto.levels import LevelTable
from lqc.ir.errors import LqcConfigError


@dataclass
class SearchSettings:
    budget_bytes: int  # what the searched linears may store, together
    generations: int = 20
    offspring: int = 8
    survivors: int = 2
    windows: int = 3  # per generation, for the survivors and the parent
    seed: int = 0


@dataclass
class SearchState:
    settings: dict
    sensitivity: dict[str, float] = field(default_factory=dict)  # unit -> KL alone at the cheapest level
    generation: int = 0
    parent: dict[str, str] = field(default_factory=dict)
    parent_kl: float | None = None
    history: list[dict] = field(default_factory=list)  # per generation: parent KL, improved?
    rng: list | None = None

    def save(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self)))
            tmp.replace(path)


def config_bytes(table: LevelTable, config: dict[str, str]) -> int:
    return sum(table.nbytes[level][unit] for unit, level in config.items())


def search(fitness: KLFitness, table: LevelTable, settings: SearchSettings, energy: dict[str, dict[str, float]],
           state_path: Path | None = None, progress: bool = True, sensitivity: dict[str, float] | None = None) -> SearchState:
    """The best configuration found under ``settings.budget_bytes``; ``energy[level][unit]``
    is the layer's output error energy at each level (the knapsack's scale between levels).
    ``sensitivity`` (a previous search's, on the same fitness) skips measuring it again."""
    state = _resume(state_path, settings)
    state.sensitivity = {**(sensitivity or {}), **state.sensitivity}
    order = table.ordered()
    cheapest = order[0].name
    if config_bytes(table, dict.fromkeys(table.units, cheapest)) > settings.budget_bytes:
        raise LqcConfigError(f"lqc auto: the budget {settings.budget_bytes:,} bytes is below what the cheapest level "
                             f"({cheapest}) stores for every layer; raise it or add a cheaper level")
    pending = [u for u in table.units if u not in state.sensitivity]
    for unit in tqdm(pending, desc="sensitivity", disable=not progress or not pending, leave=False):
        state.sensitivity[unit] = fitness({unit: cheapest}, [0])
        state.save(state_path)
    rng = random.Random(settings.seed)
    if state.rng is not None:
        rng.setstate(_tuples(state.rng))
    if not state.parent:
        state.parent = knapsack(table, state.sensitivity, energy, settings.budget_bytes)
        state.parent_kl = fitness(state.parent, range(min(settings.windows, len(fitness.windows))))
        state.rng = rng.getstate()
        state.save(state_path)
    bar = tqdm(total=settings.generations, initial=state.generation, desc="search", disable=not progress, leave=False)
    while state.generation < settings.generations:
        _generation(fitness, table, settings, state, rng, order)
        state.rng = rng.getstate()
        state.save(state_path)
        bar.update(1)
        bar.set_postfix(kl=f"{state.parent_kl:.4f}")
    bar.close()
    return state


def knapsack(table: LevelTable, sensitivity: dict[str, float], energy: dict[str, dict[str, float]], budget: int) -> dict[str, str]:
    """One level per unit minimizing the summed estimated KL under ``budget`` (Lagrangian relaxation:
    each unit takes argmin cost + lambda * bytes; lambda bisected to the smallest that fits)."""
    cheapest = table.ordered()[0].name

    def cost(unit: str, level: str) -> float:
        base = max(energy[cheapest][unit], 1e-30)
        return sensitivity[unit] * energy[level][unit] / base

    def choose(lam: float) -> dict[str, str]:
        return {u: min((lv.name for lv in table.levels), key=lambda name: cost(u, name) + lam * table.nbytes[name][u])
                for u in table.units}

    lo, hi = 0.0, 1.0
    while config_bytes(table, choose(hi)) > budget:
        hi *= 10
        if hi > 1e30:
            return dict.fromkeys(table.units, cheapest)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if config_bytes(table, choose(mid)) > budget else (lo, mid)
    return choose(hi)


def _generation(fitness: KLFitness, table: LevelTable, settings: SearchSettings, state: SearchState,
                rng: random.Random, order) -> None:
    n = len(fitness.windows)
    first = rng.randrange(n)
    more = rng.sample(range(n), min(settings.windows, n))
    children = [_mutate(table, state.parent, settings.budget_bytes, rng, order) for _ in range(settings.offspring)]
    scored = sorted(((fitness(c, [first]), i) for i, c in enumerate(children)))
    finalists = [children[i] for _, i in scored[: settings.survivors]]
    parent_kl = fitness(state.parent, more)
    best_kl, best = min(((fitness(c, more), i) for i, c in enumerate(finalists)), key=lambda t: t[0])
    improved = best_kl < parent_kl
    if improved:
        state.parent = finalists[best]
    state.parent_kl = min(best_kl, parent_kl)
    state.history.append({"generation": state.generation, "kl": state.parent_kl, "improved": improved,
                          "bytes": config_bytes(table, state.parent)})
    state.generation += 1


def _mutate(table: LevelTable, parent: dict[str, str], budget: int, rng: random.Random, order) -> dict[str, str]:
    """A few units one level up, then random units one level down until the budget holds."""
    names = [lv.name for lv in order]
    child = dict(parent)
    for unit in rng.sample(table.units, min(len(table.units), rng.randint(1, 3))):
        rank = names.index(child[unit])
        if rank + 1 < len(names):
            child[unit] = names[rank + 1]
    units = list(table.units)
    while config_bytes(table, child) > budget:
        unit = rng.choice(units)
        rank = names.index(child[unit])
        if rank > 0:
            child[unit] = names[rank - 1]
    return child


def _resume(path: Path | None, settings: SearchSettings) -> SearchState:
    wanted = asdict(settings)
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        same = {k: v for k, v in saved["settings"].items() if k != "generations"} == {k: v for k, v in wanted.items() if k != "generations"}
        if same:  # more generations than before: go on from where it stopped
            return SearchState(**{**saved, "settings": wanted})
    return SearchState(settings=wanted)


def _tuples(value):
    """JSON turned random.getstate()'s tuples into lists: back to tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@torch.no_grad()
def error_energy(table: LevelTable, hessians: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``tr(dW H dW^T)`` per level and unit: the layer's own output error energy on calibration
    inputs (float32: a proxy, and 2-3x faster than float64 on 210 layers x 5 levels)."""
    energies: dict[str, dict[str, float]] = {}
    for level in table.levels:
        energies[level.name] = {}
        for unit in table.units:
            delta = table.weights[level.name][unit] - table.float_weights[unit].to(torch.float32)
            energies[level.name][unit] = float(((delta @ hessians[unit]) * delta).sum()) if level.format != "float" else 0.0
    return energies
