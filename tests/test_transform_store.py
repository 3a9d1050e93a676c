"""Weight transforms on disk (LQC_CACHE_DIR): a new process reuses them, a changed weight or
recipe misses, a damaged file is recomputed."""

from __future__ import annotations

import torch

import lqc
from lqc.passes import DEFAULT_CACHE
from lqc.passes.transform_store import TransformStore

RECIPE = [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 32, "method": "hqq", "hqq_iters": 2}]


def _compressed_logits(model, ids, recipe=RECIPE):
    DEFAULT_CACHE.clear()  # what a new process starts with
    torch._dynamo.reset()
    with torch.no_grad():
        return lqc.compress(model, recipe, example_inputs=ids, progress=False)(ids).logits


def _files(folder):
    return sorted(folder.rglob("*.pt"))


def test_a_new_process_reads_transforms_from_disk(tiny_llama, token_ids, tmp_path, monkeypatch):
    monkeypatch.setenv("LQC_CACHE_DIR", str(tmp_path))
    first = _compressed_logits(tiny_llama, token_ids)
    files = _files(tmp_path)
    assert len(files) == 28  # 7 linears x 2 blocks: each quantized, and packed for the CPU (pack_cpu_layouts)
    loads = []
    original = TransformStore.get_or_compute
    monkeypatch.setattr(TransformStore, "get_or_compute",
                        lambda self, key, compute: loads.append(key) or original(self, key, lambda: pytest_fail(key)))
    second = _compressed_logits(tiny_llama, token_ids)
    assert len(loads) == 28 and torch.equal(first, second)  # every weight from disk, none recomputed


def pytest_fail(key):
    raise AssertionError(f"transform {key} was recomputed instead of read from disk")


def test_changed_weight_or_options_miss(tiny_llama, token_ids, tmp_path, monkeypatch):
    monkeypatch.setenv("LQC_CACHE_DIR", str(tmp_path))
    _compressed_logits(tiny_llama, token_ids)
    assert len(_files(tmp_path)) == 28
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight.mul_(2)
    _compressed_logits(tiny_llama, token_ids)
    # every layer depends on the model's weights as a whole (calibrated transforms see them all)
    assert len(_files(tmp_path)) == 56
    _compressed_logits(tiny_llama, token_ids, [RECIPE[0], {**RECIPE[1], "hqq_iters": 3}])
    assert len(_files(tmp_path)) == 84  # new quantized weights, and their packed layouts


def test_damaged_file_is_recomputed(tiny_llama, token_ids, tmp_path, monkeypatch):
    monkeypatch.setenv("LQC_CACHE_DIR", str(tmp_path))
    first = _compressed_logits(tiny_llama, token_ids)
    for path in _files(tmp_path):
        path.write_bytes(b"not a torch file")
    assert torch.equal(_compressed_logits(tiny_llama, token_ids), first)
