"""The quantize pass on tiny models: formats, layer selection, padding, errors, methods."""

from __future__ import annotations

import pytest
import torch

from lqc.ir import LqcConfigError, op_name, trace
from lqc.passes import PassContext, PassManager
from lqc.passes.quantization.hqq import hqq_int4_params
from lqc.runtime.quantization.formats import int4_minmax_params, quantize_int4

LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down


def _run(model, ids, *entries):
    graph = trace(model, ids)
    report = PassManager([{"pass": "cleanup"}, *entries], verify=True).run(graph, PassContext(check_inputs=[(ids,)]))
    return graph, report.records[-1]


@pytest.mark.parametrize(
    "entry,max_error,max_bytes_ratio",
    [
        ({"format": "int8"}, 0.02, 0.30),
        ({"format": "int8", "kernels": False}, 0.02, 0.30),
        ({"format": "int4", "group_size": 32}, 0.15, 0.20),
        ({"format": "int4", "group_size": 64, "method": "hqq"}, 0.15, 0.20),
        ({"format": "w8a8"}, 0.03, 0.30),
        ({"format": "fp8"}, 0.06, 0.30),
        ({"format": "fp8_dyn"}, 0.08, 0.30),
    ],
)
def test_formats_rewrite_every_block_linear(tiny_llama, token_ids, entry, max_error, max_bytes_ratio):
    graph, record = _run(tiny_llama, token_ids, {"pass": "quantize", **entry})
    assert record.matches == 2 * LINEARS_PER_BLOCK  # the lm_head is left alone by default
    qlinears = [n for n in graph.nodes if op_name(n) == "lqc::qlinear"]
    assert len(qlinears) == record.matches and not [n for n in graph.nodes if op_name(n) == "linear" and "layers" in graph.module_path(n)]
    assert 0 < record.rel_error < max_error
    layer_bytes = sum(layer.bytes_before for layer in record.details.layers)
    assert sum(layer.bytes_after for layer in record.details.layers) <= max_bytes_ratio * layer_bytes
    assert record.bytes_after < record.bytes_before


def test_lm_head_on_request_and_targets(tiny_llama, token_ids):
    _, record = _run(tiny_llama, token_ids, {"pass": "quantize", "include_lm_head": True})
    assert record.matches == 2 * LINEARS_PER_BLOCK + 1
    _, record = _run(tiny_llama, token_ids, {"pass": "quantize", "targets": [r"\.mlp\."], "ignore": [r"layers\.0\."]})
    assert [layer.layer for layer in record.details.layers] == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"
    ]


def test_widths_the_group_does_not_divide_are_padded_or_skipped(tiny_llama, token_ids):
    # tiny-llama's down_proj has 160 inputs: not a multiple of 64
    graph, record = _run(tiny_llama, token_ids, {"pass": "quantize", "format": "int4", "group_size": 64, "kernels": False})
    assert record.matches == 14 and record.rel_error < 0.15
    down = next(n for n in graph.nodes if op_name(n) == "lqc::qlinear" and "down_proj" in graph.module_path(n))
    assert graph.constant(down.args[1]).shape == (64, 96) and down.args[7] == 160  # 192 padded columns, 2 a byte
    with pytest.warns(UserWarning, match=r"down_proj has 160 inputs, not a multiple of group_size 64"):
        _, record = _run(tiny_llama, token_ids, {"pass": "quantize", "format": "int4", "group_size": 64, "pad": False})
    assert record.matches == 12 and len(record.details.skipped) == 2


def test_bad_input_errors(tiny_llama, token_ids):
    with pytest.raises(LqcConfigError, match=r"quantize.method must be one of rtn, hqq, gptq, awq; got 'awk'"):
        _run(tiny_llama, token_ids, {"pass": "quantize", "method": "awk"})
    with pytest.raises(LqcConfigError, match=r"quantize.format must be one of int8, int4, w8a8, fp8"):
        _run(tiny_llama, token_ids, {"pass": "quantize", "format": "int3"})
    with pytest.raises(LqcConfigError, match=r"group_size must be one of 32, 64, 128, 256"):
        _run(tiny_llama, token_ids, {"pass": "quantize", "format": "int4", "group_size": 48})
    with torch.no_grad():
        tiny_llama.model.layers[1].self_attn.v_proj.weight[3, 5] = float("nan")
    with pytest.raises(LqcConfigError, match=r"model.layers.1.self_attn.v_proj contains NaN or inf"):
        _run(tiny_llama, token_ids, {"pass": "quantize"})


