"""lqc auto on a tiny Llama: a constructed case with one very sensitive linear, whose optimum under
the budget is known (that linear int8, every other int4), is found; the search is deterministic
and resumes from its state file to the same answer; the recipe it writes compiles to the bytes
and (on held-out windows) the KL it was chosen for; bad budgets and levels are named."""

from __future__ import annotations

import copy

import pytest
import torch

from lqc.auto import auto_recipe, parse_level
from lqc.auto.fitness import KLFitness
from lqc.auto.levels import build_levels
from lqc.auto.search import SearchSettings, config_bytes, error_energy, search
from lqc.ir import LqcConfigError
from lqc.passes import Calibration

SENSITIVE = "model.layers.1.mlp.down_proj"
LEVELS = [parse_level("int4-g32"), parse_level("int8")]


@pytest.fixture(scope="module")
def sensitive_llama():
    """tiny-llama with one linear whose groups of 32 each hold a huge weight on a neuron that never
    fires (its up_proj row is zero): the output is unchanged, but int4's 16 levels per group flatten
    the other weights, and int8's 255 per row keep them. The final norm is scaled so the random
    model's next-token distributions are peaked enough for KLs to tell layers apart."""
    import lqc

    model = lqc.models.load("tiny-llama").model.eval()
    with torch.no_grad():
        weight = model.get_submodule(SENSITIVE).weight
        weight[:, ::32] = 80.0 * weight.abs().max()
        model.get_submodule(SENSITIVE.replace("down_proj", "up_proj")).weight[::32] = 0.0
        weight *= 3.0
        model.model.norm.weight *= 30.0
    return model


@pytest.fixture(scope="module")
def calibration():
    return Calibration([torch.randint(0, 256, (64 * 12,), generator=torch.Generator().manual_seed(7))])


@pytest.fixture(scope="module")
def pieces(sensitive_llama, calibration):
    windows = calibration.windows(1, 64, 8)
    table = build_levels(sensitive_llama, windows[0], calibration, LEVELS, method="rtn", progress=False)
    hessians = {u: torch.eye(table.float_weights[u].shape[1]) for u in table.units}  # plain Frobenius energy
    return windows, table, error_energy(table, hessians)


def _settings(table, generations: int) -> SearchSettings:
    int4 = config_bytes(table, dict.fromkeys(table.units, "int4-g32"))
    upgrade = table.nbytes["int8"][SENSITIVE] - table.nbytes["int4-g32"][SENSITIVE]
    return SearchSettings(budget_bytes=int4 + upgrade, generations=generations, offspring=4, windows=2, seed=3)


def test_the_known_optimum_is_found_within_the_budget(sensitive_llama, pieces):
    windows, table, energy = pieces
    fitness = KLFitness(sensitive_llama, windows, table)
    settings = _settings(table, generations=4)
    state = search(fitness, table, settings, energy, progress=False)
    assert state.parent[SENSITIVE] == "int8"
    assert config_bytes(table, state.parent) <= settings.budget_bytes
    all_int4 = fitness(dict.fromkeys(table.units, "int4-g32"), range(3))
    assert fitness(state.parent, range(3)) < 0.5 * all_int4
    assert max(state.sensitivity, key=state.sensitivity.get) == SENSITIVE


def test_search_is_deterministic_and_resumes_to_the_same_answer(sensitive_llama, pieces, tmp_path):
    windows, table, energy = pieces
    # a budget below the optimum's: the evolution has real choices to make
    settings = _settings(table, generations=6)
    settings.budget_bytes -= table.nbytes["int8"][SENSITIVE] // 3
    fresh = search(KLFitness(sensitive_llama, windows, table), table, settings, energy, progress=False)
    state_path = tmp_path / "state.json"
    first = copy.copy(settings)
    first.generations = 3
    search(KLFitness(sensitive_llama, windows, table), table, first, energy, state_path, progress=False)
    fitness = KLFitness(sensitive_llama, windows, table)
    resumed = search(fitness, table, settings, energy, state_path, progress=False)
    assert resumed.parent == fresh.parent and resumed.history == fresh.history
    assert fitness.forwards < 4 * 6 * 4  # the first three generations (and the sensitivities) were not redone


def test_recipe_compiles_to_what_was_searched(sensitive_llama, calibration):
    result = auto_recipe(sensitive_llama, calibration, size=0.45, levels=("int4-g32", "int8", "float"), method="rtn",
                         window_length=64, windows=6, held_out=2, generations=3, offspring=3, progress=False)
    targets = {t for e in result.recipe["passes"] if e["pass"] == "quantize" for t in e.get("targets", [])}
    assert all(f"^{SENSITIVE.replace('.', chr(92) + '.')}$" not in e.get("targets", [])
               for e in result.recipe["passes"] if e.get("format") == "int4")
    assert len(targets) >= 3
    assert result.bytes <= result.budget_bytes
    assert result.verified["bytes"] == pytest.approx(result.bytes, rel=0.02)  # the search's byte count is the graph's
    assert result.verified["kl"] < 3 * result.search_kl + 1e-3


