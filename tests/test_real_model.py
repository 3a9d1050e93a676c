"""End-to-end on the real SmolLM2-135M: the backend with an empty recipe is exact, generate()
works with both cache kinds, and the eval harness (quick mode) gives the eager perplexity."""

from __future__ import annotations

import pytest
import torch

import lqc
from lqc.evaluate import QUICK_WINDOWS, causal_lm_logits, perplexity

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def prompt(smollm2):
    return smollm2.tokenizer("The Python language is", return_tensors="pt").input_ids


def test_empty_recipe_logits_match_eager(smollm2, prompt):
    model = smollm2.model
    compiled = torch.compile(model, backend="lqc", options={"recipe": [], "target": "eager"})
    with torch.no_grad():
        diff = (compiled(prompt).logits - model(prompt).logits).abs().max().item()
    assert diff <= 1e-5
    report = lqc.reports()[-1]
    assert not report.fallback and report.capture_bytes > 500e6  # 134.5M float32 weights, frozen


def test_generate_identical_with_dynamic_and_static_cache(smollm2, prompt):
    import copy

    model = smollm2.model
    with torch.no_grad():
        reference = model.generate(prompt, max_new_tokens=20, do_sample=False)
        reference_static = model.generate(prompt, max_new_tokens=20, do_sample=False, cache_implementation="static")
        compiled = copy.copy(model)
        compiled.forward = torch.compile(model.forward, backend="lqc", options={"recipe": "default", "target": "eager"})
        assert torch.equal(compiled.generate(prompt, max_new_tokens=20, do_sample=False), reference)
        assert torch.equal(
            compiled.generate(prompt, max_new_tokens=20, do_sample=False, cache_implementation="static"), reference_static
        )


def test_quick_eval_frozen_graph_perplexity_equals_eager(smollm2, eval_ids):
    model = smollm2.model
    with torch.no_grad():
        eager = perplexity(causal_lm_logits(model), eval_ids, max_windows=QUICK_WINDOWS, progress=False)
        frozen = lqc.compress(model, [], target="eager", example_inputs=eval_ids[:512][None])
        lqc_result = perplexity(causal_lm_logits(frozen), eval_ids, max_windows=QUICK_WINDOWS, progress=False)
    assert eager.scored_tokens == lqc_result.scored_tokens == 16 * 511
    assert lqc_result.perplexity == pytest.approx(eager.perplexity, rel=1e-6)
    assert 10 < eager.perplexity < 40  # SmolLM2-135M on Python's whatsnew prose: ~23
