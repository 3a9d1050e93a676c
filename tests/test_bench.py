"""The benchmark harness measures every variant in one run and reports consistent figures."""

from __future__ import annotations

import json

import pytest

import lqc
from lqc.bench import format_bench, model_weight_bytes, run_bench


def test_bench_tiny_model_eager_and_lqc(tmp_path):
    model = lqc.models.load("tiny-llama").model
    result = run_bench(
        model, model_name="tiny-llama", recipe="default", target="eager", variants=("eager", "lqc"),
        prefill_tokens=32, prompt_tokens=8, decode_tokens=4, runs=2, log=lambda _: None,
    )
    eager, compressed = result.variants
    assert result.graphs_compiled_while_timing == 0
    for v in result.variants:
        assert v.prefill_ms > 0 and v.decode_tokens_per_s > 0
        assert len(v.prefill_runs_ms) == 2 and len(v.decode_runs_tokens_per_s) == 2
        # 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes
        assert v.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert eager.weight_bytes == model_weight_bytes(model)
    alone = lqc.compress(model, "default", target="eager", progress=False)
    assert compressed.weight_bytes == lqc.session_of(alone).reports[-1].bytes_after  # the graph's constants as stored
    assert eager.compile_warm_s == 0.0 and compressed.compile_cold_s >= 0.0
    table = format_bench(result)
    assert "decode tok/s" in table and "lqc" in table
    (tmp_path / "r.json").write_text(json.dumps(result.to_json()))


def test_bench_times_dropped_attention_with_its_cache_freed():
    """With a drop_layers recipe the lqc variant's static cache leaves the dropped layer out:
    one layer's bytes per token plus one stored position of the dropped one."""
    model = lqc.models.load("tiny-llama").model
    recipe = [{"pass": "drop_layers", "what": "attention", "layers": [1]}]
    result = run_bench(
        model, model_name="tiny-llama", recipe=recipe, target="eager", variants=("eager", "lqc"),
        prefill_tokens=32, prompt_tokens=8, decode_tokens=4, runs=1, log=lambda _: None,
    )
    eager, compressed = result.variants
    assert result.graphs_compiled_while_timing == 0
    assert eager.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert compressed.kv_bytes_per_token == 2 * 2 * 16 * 4 + 2 * 2 * 16 * 4 / 12  # 12 = cache length


def _event(name, self_us, parent=None):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, self_cpu_time_total=self_us, cpu_parent=parent)


def test_decode_profile_files_each_ops_own_time_under_its_piece_and_kind():
    from lqc.decode_profile import summarize

    region = _event("Torch-Compiled Region: 0/1", 100)
    block = _event("lqc piece block 3", 20, region)
    call = _event("## Call CompiledFxGraph None ##", 50, block)
    qlinear = _event("lqc::qlinear", 30, call)
    events = [region, block, call, qlinear, _event("aten::_weight_int8pack_mm", 400, qlinear),
              _event("graph_4_cpp_fused_add_mean_mul_pow_rsqrt_0", 40, call),
              _event("aten::_scaled_dot_product_flash_attention_for_cpu", 60, call),
              _event("aten::_to_copy", 10, qlinear), _event("aten::mm", 200, _event("## Call CompiledFxGraph None ##", 5, _event("lqc piece post", 5)))]
    rows, top = summarize(events, steps=2, profiled_seconds=0.002)  # 2,000 us a step, 910 of them recorded
    expected = {("blocks", "linear"): 30 + 400, ("blocks", "Inductor kernels"): 40, ("blocks", "attention"): 60,
                ("blocks", "other ATen ops"): 10, ("blocks", "wrappers"): 20 + 50, ("post", "linear"): 200,
                ("outside the graph", "wrappers"): 100, ("outside the graph", "Python (no op recorded)"): 2000 - 910}
    assert rows == pytest.approx({key: us / 1e3 / 2 for key, us in expected.items()})
    assert top[0] == ("aten::_weight_int8pack_mm", 0.2, 0)


def test_bench_profile_on_a_tiny_model(capsys, tmp_path):
    from lqc.cli import main

    out = tmp_path / "profile.json"
    # target eager: no Inductor compile (seconds on a tiny model); the Inductor names are the test above
    assert main(["bench", "--profile", "--model", "tiny-llama", "--recipe", "int8", "--target", "eager",
                 "--prompt-tokens", "8", "--profile-steps", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "one decode step of lqc int8" in printed and "aten::_weight_int8pack_mm" in printed
    profile = json.loads(out.read_text())
    by_row = {(r["where"], r["kind"]): r["ms_per_step"] for r in profile["rows"]}
    assert by_row[("outside the graph", "linear")] > 0  # the eager target runs no compiled graph
    # every microsecond of a step is filed somewhere, once
    assert sum(by_row.values()) == pytest.approx(profile["profiled_step_ms"], rel=1e-6)


def test_bench_profile_refuses_zero_steps(capsys):
    from lqc.cli import main

    assert main(["bench", "--profile", "--model", "tiny-llama", "--target", "eager", "--profile-steps", "0"]) == 2
    assert "--profile-steps" in capsys.readouterr().err


def test_a_sliding_window_model_decodes_in_fixed_graphs_or_is_refused():
    """Gemma 3's sliding layers (8 tokens here): transformers' static cache would recompile every
    step; within the window the bench's cache holds them as plain static layers, so the compiled
    decode loop is 2 graphs and each step's logits are the eager model's on the whole sequence;
    past the window it is refused."""
    import torch
    from torch._dynamo.utils import counters

    from lqc.bench import compile_for_decode, static_cache
    from lqc.support_matrix import build

    model = build("gemma3").eval()
    forward = compile_for_decode(model.forward, backend="eager")  # the graphs are dynamo's business, not Inductor's
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(0))
    cache = static_cache(model.config, 8)
    before = counters["stats"]["unique_graphs"]
    with torch.no_grad():
        steps = [forward(input_ids=ids[:, :3], cache=cache, use_cache=True).logits[:, -1]]
        for i in range(3, 7):
            steps.append(forward(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True,
                                 position_ids=torch.tensor([[i]])).logits[:, -1])
        reference = model(ids).logits[0, 2:]
    assert counters["stats"]["unique_graphs"] - before == 2  # prompt and decode step
    assert (torch.cat(steps) - reference).abs().max().item() < 1e-4
    with pytest.raises(lqc.LqcConfigError, match="slides this model's 8-token attention window.*--decode-tokens"):
        static_cache(model.config, 9)