def test_gpt2_conv1d_weights(tiny_models, token_ids):
    # GPT-2's Conv1D computes addmm(b, x, W) with W stored [in, out]
    graph, record = _run(tiny_models["tiny-gpt2"], token_ids, {"pass": "quantize", "format": "int8"})
    assert record.matches == 2 * 4 and record.rel_error < 0.02


def test_hqq_lowers_weight_error_against_rtn():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    w[torch.rand_like(w) < 0.01] *= 8  # outliers, as real weights have
    rtn = quantize_int4(w, 64, *int4_minmax_params(w, 64), param_dtype=torch.float32).dequantize()
    hqq = quantize_int4(w, 64, *hqq_int4_params(w, 64), param_dtype=torch.float32).dequantize()
    for p in (1, 2):
        assert (hqq - w).norm(p=p) < (rtn - w).norm(p=p)


def test_quantized_graph_runs_under_inductor(tiny_llama, token_ids):
    compiled = torch.compile(tiny_llama, backend="lqc", options={"recipe": [{"pass": "quantize", "format": "int4", "group_size": 32}]})
    with torch.no_grad():
        out, ref = compiled(token_ids).logits, tiny_llama(token_ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.15


def _correlated_problem(n_out=64, k=256, tokens=2048):
    torch.manual_seed(0)
    x = torch.randn(tokens, k) @ (torch.randn(k, k) * 0.3 + torch.eye(k))
    x[:, :5] *= 10  # a few salient input channels, as real activations have
    w = torch.randn(n_out, k) * 0.05
    return x, w, (x.T @ x / tokens).double()



@pytest.mark.parametrize("zero_point", ["float", "integer", "symmetric"])
def test_refit_solves_each_rows_least_squares_for_gptqs_codes(zero_point):
    """The refitted parameters are each row's least-squares (s, z) for GPTQ's codes, found here by
    torch.linalg.lstsq on the whitened design matrix; they lower every row's error, and the stored
    weight keeps GPTQ's codes. With integer or no zero points only the scales move."""
    from lqc.passes.quantization.gptq import gptq
    from lqc.passes.quantization.refit import refit_int4_params
    from lqc.passes.quantization.weights import refit_gptq_params
    from lqc.runtime.quantization.formats import fit_zero_points, int4_codes

    x, w, hessian = _correlated_problem(n_out=8, k=128)
    s0, z0 = fit_zero_points(*int4_minmax_params(w, 32), zero_point)
    result = gptq(w, hessian, fmt="int4", group_size=32, act_order=True, group_params=(s0, z0), zero_point=zero_point)
    codes = int4_codes(result.weight, result.scales, result.zeros, 32)
    scales, zeros = refit_int4_params(w, hessian, codes, result.scales, result.zeros, 32,
                                      fit_zeros=zero_point == "float", param_dtype=torch.float64, ridge=0.0)
    root = torch.linalg.cholesky(hessian)  # d H d^T = |d L|^2
    centered = codes.double() - 8
    for row in range(w.shape[0]):
        if zero_point == "float":
            design = torch.zeros(128, 8, dtype=torch.float64)
            for g in range(4):
                design[g * 32:(g + 1) * 32, g] = centered[row, g * 32:(g + 1) * 32]
                design[g * 32:(g + 1) * 32, 4 + g] = 1.0
        else:
            offset = (result.zeros[row] / result.scales[row]).double().repeat_interleave(32)
            design = torch.zeros(128, 4, dtype=torch.float64)
            for g in range(4):
                design[g * 32:(g + 1) * 32, g] = (centered[row] + offset)[g * 32:(g + 1) * 32]
        best = torch.linalg.lstsq(root.T @ design, root.T @ w[row].double()).solution
        assert torch.allclose(scales[row], best[:4], rtol=1e-6, atol=1e-9)
        if zero_point == "float":
            assert torch.allclose(zeros[row], best[4:], rtol=1e-6, atol=1e-9)
    if zero_point == "symmetric":
        assert not zeros.any()

    stored_scales, stored_zeros, weight = refit_gptq_params(w, hessian, result, 32, zero_point)
    error = lambda q: (((q.double() - w) @ hessian) * (q.double() - w)).sum(1)  # noqa: E731
    assert (error(weight) <= error(result.weight)).all() and error(weight).sum() < 0.97 * error(result.weight).sum()
    stored = quantize_int4(weight, 32, stored_scales, stored_zeros, zero_point=zero_point)
    assert torch.equal(int4_codes(stored.dequantize(), stored.scales, stored.zeros, 32), codes)
    assert torch.equal(stored.dequantize(), weight)


def test_refit_rounds_keep_each_rows_best_round():
    """More rounds (GPTQ again on the refitted parameters, refit again) never raise a row's error
    and lower the layer's; 0 rounds or rounds without gptq_refit are configuration errors."""
    from types import SimpleNamespace

    from lqc.passes.quantization.gptq import gptq
    from lqc.passes.quantization.quantize import QuantizeOptions
    from lqc.passes.quantization.weights import refit_rounds

    x, w, hessian = _correlated_problem(n_out=32, k=128)
    result = gptq(w, hessian, fmt="int4", group_size=32, act_order=True, group_params=int4_minmax_params(w, 32))
    error = lambda q: (((q.double() - w) @ hessian) * (q.double() - w)).sum(1)  # noqa: E731
    opts = dict(group_size=32, zero_point="float", block_size=128, damp=0.01, act_order=True)
    one = refit_rounds(SimpleNamespace(**opts, refit_rounds=1), w, hessian, result)[2]
    three = refit_rounds(SimpleNamespace(**opts, refit_rounds=3), w, hessian, result)
    assert (error(three[2]) <= error(one)).all() and error(three[2]).sum() < 0.99 * error(one).sum()
    assert torch.equal(quantize_int4(three[2], 32, three[0], three[1]).dequantize(), three[2])  # on the stored grid
    for bad in ({"gptq_refit": True, "refit_rounds": 0}, {"refit_rounds": 2}):
        with pytest.raises(LqcConfigError, match="refit_rounds counts gptq_refit's rounds"):
            QuantizeOptions(format="int4", method="gptq", **bad)

@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_halves_output_error_and_lands_on_the_grid(act_order):
    from lqc.passes.quantization.gptq import gptq
    from lqc.runtime.quantization.formats import quantize_int4, quantize_int8

    x, w, hessian = _correlated_problem()

    def out_err(q):
        return ((x @ (q - w).T).norm() / (x @ w.T).norm()).item()

    result = gptq(w, hessian, fmt="int4", group_size=64, act_order=act_order)
    assert out_err(result.weight) < 0.6 * out_err(quantize_int4(w, 64).dequantize())
    stored = quantize_int4(result.weight, 64, result.scales, result.zeros).dequantize()
    assert torch.equal(stored, result.weight)  # the stored fp16 parameters reproduce it exactly
    int8 = gptq(w, hessian, fmt="int8")
    assert out_err(int8.weight) < 0.6 * out_err(quantize_int8(w).dequantize())


def test_gptq_in_a_recipe_needs_calibration_and_uses_it(tiny_llama, token_ids):
    from lqc.passes import Calibration

    entry = {"pass": "quantize", "format": "int4", "group_size": 32, "method": "gptq", "calibration_tokens": 2000}
    with pytest.raises(LqcConfigError, match="pass 'quantize' needs calibration data"):
        _run(tiny_llama, token_ids, entry)
    calibration = Calibration([torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(5))])
    graph = trace(tiny_llama, token_ids)
    rtn = PassManager([{"pass": "quantize", "format": "int4", "group_size": 32}], verify=True).run(
        graph, PassContext(check_inputs=[(token_ids,)])
    ).records[0]
    graph = trace(tiny_llama, token_ids)
    calibrated = PassManager([entry], verify=True).run(
        graph, PassContext(calibration=calibration, check_inputs=[(token_ids,)], progress=False)
    ).records[0]
    assert calibrated.matches == 14
    assert calibrated.rel_error < rtn.rel_error


