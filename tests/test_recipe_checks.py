"""Recipes that do what they say: targets/ignore patterns are valid regexes and each matches a module."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import lqc
from lqc.ir import trace
from lqc.ir.errors import LqcConfigError
from lqc.passes import PassManager, get_pass, load_recipe
from lqc.recipes import named_recipes, resolve_recipe


@pytest.fixture
def graph(tiny_llama, token_ids):
    with torch.no_grad():
        return trace(tiny_llama, token_ids)


@pytest.mark.parametrize("option", ["targets", "ignore"])
def test_invalid_regex_is_a_config_error_naming_pass_and_pattern(option):
    with pytest.raises(LqcConfigError, match=r"pass 'quantize': " + option + r" entry 'mlp\.\(gate' is not a valid "
                       r"regular expression \(missing \), unterminated subpattern.*escape"):
        load_recipe([{"pass": "quantize", option: [r"mlp.(gate"]}])
    with pytest.raises(LqcConfigError, match="pass 'cleanup'.*'\\[a-'"):
        get_pass("cleanup")(**{option: ["[a-"]})


def test_target_matching_nothing_is_an_error_naming_real_paths(graph):
    with pytest.raises(LqcConfigError) as info:
        PassManager([{"pass": "quantize", "targets": [r"\.mpl\."]}]).run(graph)
    message = str(info.value)
    assert "pass 'quantize': targets pattern '\\.mpl\\.' matches no module" in message
    assert "model.layers.0.mlp.gate_proj" in message  # paths that exist, to fix the regex against
    assert "set `strict: false` on this entry" in message


def test_ignore_matching_nothing_is_an_error(graph):
    with pytest.raises(LqcConfigError, match=re.escape(r"pass 'quantize': ignore pattern 'layers\.7\.' matches no module")):
        PassManager([{"pass": "quantize", "targets": ["mlp"], "ignore": [r"layers\.7\."]}]).run(graph)


def test_every_unmatched_pattern_is_named(graph):
    with pytest.raises(LqcConfigError, match="targets pattern 'nope'; targets pattern 'neither' match no module"):
        PassManager([{"pass": "quantize", "targets": ["nope", "mlp", "neither"]}]).run(graph)


def test_ignore_counts_paths_outside_the_targets(graph):
    # ignore is tried on every path looked at, not only on those the targets let through
    record = PassManager([{"pass": "quantize", "targets": [r"layers\.0\."], "ignore": [r"layers\.1\."]}]).run(graph).records[0]
    assert record.matches == 7


def test_pass_with_nothing_to_rewrite_says_so(graph):
    with pytest.raises(LqcConfigError, match="pass 'fold_batchnorm': targets pattern 'conv' matches no module "
                       r"\(it found nothing it could rewrite in this graph\)"):
        PassManager([{"pass": "fold_batchnorm", "targets": ["conv"]}]).run(graph)


def test_strict_false_warns_once_and_runs_the_rest(graph):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = PassManager([{"pass": "quantize", "targets": ["mlp", "embed_tokenz"], "strict": False}]).run(graph).records[0]
    messages = [str(w.message) for w in caught if "matches no module" in str(w.message)]
    assert len(messages) == 1 and "targets pattern 'embed_tokenz'" in messages[0] and "strict: false" in messages[0]
    assert record.matches == 6  # the mlp linears of both blocks: what the other pattern selected


def test_strict_is_an_option_and_out_of_the_cache_key():
    from lqc.passes.recipe import options_digest

    with pytest.raises(LqcConfigError, match="strict must be true or false"):
        load_recipe([{"pass": "quantize", "strict": "no"}])
    strict, lenient = load_recipe([{"pass": "quantize"}, {"pass": "quantize", "strict": False}])
    assert options_digest(strict) == options_digest(lenient)  # it changes no weight


def test_each_graph_of_a_compression_is_checked(tiny_llama, token_ids):
    # compress raises the configuration error itself, not dynamo's wrapper or an Inductor fallback
    with pytest.raises(LqcConfigError, match="targets pattern 'attn_typo' matches no module"):
        lqc.compress(tiny_llama, [{"pass": "quantize", "targets": ["attn_typo"]}], example_inputs=token_ids)


def _patterned_recipes() -> list[str]:
    """The shipped recipes with a targets/ignore pattern: the only ones the check can refuse."""
    return [name for name in named_recipes()
            if any(entry.get("targets") or entry.get("ignore") for entry in resolve_recipe(name)["passes"])]


PATTERNED = ["cpu-fast", "max"]


def test_only_these_recipes_carry_patterns():
    # a new shipped recipe with patterns should join PATTERNED, checked on every family below
    assert sorted(_patterned_recipes()) == PATTERNED


@pytest.mark.parametrize("recipe", PATTERNED)
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gpt2"])
def test_shipped_recipes_with_patterns_compile_on_tiny_models(family, recipe):
    model = lqc.models.load(family).model
    calibration = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compressed = lqc.compress(model, recipe, calibration=calibration, progress=False)
    unmatched = [str(w.message) for w in caught if "matches no module" in str(w.message)]
    records = lqc.session_of(compressed).reports[0].records
    lm_head_pass = [r for r in records if r.name == "quantize"][1]
    if family == "tiny-llama":  # its names are the ones the recipe was written for
        assert unmatched == [] and lm_head_pass.matches == 2  # lm_head and the tied embedding
    else:  # GPT-2's embedding is `wte`: the entry's strict: false makes that a warning
        assert len(unmatched) == 1 and "'embed_tokens$'" in unmatched[0]
        assert lm_head_pass.matches >= 1


def test_pass_changes_summary():
    from lqc.passes.report import GraphReport, PassRecord, format_pass_changes

    def report(name, quantized, fallback=""):
        records = [PassRecord(1, "cleanup", {}, matches=3), PassRecord(2, "quantize", {}, matches=quantized),
                   PassRecord(3, "pack_cpu_layouts", {}, stage="lowering", matches=quantized)]
        return GraphReport(graph=name, records=[] if fallback else records, fallback=fallback)

    text = format_pass_changes([report("graph0", 14), report("graph1", 14), report("graph2", 0, "TypeError: x"),
                                report("graph3", 12)])
    assert text == ("passes on graph0:\n  cleanup: 3 modules changed\n  quantize: 14 modules changed\n"
                    "  pack_cpu_layouts (lowering): 14 modules changed\n"
                    "graph2 fell back to Inductor, uncompressed: TypeError: x\n"
                    "passes on graph3:\n  cleanup: 3 modules changed\n  quantize: 12 modules changed\n"
                    "  pack_cpu_layouts (lowering): 12 modules changed\n")  # graph1 counts as graph0: not repeated
