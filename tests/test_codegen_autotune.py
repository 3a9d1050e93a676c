"""lqc.codegen.autotune: every config it tries computes the same thing, it keeps the fastest, and
its choices come back from memory and from disk without measuring again.

TRITON_INTERPRET=1 is set before lqc's kernels are imported (see test_triton_dequant_gemm.py)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lqc  # noqa: E402
from lqc.codegen import autotune, kernel_cache  # noqa: E402
from lqc.codegen.epilogue import EpilogueProgram, Operand, Step  # noqa: E402
from lqc.codegen.qlinear_kernels import fused_qlinear_impl, kernel_for, launch  # noqa: E402
from lqc.runtime.quantization.qlinear import qlinear_reference  # noqa: E402
from lqc.runtime.quantization.formats import quantize_fp8, quantize_int4  # noqa: E402

RESIDUAL = EpilogueProgram(steps=[Step("add", (Operand("acc"), Operand("tile", 0)))], input_kinds=["tile"])


@pytest.fixture(autouse=True)
def _caches_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("LQC_KERNEL_CACHE", str(tmp_path / "kernels"))
    kernel_cache.forget_loaded()
    autotune.forget_tuned()
    monkeypatch.setattr(autotune, "stats", autotune.TuneStats())


def _case(fmt, m=3, k=96, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    q = quantize_int4(w, 32) if fmt == "int4" else quantize_fp8(w)
    x = torch.randn(m, k, generator=gen)
    residual = torch.randn(m, n, generator=gen)
    return dict(x=x, qweight=q.qweight, scales=q.scales, zeros=q.zeros, bias=None, norm_weight=None, norm_eps=None,
                inputs=[residual], kernel=kernel_for(RESIDUAL), fmt=fmt, group_size=q.group_size, in_features=k,
                out_features=n, out_dtype=torch.float32)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_every_candidate_computes_the_reference(fmt):
    case = _case(fmt, m=3, k=512)
    expected = qlinear_reference(case["x"], case["qweight"], case["scales"], case["zeros"], None, fmt, case["group_size"],
                                 512, 40) + case["inputs"][0]
    configs = autotune.candidates(fmt, case["group_size"], 3, 40, 512, on_gpu=False)
    assert len(configs) <= 12 and {c["block_n"] for c in configs} == {32, 64, 128}
    assert any(c["split_k"] > 1 for c in configs)  # small M: split-K is in the space
    for config in configs:
        out = launch(kernel_cache.loaded(case["kernel"]), case["x"], case["qweight"], case["scales"], case["zeros"], None,
                     case["inputs"], RESIDUAL, fmt, case["group_size"], 512, 40, torch.float32, **config)
        assert ((out - expected).norm() / expected.norm()).item() <= 1e-3, config


def test_the_fastest_is_kept_and_read_back(monkeypatch):
    case = _case("int4")
    measured = []

    def fake_measure(run, on_gpu):  # BLOCK_N 64 with BLOCK_K 16 is "fastest"; runs it, as the real one does
        run()
        config = run.__defaults__[0]
        measured.append(config)
        return 1.0 if (config["block_n"], config["block_k"]) == (64, 16) else 2.0 + config["block_n"] / 1000

    monkeypatch.setattr(autotune, "measure", fake_measure)
    expected = fused_qlinear_impl(**case, autotune=False)
    out = fused_qlinear_impl(**case, autotune=True)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert len(measured) == len(autotune.candidates("int4", 32, 3, 40, 96, on_gpu=False)) and autotune.stats.tuned == 1
    entries = json.loads(autotune.cache_file().read_text())
    ((key, entry),) = entries.items()
    assert (entry["config"]["block_n"], entry["config"]["block_k"]) == (64, 16) and entry["seconds"] == 1.0
    assert key.startswith(case["kernel"] + "|int4|g32|m4|n40|k96|torch.float32->torch.float32|plain|")

    def no_measuring(run, on_gpu):
        raise AssertionError("a cached shape was measured again")

    monkeypatch.setattr(autotune, "measure", no_measuring)
    fused_qlinear_impl(**case, autotune=True)  # same shape: from memory
    fused_qlinear_impl(**{**case, "x": torch.randn(4, 96), "inputs": [torch.randn(4, 40)]}, autotune=True)  # M 4: same bucket
    autotune.forget_tuned()  # as a new process: from the file
    fused_qlinear_impl(**case, autotune=True)
    assert (autotune.stats.tuned, autotune.stats.reused, autotune.stats.loaded) == (1, 2, 1)
    # another M bucket is another shape
    monkeypatch.setattr(autotune, "measure", fake_measure)
    fused_qlinear_impl(**{**case, "x": torch.randn(9, 96), "inputs": [torch.randn(9, 40)]}, autotune=True)
    assert autotune.stats.tuned == 2 and len(json.loads(autotune.cache_file().read_text())) == 2


def test_an_unreadable_cache_file_is_tuned_again(monkeypatch):
    autotune.cache_file().parent.mkdir(parents=True)
    autotune.cache_file().write_text("{not json")
    monkeypatch.setattr(autotune, "measure", lambda run, on_gpu: 1.0)
    fused_qlinear_impl(**_case("fp8"), autotune=True)
    assert autotune.stats.tuned == 1 and len(json.loads(autotune.cache_file().read_text())) == 1


def test_compile_with_autotune_then_warm(tiny_llama, token_ids):
    """target="triton" with autotune=True: the first compile tunes each (kernel, shape) once; a
    second compile of the same model tunes nothing and generates nothing."""
    torch._dynamo.reset()
    compiled = lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton", autotune=True)
    with torch.no_grad():
        first = compiled(token_ids).logits
    tuned = autotune.stats.tuned
    # the tiny Llama's qlinear shapes: q/o (64->64, two kernels), k/v (64->32), gate+up (64->128, two
    # kernels), down (128->64)
    assert tuned == len(json.loads(autotune.cache_file().read_text())) >= 5
    written = kernel_cache.stats.written
    torch._dynamo.reset()
    again = lqc.compress(tiny_llama, "int4", example_inputs=token_ids, progress=False, target="triton", autotune=True)
    with torch.no_grad():
        second = again(token_ids).logits
    assert autotune.stats.tuned == tuned and kernel_cache.stats.written == written
    assert torch.equal(first, second)


def test_autotune_option_is_checked():
    with pytest.raises(lqc.LqcConfigError, match="autotune must be true, false or null"):
        lqc.options.CompileOptions.parse({"autotune": "yes"})