@pytest.mark.parametrize("search", ["grid", "coordinate"])
def test_hessian_range_search_never_loses_to_minmax_per_group(search):
    from lqc.passes.quantization.awq import search_clipping_hessian
    from lqc.runtime.quantization.formats import int4_minmax_params, quantize_int4

    x, w, hessian = _correlated_problem()
    w[:, 7] += 0.4  # an outlier weight: clipping its group's range pays off

    def group_errors(scales, zeros):
        d = (quantize_int4(w, 64, scales, zeros).dequantize() - w).reshape(64, 4, 64)
        blocks = torch.stack([hessian.float()[i * 64:(i + 1) * 64, i * 64:(i + 1) * 64] for i in range(4)])
        return torch.einsum("rGg,Ggh,rGh->rG", d, blocks, d)

    searched = group_errors(*search_clipping_hessian(hessian, w, 64, search=search))
    minmax = group_errors(*int4_minmax_params(w, 64))
    # min/max is a candidate; the search judges float32 parameters, the store rounds them to float16
    assert (searched <= minmax * 1.02 + 1e-6).all()
    assert searched.sum() < 0.9 * minmax.sum()
    if search == "coordinate":  # a subset of the grid's candidates: never better than the grid
        grid = group_errors(*search_clipping_hessian(hessian, w, 64, search="grid"))
        assert grid.sum() <= searched.sum() * 1.001


