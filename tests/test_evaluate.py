"""The evaluation harness: perplexity follows the protocol, agreement counts tokens."""

from __future__ import annotations

import math

import pytest
import torch

from lqc.evaluate import agreement, eval_prompts, perplexity
from lqc.data import bos_token, calibration_from, windows
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


def test_a_bos_goes_before_every_window_and_is_not_scored():
    """Gemma's windows start with BOS: the logits function sees it first, the scored tokens and
    their logits are the window's own (the same count as without it)."""
    vocab, length, bos = 7, 8, 6
    ids = torch.arange(2 * length) % 5
    seen = []

    def logits_fn(window):
        seen.append(window)
        return torch.nn.functional.one_hot(window, vocab).float()  # depends on the token only

    plain = perplexity(logits_fn, ids, window_length=length, max_windows=None, progress=False)
    with_bos = perplexity(logits_fn, ids, window_length=length, max_windows=None, progress=False, bos=bos)
    assert [w[0, 0].item() for w in seen[2:]] == [bos, bos] and seen[2].shape == (1, length + 1)
    assert torch.equal(seen[2][:, 1:], seen[0])
    assert with_bos.scored_tokens == plain.scored_tokens and with_bos.perplexity == pytest.approx(plain.perplexity)
    prompts = eval_prompts(torch.arange(2000), 2, length=10, bos=bos)
    assert [p[0, :2].tolist() for p in prompts] == [[bos, 0], [bos, 512]] and prompts[0].shape == (1, 11)


def test_calibration_windows_start_with_the_tokenizers_bos():
    class Tokenizer:  # adds BOS (1) before every text, as Gemma's does
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            ids = [10 + (ord(c) % 50) for c in text]
            return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    assert bos_token(Tokenizer()) == 1
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    cal = calibration_from([text], Tokenizer())
    rows = cal.windows(2, 8, 3)
    assert len(rows) == 3 and rows[0].shape == (2, 8)
    stream = torch.cat([r[:, 1:].flatten() for r in rows])
    assert (torch.stack(rows)[..., 0] == 1).all() and torch.equal(stream, cal.sequences[0][: len(stream)])
    assert cal.digest != calibration_from([text], lambda t, add_special_tokens=True: Tokenizer()(t, False)).digest


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
