"""Named recipes compose in stage order ("moe+int8"), or fail with an error naming the conflict."""

from __future__ import annotations

import itertools

import pytest
import torch

import lqc
from lqc.ir.errors import LqcConfigError
from lqc.recipes import STAGES, named_recipes, resolve_recipe

STAGE_OF = {name: i for i, names in enumerate(STAGES.values()) for name in names}
# Compiled on the tiny Llama: one composable pair for each pair of stages that meet (the other
# pairs differ only in a stage's options; calibrated int4/int8/w8a8 methods take minutes here).
RUN = [("moe", "int8"), ("moe", "kv-int4"), ("moe", "reparam"), ("reparam", "int4"), ("reparam", "kv-int4"),
       ("default", "kv-int4"), ("moe-int8", "kv-int4"), ("max", "reparam"), ("max", "moe"), ("max", "kv-int8")]


def _pairs():
    return list(itertools.combinations(named_recipes(), 2))


def test_every_pair_composes_in_stage_order_or_names_the_conflict():
    composed = conflicts = 0
    for a, b in _pairs():
        try:
            passes = resolve_recipe(f"{a}+{b}")["passes"]
        except LqcConfigError as exc:
            conflicts += 1
            message = str(exc)
            assert f"'{a}'" in message and f"'{b}'" in message, message
            assert any(f"'{p}'" in message for p in ("quantize", "compress_kv", "ffn_to_moe", "route_neurons", "drop_layers")), message
            continue
        composed += 1
        stages = [STAGE_OF[entry["pass"]] for entry in passes]
        assert stages == sorted(stages), (a, b, passes)
        lqc.passes.load_recipe(passes)  # every entry a valid pass with valid options
    assert composed > 40 and conflicts > 30  # 105 pairs of 15 recipes


def test_composition_orders_by_stage_and_runs_shared_passes_once():
    passes = resolve_recipe(["int8", "moe"])["passes"]
    assert [p["pass"] for p in passes] == ["cleanup", "route_neurons", "quantize"]
    assert resolve_recipe("reparam+kv-int4")["passes"][-1]["pass"] == "compress_kv"
    with pytest.raises(LqcConfigError, match="'int8' and 'int4' conflict: both run 'quantize' on the same layers"):
        resolve_recipe("int8+int4")
    with pytest.raises(LqcConfigError, match="no named recipe 'int3'"):
        resolve_recipe("int8+int3")


@pytest.mark.slow
@pytest.mark.parametrize("a, b", RUN)
def test_composed_recipes_run_on_tiny_llama(tiny_llama, a, b):
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    calibration = [torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        compressed = lqc.compress(tiny_llama, f"{a}+{b}", calibration=calibration, example_inputs=ids, progress=False)
        logits = compressed(ids).logits
    assert torch.isfinite(logits).all()
    reports = lqc.session_of(compressed).reports
    assert reports and not any(r.fallback for r in reports), [r.fallback for r in reports]
    ran = [r.name for r in reports[-1].records if r.stage == "recipe"]
    assert ran == [e["pass"] for e in resolve_recipe(f"{a}+{b}")["passes"]]