def test_hessian_range_search_names_its_strategies():
    from lqc.passes.quantization.awq import search_clipping_hessian

    with pytest.raises(ValueError, match="search must be 'grid' or 'coordinate'; got 'random'"):
        search_clipping_hessian(torch.eye(64), torch.randn(4, 64), 64, search="random")


def test_awq_scale_search_finds_salient_channels():
    from lqc.passes.quantization.awq import search_scales
    from lqc.runtime.quantization.formats import quantize_int4

    x, w, _ = _correlated_problem()
    scales, alpha, errors = search_scales(x[:512], x.abs().mean(0), [w], 64)
    assert alpha > 0 and errors[0] > min(errors)
    assert scales[:5].mean() > scales[5:].mean()  # the salient channels are scaled up


def test_awq_in_a_recipe(tiny_llama, token_ids, monkeypatch):
    """Structure and exactness of AWQ's plumbing on a tiny model. (Random weights have no salient
    channels for AWQ to find: its quality is judged on SmolLM2, see docs/recipes.md.)"""
    import lqc.passes.quantization.migration as migration
    from lqc.passes import Calibration, TransformCache
    from lqc.runtime.quantization.formats import int4_minmax_params

    calibration = Calibration([torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(6))])
    entry = {"pass": "quantize", "format": "int4", "group_size": 32, "method": "awq", "calibration_tokens": 3000}

    def run(recipe):
        graph = trace(tiny_llama, token_ids)
        ctx = PassContext(calibration=calibration, check_inputs=[(token_ids,)], progress=False, cache=TransformCache())
        return PassManager(recipe, verify=True).run(graph, ctx).records[0]

    rtn = run([{"pass": "quantize", "format": "int4", "group_size": 32}])
    record = run([entry])
    assert record.matches == 14 and record.rel_error < 1.5 * rtn.rel_error
    groups = record.details.migration
    assert len(groups) == 8  # per block: q/k/v, o, gate/up, down
    qkv = next(g for g in groups if len(g.layers) == 3)
    assert qkv.scales_into == "model.layers.0.input_layernorm.weight" and qkv.alpha is not None
    assert sorted(qkv.unclipped) == ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.q_proj"]
    o_proj = next(g for g in groups if g.layers == ["model.layers.0.self_attn.o_proj"])
    assert o_proj.scales_into is None  # GQA: v_proj's rows cannot absorb per-head scales
    down = next(g for g in groups if g.layers == ["model.layers.0.mlp.down_proj"])
    assert down.scales_into == "rows of model.layers.0.mlp.up_proj"

    # with unit scales and no clipping, every migration and rewrite must reproduce RTN exactly
    monkeypatch.setattr(migration, "search_scales", lambda x, mean, ws, g, grid: (torch.ones(x.shape[1]), 0.0, []))
    monkeypatch.setattr(migration, "search_clipping", lambda x, w, g: int4_minmax_params(w, g))
    assert run([entry]).rel_error == rtn.rel_error


