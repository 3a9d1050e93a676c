"""The benchmark harness measures every variant in one run and reports consistent figures."""

from __future__ import annotations

import json

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
    assert compressed.weight_bytes == lqc.reports()[-1].bytes_after  # the graph's constants as stored
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
