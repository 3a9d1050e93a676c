"""Inputs checked at the boundary (issue 29, item 2): every bad input to ``lqc.compress``, the
backend's first call, ``lqc.generate`` and a compiled graph's later calls is a clear
LqcConfigError that names the fix, raised before anything compiles (or, for a graph traced with
autograd on, the documented fallback with a warning), never an error from deep inside torch or
generated code. Good inputs still run and match eager.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lqc
from lqc.bench import make_runner
from lqc.ir.errors import LqcConfigError


def _compress(model, ids, **kwargs):
    return lqc.compress(model, "exact", example_inputs=ids, progress=False, **kwargs)


# -- lqc.compress: example token ids ---------------------------------------------------------------

BAD_EXAMPLE_IDS = {
    "empty sequence": (lambda: torch.zeros(1, 0, dtype=torch.long), "at least one token.*BOS"),
    "float ids": (lambda: torch.rand(1, 8), r"must be integers.*ids\.long\(\)"),
    "bool ids": (lambda: torch.ones(1, 8, dtype=torch.bool), r"must be integers"),
    "ids >= vocab size": (lambda: torch.full((1, 8), 256), r"\[0, 256\).*own tokenizer.*below 256"),
    "negative ids": (lambda: torch.tensor([[5, -1, 7]]), r"from -1 to 7.*below 256"),
    "1-D ids": (lambda: torch.arange(8), r"\[batch, tokens\].*ids\[None\]"),
    "3-D ids": (lambda: torch.zeros(1, 2, 4, dtype=torch.long), r"\[batch, tokens\].*reshape"),
    "a list, not a tensor": (lambda: [1, 2, 3], r"torch\.Tensor.*return_tensors='pt'"),
    "longer than the positions": (lambda: torch.zeros(1, 257, dtype=torch.long), r"257 tokens exceed.*256 positions.*ids\[:, :256\]"),
    "ids on another device": (lambda: torch.zeros(1, 8, dtype=torch.long, device="meta"), r"on meta.*ids\.to\('cpu'\)"),
}


@pytest.mark.parametrize("case", list(BAD_EXAMPLE_IDS))
def test_compress_refuses_bad_example_ids_before_compiling(tiny_llama, case, monkeypatch):
    make, fix = BAD_EXAMPLE_IDS[case]
    compiled = []
    monkeypatch.setattr(lqc.Session, "compile", lambda *a, **k: compiled.append(1))
    with pytest.raises(LqcConfigError, match=fix):
        _compress(tiny_llama, make())
    assert not compiled  # refused before dynamo or any pass ran


# -- lqc.compress: the model ------------------------------------------------------------------------

def test_compress_refuses_a_model_on_the_meta_device(tiny_llama, token_ids):
    with torch.device("meta"):
        empty = type(tiny_llama)(tiny_llama.config).eval()
    with pytest.raises(LqcConfigError, match=r"meta device.*never loaded.*Load real weights"):
        _compress(empty, token_ids)


def test_compress_refuses_weights_in_a_dtype_it_does_not_compress(tiny_llama, token_ids):
    with pytest.raises(LqcConfigError, match=r"float8_e4m3fn.*model\.to\(torch\.bfloat16\)"):
        _compress(tiny_llama.to(torch.float8_e4m3fn), token_ids)


def test_compress_refuses_a_model_spread_over_devices(tiny_llama, token_ids, monkeypatch):
    # two real devices are not on a CPU-only machine: report a second device for one weight
    first = next(tiny_llama.parameters())
    named = type(tiny_llama).named_parameters

    class OnCuda(torch.Tensor):
        device = torch.device("cuda", 0)

    def spread(self, *args, **kwargs):
        for name, tensor in named(self, *args, **kwargs):
            yield name, (tensor.as_subclass(OnCuda) if tensor is first else tensor)

    monkeypatch.setattr(type(tiny_llama), "named_parameters", spread)
    with pytest.raises(LqcConfigError, match=r"spread over cpu, cuda:0.*one device.*model\.to"):
        _compress(tiny_llama, token_ids)


def test_compress_refuses_a_model_in_training_mode(tiny_llama, token_ids):
    with pytest.raises(LqcConfigError, match=r"training mode.*model\.eval\(\)"):
        _compress(tiny_llama.train(), token_ids)


def test_compress_refuses_what_is_not_a_module(token_ids):
    with pytest.raises(LqcConfigError, match=r"torch\.nn\.Module.*torch\.compile\(fn, backend='lqc'\)"):
        _compress(lambda ids: ids, token_ids)


def test_compress_on_good_ids_matches_eager(tiny_llama, token_ids):
    compressed = _compress(tiny_llama, token_ids)
    with torch.no_grad():
        torch.testing.assert_close(compressed(token_ids).logits, tiny_llama(token_ids).logits, rtol=0, atol=1e-5)


def test_an_image_model_takes_pixel_values_unchecked():
    """Token-id checks apply to models with an input embedding; an image model's float input passes."""
    model = lqc.models.load("tiny-resnet").model
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    compressed = lqc.compress(model, "exact", example_inputs=pixels, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(compressed(pixels).logits, model(pixels).logits, rtol=1e-4, atol=1e-4)


# -- the backend: first call and later calls -------------------------------------------------------

def test_the_backends_first_call_refuses_ids_outside_the_vocabulary(tiny_llama):
    session = lqc.Session(recipe="exact", target="eager", progress=False)
    compiled = torch.compile(tiny_llama, backend=session)
    with torch.no_grad(), pytest.raises(Exception) as raised:
        compiled(torch.full((1, 8), 999))
    # dynamo wraps what a backend raises; the cause is lqc's, and says what to do
    inner = getattr(raised.value, "inner_exception", raised.value)
    assert isinstance(inner, LqcConfigError) and "own tokenizer" in str(inner) and "999" in str(inner)
    assert not session.compilations  # refused before any pass ran


def test_the_backend_falls_back_with_a_warning_for_a_graph_traced_with_autograd(tiny_llama, token_ids):
    compiled = torch.compile(tiny_llama, backend=lqc.Session(recipe="exact", target="eager", progress=False))
    with pytest.warns(UserWarning, match=r"falls back to Inductor.*torch\.no_grad\(\)"):
        compiled(token_ids)


def _static_decode(variant: str, model, prompt, bad_token: int):
    """Prefill, one good decode step (compiles the decode graph), then a step fed ``bad_token``."""
    runner = make_runner(model, variant, recipe="exact", target="eager")
    cache = runner.new_cache(prompt.shape[1] + 4)
    with torch.no_grad():
        runner.forward(input_ids=prompt, cache=cache, use_cache=True)
        step = dict(cache=cache, use_cache=True)
        runner.forward(input_ids=torch.tensor([[3]]), position_ids=torch.tensor([[prompt.shape[1]]]), **step)
        graphs = len(runner.session.compilations)
        try:
            runner.forward(input_ids=torch.tensor([[bad_token]]), position_ids=torch.tensor([[prompt.shape[1] + 1]]), **step)
        finally:
            assert len(runner.session.compilations) == graphs  # the compiled decode graph ran: no recompile


def test_a_decode_step_with_an_id_outside_the_vocabulary_is_refused_by_the_compiled_graph(tiny_llama, token_ids):
    with pytest.raises(LqcConfigError, match=r"lqc \(graph1\).*\[0, 256\).*got ids from 256 to 256.*own tokenizer"):
        _static_decode("lqc", tiny_llama, token_ids, 256)


def test_check_inputs_false_skips_the_per_call_check(tiny_llama, token_ids):
    # the eager target's embedding then fails as torch does: this is what the option turns off
    with pytest.raises(IndexError, match="index out of range"):
        _static_decode("lqc-unchecked", tiny_llama, token_ids, 256)


def test_check_inputs_must_be_a_bool():
    with pytest.raises(LqcConfigError, match="check_inputs must be true or false"):
        lqc.Session(recipe="exact", check_inputs="yes")


def test_checked_decode_matches_eager(tiny_llama, token_ids):
    compiled = torch.compile(tiny_llama, backend=lqc.Session(recipe="exact", target="eager", progress=False))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        out = compiled.generate(token_ids, max_new_tokens=6, do_sample=False, cache_implementation="static")
        assert torch.equal(out, tiny_llama.generate(token_ids, max_new_tokens=6, do_sample=False, cache_implementation="static"))


# -- lqc.generate ------------------------------------------------------------------------------------

BAD_GENERATE = {
    "empty prompt": (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "at least one token"),
    "float prompt": (dict(input_ids=torch.rand(1, 4)), r"must be integers.*ids\.long\(\)"),
    "prompt ids >= vocab size": (dict(input_ids=torch.tensor([[1, 300]])), r"\[0, 256\).*below 256"),
    "1-D prompt": (dict(input_ids=torch.arange(4)), r"ids\[None\]"),
    "prompt plus new tokens beyond the positions": (
        dict(input_ids=torch.zeros(1, 200, dtype=torch.long), max_new_tokens=100),
        r"200 tokens plus 100 new tokens exceed.*256 positions.*smaller max_new_tokens"),
    "mask of another shape": (dict(attention_mask=torch.ones(1, 3)), r"attention_mask must have the shape.*\(1, 4\)"),
    "prefill_chunk 0": (dict(prefill_chunk=0), r"prefill_chunk must be.*>= 1"),
    "negative max_new_tokens": (dict(max_new_tokens=-1), r"max_new_tokens.*>= 0"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_generate_refuses_bad_arguments_before_running_the_model(tiny_llama, case):
    changes, fix = BAD_GENERATE[case]
    args = dict(input_ids=torch.tensor([[1, 2, 3, 4]]), max_new_tokens=4) | changes
    calls = []
    tiny_llama.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(LqcConfigError, match=fix):
        lqc.generate(tiny_llama, args.pop("input_ids"), args.pop("max_new_tokens"), **args)
    assert not calls


def test_generate_refuses_a_model_on_the_meta_device(tiny_llama):
    with torch.device("meta"):
        empty = type(tiny_llama)(tiny_llama.config).eval()
    with pytest.raises(LqcConfigError, match="Load real weights"):
        lqc.generate(empty, torch.tensor([[1, 2]]), 2)


def test_generate_on_a_compressed_model_matches_eager(tiny_llama, token_ids):
    compressed = _compress(tiny_llama, token_ids)
    expected = tiny_llama.generate(token_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(lqc.generate(compressed, token_ids, 6), expected)
