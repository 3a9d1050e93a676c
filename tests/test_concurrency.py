"""Concurrency and load: compiling and running from two threads, many sequence lengths on one
compiled model, and in-place weight updates seen from two threads."""

from __future__ import annotations

import copy
import logging
import threading

import pytest
import torch

import lqc
from lqc.passes import DEFAULT_CACHE

BLOCK_LINEARS = 14  # tiny-llama: 7 per block, 2 blocks; int8 leaves the lm_head alone


def _ids(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def _compile(model, recipe: str, **kwargs):
    return torch.compile(model, backend="lqc", options={"recipe": recipe, "target": "eager", "progress": False}, **kwargs)


def _in_threads(*jobs):
    """Run each job in its own thread, all released at once; their results, or the first error raised."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def run(i, job):
        try:
            barrier.wait()
            with torch.no_grad():  # grad mode is per thread
                results[i] = job()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]
    return results


def _run_lengths(compiled, lengths):
    return [compiled(_ids(n, seed=n)).logits for n in lengths]


def test_two_threads_compile_and_run_different_recipes(tiny_llama):
    lengths = [5, 9, 12]
    models = {recipe: copy.deepcopy(tiny_llama) for recipe in ("int8", "exact")}
    # Single-threaded first, on copies of their own (new tensors: the threads' compiles find nothing
    # in the transform cache and quantize again, concurrently).
    with torch.no_grad():
        expected = {recipe: _run_lengths(_compile(copy.deepcopy(tiny_llama), recipe), lengths) for recipe in models}
    torch._dynamo.reset()
    compiled = {recipe: _compile(model, recipe) for recipe, model in models.items()}
    int8, exact = _in_threads(lambda: _run_lengths(compiled["int8"], lengths), lambda: _run_lengths(compiled["exact"], lengths))
    for recipe, outputs in (("int8", int8), ("exact", exact)):
        for out, ref in zip(outputs, expected[recipe]):
            torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=f"{recipe} differs from its single-threaded run")
    with torch.no_grad():  # and the two recipes really differ: int8 is not the float model
        assert not torch.equal(int8[0], tiny_llama(_ids(lengths[0], seed=lengths[0])).logits)
    for recipe in models:
        session = lqc.session_of(compiled[recipe])
        assert session.options.recipe == recipe and not any(c.fallback for c in session.compilations)


def test_fifty_sequence_lengths_reuse_the_transform_cache(tiny_llama):
    compiled = _compile(tiny_llama, "int8")
    computed_before, entries_before = DEFAULT_CACHE.computed["quantize"], len(DEFAULT_CACHE)
    with torch.no_grad():
        for length in range(1, 51):
            out = compiled(_ids(length, seed=length)).logits
            assert out.shape == (1, length, 256)
            if length == 2:
                entries_after_two = len(DEFAULT_CACHE)
    session = lqc.session_of(compiled)
    # a static graph for the first length, then one dynamic in the sequence length for all others
    assert len(session.compilations) <= 3, [c.name for c in session.compilations]
    assert not any(c.fallback for c in session.compilations)
    # every weight quantized once, whatever the number of graphs and lengths: nothing recompressed
    assert DEFAULT_CACHE.computed["quantize"] - computed_before == BLOCK_LINEARS
    # per weight: its quantized form and its packed CPU layout (the pack_cpu_layouts lowering)
    assert len(DEFAULT_CACHE) - entries_before <= 2 * BLOCK_LINEARS and len(DEFAULT_CACHE) == entries_after_two
    with torch.no_grad():  # the dynamic graph is still the compressed model, not the float one
        ids = _ids(37, seed=37)
        rel = (compiled(ids).logits - tiny_llama(ids).logits).norm() / tiny_llama(ids).logits.norm()
    assert 0 < rel < 0.05


def test_recompile_limit_is_respected_and_named(tiny_llama, caplog):
    # dynamic=False: one graph per length, until dynamo's limit; then dynamo runs the model eagerly
    limit = 4
    compiled = _compile(tiny_llama, "int8", dynamic=False)
    dynamo_log = logging.getLogger("torch._dynamo")  # dynamo's loggers do not propagate to the root
    dynamo_log.addHandler(caplog.handler)
    try:
        with torch._dynamo.config.patch(recompile_limit=limit), torch.no_grad(), caplog.at_level(logging.WARNING):
            for length in range(1, limit + 4):
                out = compiled(_ids(length, seed=length)).logits
                torch.testing.assert_close(out, tiny_llama(_ids(length, seed=length)).logits, rtol=0.05, atol=0.05)
    finally:
        dynamo_log.removeHandler(caplog.handler)
    assert len(lqc.session_of(compiled).compilations) == limit
    # dynamo's own warning names the limit (lqc adds none: past it, the model runs uncompressed)
    messages = [r.getMessage() for r in caplog.records if f"hit config.recompile_limit ({limit})" in r.getMessage()]
    assert len(messages) == 1, [r.getMessage() for r in caplog.records]


def test_in_place_updates_in_two_threads_are_recompressed(tiny_llama):
    """Two threads, each with its own compiled copy, update a weight in place and call again."""
    ids = _ids(8)
    models = [copy.deepcopy(tiny_llama) for _ in range(2)]
    compiled = [_compile(m, "int8") for m in models]

    def update_and_run(i):
        compiled[i](ids)
        models[i].model.layers[i].mlp.down_proj.weight.mul_(3.0)  # dynamo will not recompile for this
        return compiled[i](ids).logits

    with pytest.warns(UserWarning, match="changed after compilation"):
        outputs = _in_threads(lambda: update_and_run(0), lambda: update_and_run(1))
    for i, out in enumerate(outputs):
        torch._dynamo.reset()
        with torch.no_grad():  # the updated weights, compiled from scratch, single-threaded
            expected = _compile(copy.deepcopy(models[i]), "int8")(ids).logits
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_in_place_update_seen_by_two_threads_on_one_model(tiny_llama):
    ids = _ids(8)
    compiled = _compile(tiny_llama, "int8")
    with torch.no_grad():
        compiled(ids)
        tiny_llama.model.layers[0].mlp.down_proj.weight.mul_(3.0)
        fresh = copy.deepcopy(tiny_llama)
    computed_before = DEFAULT_CACHE.computed["quantize"]
    with pytest.warns(UserWarning, match="changed after compilation"):
        outputs = _in_threads(lambda: compiled(ids).logits, lambda: compiled(ids).logits)
    # the changed weight is quantized again once, not once per thread (the others come from the cache)
    assert DEFAULT_CACHE.computed["quantize"] - computed_before == 1
    torch._dynamo.reset()
    with torch.no_grad():
        expected = _compile(fresh, "int8")(ids).logits
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