@pytest.mark.parametrize(
    "extra",
    [{"method": "gptq", "gptq_params": "clip"}, {"method": "gptq", "act_order": True, "gptq_params": "clip"},
     {"method": "gptq", "act_order": True, "gptq_params": "mse"}, {"method": "awq", "awq_gptq": True},
     {"method": "gptq", "act_order": True, "gptq_params": "mse", "sequential": True},
     {"method": "gptq", "act_order": True, "gptq_params": "mse", "gptq_refit": True}],
)
def test_gptq_variants_beat_rtn(tiny_llama, token_ids, extra):
    from lqc.passes import Calibration, TransformCache

    calibration = Calibration([torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(7))])

    def run(entry):
        graph = trace(tiny_llama, token_ids)
        ctx = PassContext(calibration=calibration, check_inputs=[(token_ids,)], progress=False, cache=TransformCache())
        return PassManager([entry], verify=True).run(graph, ctx).records[0]

    base = {"pass": "quantize", "format": "int4", "group_size": 32, "calibration_tokens": 2000}
    before = {name: p.clone() for name, p in tiny_llama.named_parameters()}
    record = run({**base, **extra})
    assert record.matches == 14
    assert record.rel_error < run(base).rel_error
    assert all(torch.equal(p, before[name]) for name, p in tiny_llama.named_parameters())  # the model is left as it was


def test_smoothquant_search_never_loses_to_no_smoothing():
    from lqc.passes.quantization.smoothquant import fake_quant_w8a8, search_smoothing

    g = torch.Generator().manual_seed(8)
    x = torch.randn(256, 128, generator=g)
    x[:, :4] *= 60.0  # outlier channels, as in LLM activations
    weights = [torch.randn(64, 128, generator=g) * 0.05 for _ in range(2)]
    scales, alpha, errors = search_smoothing(x, x.abs().amax(0), weights)
    assert alpha is not None and errors[0] > 2 * min(errors)  # smoothing pays off on outliers
    assert scales[:4].min() > scales[4:].max()  # the outlier channels are divided most
    err = lambda s: sum(float((fake_quant_w8a8(x / s, w * s) - x @ w.T).pow(2).mean()) for w in weights)
    assert err(scales) == pytest.approx(min(errors))


def test_smoothquant_in_a_recipe(tiny_llama, token_ids):
    """Outliers are planted by an exact reparameterization (one input_layernorm channel x50, the
    q/k/v columns /50): plain W8A8 suffers, SmoothQuant migrates them back."""
    import copy

    from lqc.passes import Calibration, TransformCache

    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] *= 50.0
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[:, :3] /= 50.0
    calibration = Calibration([torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(9))])

    def run(entry):
        graph = trace(model, token_ids)
        ctx = PassContext(calibration=calibration, check_inputs=[(token_ids,)], progress=False, cache=TransformCache())
        return PassManager([entry], verify=True).run(graph, ctx).records[0]

    plain = run({"pass": "quantize", "format": "w8a8"})
    for alpha in (0.5, None):
        smooth = run({"pass": "quantize", "format": "w8a8", "smoothquant": True, "smooth_alpha": alpha, "calibration_tokens": 2000})
        assert smooth.matches == 14 and smooth.rel_error < 0.5 * plain.rel_error
        assert smooth.details.method == "rtn"
        qkv = next(g for g in smooth.details.migration if len(g.layers) == 3)
        assert qkv.scales_into == "model.layers.0.input_layernorm.weight"
    with pytest.raises(LqcConfigError, match="use format 'w8a8' with method 'rtn'"):
        run({"pass": "quantize", "format": "int8", "smoothquant": True})
    with pytest.raises(LqcConfigError, match="needs calibration data"):
        PassManager([{"pass": "quantize", "format": "w8a8", "smoothquant": True}]).run(trace(model, token_ids), PassContext())


