"""``lqc auto``: the best per-layer compression under a size budget, written as an ordinary recipe.

    result = lqc.auto.auto_recipe(model, "calib", tokenizer=tok, size=0.20)   # 20% of the float32 bytes
    yaml.safe_dump(result.recipe)                                   # rerun with lqc.compress / lqc eval

The budget counts every weight as stored: the searched linears at their levels (EoRA factors
included), the tied embedding and lm_head as int8 rows (``table_int8``), norms in float32. The
search (lqc.auto.search) chooses one level per block linear by the KL divergence of the model's
next-token distribution from the float model's on calibration windows; ``verify`` compiles the
recipe it wrote and measures that KL and the bytes on the compiled model, on windows the search
never scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lqc.auto.fitness import KLFitness
from lqc.auto.levels import DEFAULT_LEVELS, Level, LevelTable, build_levels, parse_level
from lqc.auto.recipe import recipe_from
from lqc.auto.search import SearchSettings, SearchState, config_bytes, error_energy, search
from lqc.ir.errors import LqcConfigError


@dataclass
class AutoResult:
    recipe: dict
    config: dict[str, str]  # module path -> level
    budget_bytes: int  # the whole model's
    bytes: int  # the whole model's, as the search counts them
    float_bytes: int
    search_kl: float  # the fitness of the choice (calibration windows the search scored)
    state: SearchState
    verified: dict = field(default_factory=dict)  # {"kl", "bytes"} of the compiled recipe, held-out windows
    probes: list[dict] = field(default_factory=list)  # max_ppl_increase: the sizes tried, their calibration perplexity
    table_order: list[Level] = field(default_factory=list)  # the levels from the fewest bytes to the most


def auto_recipe(model: torch.nn.Module, calibration, *, size: float | None = None, max_ppl_increase: float | None = None,
                tokenizer=None, levels=DEFAULT_LEVELS, method: str = "gptq", calibration_tokens: int = 8192,
                window_length: int = 512, windows: int = 16, held_out: int = 4, generations: int = 20, offspring: int = 8,
                seed: int = 0, table_int8: bool = True, state_path: str | Path | None = None, verify: bool = True,
                progress: bool = True, sensitivity: dict[str, float] | None = None) -> AutoResult:
    """One level per block linear: the smallest KL with the model storing at most ``size`` x its
    float32 bytes, or (``max_ppl_increase``, a fraction: 0.01 for +1%) the smallest size whose
    perplexity on the calibration windows stays within that bound of the float model's."""
    calibration, parsed, pool = _inputs(calibration, tokenizer, size, max_ppl_increase, levels, window_length, windows, held_out)
    search_windows, check_windows = pool[: len(pool) - held_out], pool[len(pool) - held_out:]
    table = build_levels(model, pool[0], calibration, parsed, method=method, calibration_tokens=calibration_tokens, progress=progress)
    fixed, fixed_bytes, float_bytes = _fixed_weights(model, table, table_int8)
    fitness = KLFitness(model, search_windows, table, fixed)
    # the knapsack's proxy only scales each layer's measured KL between levels: 2,048 tokens do
    energy = error_energy(table, _hessians(model, table, pool[0], calibration, min(calibration_tokens, 2048), progress))
    probes = []
    if max_ppl_increase is not None:
        size, probes, sensitivity = _smallest_size(fitness, table, energy, fixed_bytes, float_bytes, max_ppl_increase,
                                                   SearchSettings(0, max(2, generations // 4), offspring, seed=seed),
                                                   sensitivity, progress)
    budget = int(size * float_bytes)
    settings = SearchSettings(budget_bytes=budget - fixed_bytes, generations=generations, offspring=offspring, seed=seed)
    state = search(fitness, table, settings, energy, Path(state_path) if state_path else None, progress, sensitivity)
    total = fixed_bytes + config_bytes(table, state.parent)
    description = (f"lqc auto: one level per block linear from {', '.join(lv.name for lv in parsed)} (int4 by {method}), "
                   f"searched by KL on calibration text under {size:.3f}x the float32 bytes"
                   f"{f' (the smallest within +{100 * max_ppl_increase:g}% calibration perplexity)' if probes else ''}; "
                   f"{total / float_bytes:.3f}x as counted by the search.")
    recipe = recipe_from(state.parent, parsed, method=method, calibration_tokens=calibration_tokens,
                         table_int8=table_int8, description=description)
    result = AutoResult(recipe, state.parent, budget, total, float_bytes, state.parent_kl, state, probes=probes,
                        table_order=table.ordered())
    if verify:
        result.verified = _verify(model, recipe, calibration, check_windows)
    return result


def _inputs(calibration, tokenizer, size, max_ppl_increase, levels, window_length: int, windows: int, held_out: int):
    """(calibration, levels, windows) checked: one budget, enough calibration text."""
    from lqc.data import calibration_from

    calibration = calibration_from(calibration, tokenizer)
    if calibration is None:
        raise LqcConfigError("lqc auto needs calibration data (its fitness is KL on calibration tokens): pass calibration='calib'")
    if (size is None) == (max_ppl_increase is None):
        raise LqcConfigError("lqc auto takes one budget: size (a fraction of the float32 bytes) or max_ppl_increase")
    if size is not None and not 0 < size <= 1:
        raise LqcConfigError(f"lqc auto: size is {size}; give the budget as a fraction of the float32 bytes in (0, 1], e.g. 0.2")
    if max_ppl_increase is not None and not max_ppl_increase > 0:
        raise LqcConfigError(f"lqc auto: max_ppl_increase is {max_ppl_increase}; give a positive fraction, e.g. 0.01 for +1%")
    parsed = [parse_level(lv) if isinstance(lv, str) else lv for lv in levels]
    pool = calibration.windows(1, window_length, windows + held_out)
    if len(pool) < 2 + held_out:
        raise LqcConfigError(f"lqc auto: the calibration text gives {len(pool)} windows of {window_length} tokens; "
                             f"it needs at least {2 + held_out}")
    return calibration, parsed, pool


def _smallest_size(fitness: KLFitness, table: LevelTable, energy, fixed_bytes: int, float_bytes: int, bound: float,
                   probe: SearchSettings, sensitivity, progress: bool, steps: int = 5):
    """(size, probes, sensitivities): bisection on the size between every linear at the cheapest
    level and every linear at the dearest, each probe a short search whose result's calibration
    perplexity is checked against the float model's times (1 + bound)."""
    order = table.ordered()
    size_of = lambda level: (fixed_bytes + config_bytes(table, dict.fromkeys(table.units, level.name))) / float_bytes  # noqa: E731
    lo, hi = size_of(order[0]), size_of(order[-1])
    windows = range(len(fitness.windows))
    limit = fitness.perplexity({}, windows) * (1 + bound)
    probes = []
    for _ in range(steps):
        mid = (lo + hi) / 2
        probe.budget_bytes = int(mid * float_bytes) - fixed_bytes
        state = search(fitness, table, probe, energy, None, progress, sensitivity)
        sensitivity, ppl = state.sensitivity, fitness.perplexity(state.parent, windows)
        probes.append({"size": mid, "calibration_ppl": ppl, "limit": limit})
        lo, hi = (lo, mid) if ppl <= limit else (mid, hi)
    return hi, probes, sensitivity


def _fixed_weights(model: torch.nn.Module, table: LevelTable, table_int8: bool):
    """(weights every candidate shares by parameter name, their stored bytes plus every other
    non-searched tensor's, the model's float32 bytes): the tied table once."""
    from lqc.bench import model_weight_bytes
    from lqc.runtime.quantization.formats import quantize_int8

    float_bytes = model_weight_bytes(model)
    fixed_bytes = float_bytes - sum(w.nbytes for w in table.float_weights.values())
    fixed: dict[str, torch.Tensor] = {}
    if table_int8:
        tables = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        seen = {}
        for module in tables:
            seen.setdefault(module.weight.untyped_storage().data_ptr(), module.weight)
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        for weight in seen.values():
            q = quantize_int8(weight.detach())
            fixed[names[id(weight)]] = q.dequantize(torch.float32)
            fixed_bytes += q.nbytes() - weight.nbytes
    return fixed, fixed_bytes, float_bytes


def _hessians(model, table: LevelTable, example_ids, calibration, tokens: int, progress: bool) -> dict[str, torch.Tensor]:
    """Each searched linear's input second moment (float32) on calibration tokens."""
    from lqc.ir import trace
    from lqc.ir.linear import linear_sites
    from lqc.passes import PassContext
    from lqc.passes.quantization.activation_stats import collect_input_stats

    graph = trace(model, example_ids, use_cache=False)
    sites = {s.name(graph): s for s in linear_sites(graph)}
    inputs = PassContext(calibration=calibration).calibration_inputs(graph, tokens=tokens)
    stats = collect_input_stats(graph, inputs, [sites[u].x for u in table.units], max_samples=0, progress=progress)
    return {u: stats[sites[u].x.name].mean_hessian.to(torch.float32) for u in table.units}


@torch.no_grad()
def _verify(model, recipe: dict, calibration, windows) -> dict:
    """The recipe compiled by lqc.compress: its stored bytes and KL on ``windows`` (held out)."""
    from lqc.backend import session_of
    from lqc.compress import compress

    compressed = compress(model, recipe["passes"], calibration=calibration, target="eager", progress=False)
    records = [r for r in session_of(compressed).reports[-1].records if r.stage == "recipe"]
    kl = held_out_kl(model, compressed, windows)
    torch._dynamo.reset()
    return {"kl": kl, "bytes": records[-1].bytes_after, "windows": len(windows)}


@torch.no_grad()
def held_out_kl(model: torch.nn.Module, compressed, windows) -> float:
    """Mean KL(p_model || p_compressed) per token over ``windows`` ([1, L] token ids)."""
    import torch.nn.functional as F

    from lqc.passes.structural.drop_choice import kl_per_token

    total = tokens = 0
    for ids in windows:
        part, n = kl_per_token(compressed(ids, use_cache=False).logits, F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1))
        total, tokens = total + part, tokens + n
    return total / tokens


__all__ = ["AutoResult", "DEFAULT_LEVELS", "Level", "auto_recipe", "held_out_kl", "parse_level"]
