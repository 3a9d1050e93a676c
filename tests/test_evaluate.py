"""The evaluation harness: perplexity follows the protocol, agreement counts tokens."""

from __future__ import annotations

import math

import pytest
import torch

from lqc.evaluate import agreement, eval_prompts, perplexity
from lqc.data import calibration_from, windows
from lqc.ir import LqcConfigError


def test_perplexity_scores_every_token_but_the_first_of_each_window():
    vocab, length = 7, 8
    ids = torch.arange(3 * length + 5) % vocab
    logits_table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def logits_fn(window):  # a bigram model: the logits depend on the current token
        return logits_table[window]

    result = perplexity(logits_fn, ids, window_length=length, max_windows=None, progress=False)
    assert result.windows == 3 and result.scored_tokens == 3 * (length - 1)
    nll = 0.0
    for w in windows(ids, length):
        logp = torch.log_softmax(logits_table[w[:-1]].double(), -1)
        nll -= logp.gather(-1, w[1:, None]).sum().item()
    assert result.perplexity == pytest.approx(math.exp(nll / result.scored_tokens), rel=1e-6)  # float32 logsumexp


def test_agreement():
    ref = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])]
    cand = [torch.tensor([1, 2, 0, 4]), torch.tensor([5, 6, 7, 8])]
    result = agreement(ref, cand)
    assert result.agreement == 7 / 8 and result.first_divergence == [2, -1]


def test_prompts_come_from_distinct_windows():
    ids = torch.arange(2000)
    prompts = eval_prompts(ids, 3, length=10)
    assert [p[0, 0].item() for p in prompts] == [0, 512, 1024] and all(p.shape == (1, 10) for p in prompts)


def test_calibration_input_errors():
    with pytest.raises(LqcConfigError, match="needs a tokenizer"):
        calibration_from(["some text"])
    with pytest.raises(LqcConfigError, match="calibration must be"):
        calibration_from(3.5)
    with pytest.raises(LqcConfigError, match="does not exist"):
        calibration_from("no/such/file.txt", tokenizer=lambda *a, **k: {"input_ids": []})
    cal = calibration_from(torch.arange(100))
    with pytest.raises(LqcConfigError, match="fewer than one window of 512.*give more calibration text"):
        cal.windows(1, 512)


def test_models_load_a_local_hf_directory(tmp_path):
    import lqc.models

    tiny = lqc.models.load("tiny-llama")
    tiny.model.save_pretrained(tmp_path)
    loaded = lqc.models.load(str(tmp_path))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, tiny.model(ids).logits)
    assert loaded.tokenizer is None and loaded.name == tmp_path.name
    with pytest.raises(LqcConfigError, match="cannot load 'no-such-model'"):
        lqc.models.load("no-such-model")