def test_bad_budgets_and_levels_are_named(sensitive_llama, calibration):
    with pytest.raises(LqcConfigError, match="unknown compression level 'int3'"):
        parse_level("int3")
    with pytest.raises(LqcConfigError, match="size is 2"):
        auto_recipe(sensitive_llama, calibration, size=2)
    with pytest.raises(LqcConfigError, match="one budget"):
        auto_recipe(sensitive_llama, calibration, size=0.3, max_ppl_increase=0.01)
    with pytest.raises(LqcConfigError, match="needs calibration data"):
        auto_recipe(sensitive_llama, None, size=0.3)
    with pytest.raises(LqcConfigError, match="below what the cheapest level"):
        auto_recipe(sensitive_llama, calibration, size=0.01, levels=("int8",), method="rtn", window_length=64, windows=4,
                    held_out=2, verify=False, progress=False)


def test_cli_level_table_has_a_row_per_block():
    from lqc.cli_auto import level_table

    config = {f"model.layers.{i}.{part}": level for i in range(2)
              for part, level in (("self_attn.q_proj", "int8"), ("mlp.down_proj", "int4-g64+eora16"))}
    lines = level_table(config).splitlines()
    assert lines[0].split() == ["block", "q_proj", "down_proj"]
    assert [line.split() for line in lines[1:]] == [["0", "int8", "int4-g64+eora16"], ["1", "int8", "int4-g64+eora16"]]


def test_a_perplexity_bound_gives_the_smallest_size_within_it(sensitive_llama, calibration):
    """max_ppl_increase: the probes bisect the size; the chosen one keeps the calibration perplexity
    within the bound, and a smaller probe that broke it is smaller than the choice."""
    result = auto_recipe(sensitive_llama, calibration, max_ppl_increase=0.02, levels=("int4-g32", "int8"), method="rtn",
                         window_length=64, windows=6, held_out=2, generations=2, offspring=3, verify=False, progress=False)
    assert len(result.probes) == 5
    passed = [p["size"] for p in result.probes if p["calibration_ppl"] <= p["limit"]]
    failed = [p["size"] for p in result.probes if p["calibration_ppl"] > p["limit"]]
    assert passed and result.budget_bytes == int(min(passed) * result.float_bytes)
    assert all(size < min(passed) for size in failed)
    assert result.bytes <= result.budget_bytes


def test_heat_map_colors_each_cell_by_its_levels_bytes():
    from lqc.cli_auto import level_heatmap

    config = {"model.layers.0.self_attn.q_proj": "int4-g64", "model.layers.0.mlp.down_proj": "int8"}
    page = level_heatmap(config, ["int4-g64", "int8"], "t")
    assert page.count("<tr>") == 2 and "hsl(210,60%,90%)" in page and "hsl(210,60%,30%)" in page


def test_cli_writes_the_recipe_table_heat_map_and_record(sensitive_llama, calibration, tmp_path, monkeypatch, capsys):
    """`lqc auto` end to end on the tiny model (the loader and the calibration text patched to it)."""
    import json

    import yaml

    import lqc
    import lqc.auto
    from lqc.cli import main

    real = lqc.auto.auto_recipe
    monkeypatch.setattr(lqc.models, "load", lambda name, *a, **k: lqc.models.LoadedModel(sensitive_llama, None, name))
    monkeypatch.setattr(lqc.auto, "auto_recipe", lambda model, _calibration, **options: real(
        model, calibration, **{**options, "window_length": 64, "windows": 4, "held_out": 2, "method": "rtn",
                               "offspring": 3, "progress": False}))
    out = tmp_path / "auto.yaml"
    assert main(["auto", "--model", "tiny-llama", "--size", "0.45", "--levels", "int4-g32", "int8", "--generations", "2",
                 "-o", str(out)]) == 0
    recipe = yaml.safe_load(out.read_text())
    assert [e["pass"] for e in recipe["passes"]][0] == "cleanup" and any(e.get("targets") for e in recipe["passes"])
    assert "<table>" in out.with_suffix(".html").read_text()
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["bytes"] <= 0.45 * record["float_bytes"] and record["verified"]["windows"] == 2
    printed = capsys.readouterr().out
    assert "block" in printed and "compiled recipe:" in printed and out.with_suffix(".state.json").is_file()