def test_sensitivity_is_each_layers_own_output_error_and_keeps_the_worst(tiny_llama, token_ids):
    from lqc.ir.linear import linear_sites
    from lqc.passes import Calibration, TransformCache
    from lqc.passes.quantization.sensitivity import layer_sensitivity

    calibration = Calibration([torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(4))])
    graph = trace(tiny_llama, token_ids)
    inputs = PassContext(calibration=calibration).calibration_inputs(graph, tokens=48)
    sites = [s for s in linear_sites(graph) if "layers" in s.name(graph)]
    ranking = layer_sensitivity(graph, sites, inputs, lambda w: quantize_int4(w, 32).dequantize())
    assert len(ranking) == 14 and ranking[0]["rel_error"] > ranking[-1]["rel_error"] > 0
    for row in (ranking[0], ranking[-1]):  # the same figure as quantizing that layer alone
        alone = PassManager([{"pass": "quantize", "format": "int4", "group_size": 32, "kernels": False,
                              "targets": [f"^{row['layer']}$"]}], verify=True)
        record = alone.run(trace(tiny_llama, token_ids), PassContext(check_inputs=inputs)).records[0]
        assert record.matches == 1 and record.rel_error == pytest.approx(row["rel_error"], rel=1e-4)

    def run(entry):
        graph = trace(tiny_llama, token_ids)
        ctx = PassContext(calibration=calibration, check_inputs=inputs, progress=False, cache=TransformCache())
        return graph, PassManager([entry], verify=True).run(graph, ctx).records[0]

    base = {"pass": "quantize", "format": "int4", "group_size": 32, "sensitivity_tokens": 48}
    _, plain = run(base)
    graph, kept = run({**base, "keep_sensitive": 1})
    assert kept.details.sensitivity[0]["layer"] == ranking[0]["layer"] and kept.matches == 14
    worst = next(n for n in graph.nodes if op_name(n) == "lqc::qlinear" and graph.module_path(n) == ranking[0]["layer"])
    assert worst.meta["lqc_quantized"]["canonical"].format == "int8"
    assert kept.rel_error < plain.rel_error
    graph, floated = run({**base, "keep_sensitive": 2, "keep_format": "float"})
    assert floated.matches == 12 and [op_name(n) for n in graph.nodes].count("linear") == 3  # + the lm_head
    assert [layer.kept for layer in floated.details.layers if layer.kept] == ["float", "float"]


def test_embedding_tables_on_request(tiny_llama, token_ids):
    import copy

    model = copy.deepcopy(tiny_llama)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    with pytest.warns(UserWarning, match=r"shared with a layer that stays in float \(lm_head\)"):
        graph, record = _run(model, token_ids, {"pass": "quantize", "include_embedding": True})
    table = next(layer for layer in record.details.layers if layer.kind == "embedding")
    assert table.layer == "model.embed_tokens" and table.bytes_after < 0.3 * table.bytes_before
    assert record.rel_error < 0.02 and "embedding" not in [op_name(n) for n in graph.nodes if n.args and graph.is_constant(n.args[0]) and graph.constant(n.args[0]).is_floating_point()]
    # with the lm_head in int8 the two share one int8 table: fewer bytes than either alone
    graph, shared = _run(model, token_ids, {"pass": "quantize", "include_embedding": True, "include_lm_head": True})
    shared_table = next(layer for layer in shared.details.layers if layer.kind == "embedding")
    assert shared_table.bytes_after == 0  # the canonical lm_head's codes and row scales are the table's
    assert shared.bytes_after < record.bytes_after - table.bytes_after and shared.rel_error < 0.03
