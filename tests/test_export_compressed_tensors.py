"""lqc.export(..., "compressed-tensors"): transformers loads the export (no lqc code) and computes what lqc computes."""

from __future__ import annotations

import json

import pytest
import torch

import lqc
import lqc.models
from lqc.ir import LqcConfigError
from lqc.runtime.quantization.formats import fit_zero_points, integer_zero_points, quantize_int4

pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))


def _export(tmp_path, recipe: list[dict], **kwargs):
    """(lqc's model as lqc.load rebuilds it, the export as transformers loads it, the export's report)."""
    compressed = lqc.compress(lqc.models.load("tiny-llama").model, recipe, progress=False)
    checkpoint = lqc.save(compressed, tmp_path / "checkpoint")
    report = lqc.export(checkpoint, "compressed-tensors", tmp_path / "out", **kwargs)
    return lqc.load(checkpoint).eval(), transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval(), report


def _relative_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    with torch.no_grad():
        x, y = a(input_ids=IDS).logits, b(input_ids=IDS).logits
    return float((x - y).norm() / y.norm())


# tiny-llama: 64 inputs to q/k/v/o/gate/up, 160 to down: g64 and g128 do not divide 160 (nor g128 64),
# so lqc pads those groups and the export writes them as smaller groups with repeated parameters.
@pytest.mark.parametrize("quantize", [
    {"format": "int4", "group_size": 32, "zero_point": "integer"},
    {"format": "int4", "group_size": 128, "zero_point": "symmetric"},
    {"format": "fp8"},  # int8: test_whole_dropped_blocks_export_as_a_smaller_model
], ids=lambda q: "-".join(str(v) for v in q.values()))
def test_transformers_loads_the_export_and_matches_lqc(tmp_path, quantize):
    ours, theirs, report = _export(tmp_path, [{"pass": "quantize", "kernels": False, **quantize}])
    # the same weights; lqc's zero point is fp16(-zp * s), compressed-tensors computes (q - zp) * s
    assert _relative_difference(theirs, ours) < 1e-3
    assert all(info["exact"] for info in report["layers"].values()) and report["ignore"] == ["lm_head"]
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    weight = "weight_packed" if quantize["format"] in ("int4", "int8") else "weight"
    q_proj = stored[f"model.layers.0.self_attn.q_proj.{weight}"]
    assert q_proj.dtype == {"int4": torch.int32, "fp8": torch.float8_e4m3fn}[quantize["format"]]
    assert "model.layers.0.self_attn.q_proj.weight" not in stored or weight == "weight"  # no float copy beside it


def test_w8a8_exports_int8_weights_with_dynamic_per_token_activations(tmp_path):
    ours, theirs, report = _export(tmp_path, [{"pass": "quantize", "format": "w8a8", "kernels": False}])
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    scheme = next(iter(config["config_groups"].values()))
    assert config["format"] == "int-quantized"
    assert scheme["input_activations"] | {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True} == scheme["input_activations"]
    # same int8 weights; compressed-tensors' reference scales activations by absmax/127.5, lqc (as vLLM's
    # kernel) by absmax/127: the logits differ by that rounding, not more
    assert _relative_difference(theirs, ours) < 5e-2


def test_float_zero_points_are_refused_unless_requantized(tmp_path):
    compressed = lqc.compress(lqc.models.load("tiny-llama").model, [{"pass": "quantize", "format": "int4", "group_size": 32}], progress=False)
    checkpoint = lqc.save(compressed, tmp_path / "checkpoint")
    with pytest.raises(LqcConfigError, match="zero_point: integer.*--requantize"):
        lqc.export(checkpoint, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
    report = lqc.export(checkpoint, "compressed-tensors", tmp_path / "out", requantize=True)
    assert report["requantized"] and all(0 < info["max_abs_change"] for info in report["layers"].values())


def test_integer_zero_points_hold_lqc_weights_as_compressed_tensors_stores_them():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    for mode in ("integer", "symmetric"):
        q = quantize_int4(weight, 32, zero_point=mode)
        zp = integer_zero_points(q)
        assert zp is not None and zp.abs().max() <= 8 and (mode == "integer" or not zp.any())
        codes = torch.stack([q.qweight & 15, q.qweight >> 4], -1).reshape(8, 64).float() - 8
        ct = ((codes.reshape(8, 2, 32) - zp[..., None].float()) * q.scales.float()[..., None]).reshape(8, 64)
        assert torch.allclose(ct, q.dequantize(), atol=float(q.scales.float().max()) * 2**-10)
        assert all(torch.equal(a, b) for a, b in zip(fit_zero_points(q.scales, q.zeros, mode), (q.scales, q.zeros)))
    assert integer_zero_points(quantize_int4(weight, 32)) is None  # lqc's default: float zero points
    from lqc.passes.quantization.gptq import gptq

    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(2))
    for act_order in (False, True):  # groups fitted inside the column loop, or all before it
        result = gptq(weight, (x.T @ x / 256).double(), fmt="int4", group_size=32, act_order=act_order, zero_point="integer")
        q = quantize_int4(result.weight, 32, result.scales, result.zeros, zero_point="integer")
        assert integer_zero_points(q) is not None and torch.allclose(q.dequantize(), result.weight, atol=1e-6)


def test_whole_dropped_blocks_export_as_a_smaller_model(tmp_path):
    recipe = [{"pass": "drop_layers", "what": "block", "layers": [0]}, {"pass": "quantize", "format": "int8", "kernels": False}]
    ours, theirs, _ = _export(tmp_path, recipe)
    assert theirs.config.num_hidden_layers == 1
    assert _relative_difference(theirs, ours) < 1e-5


def test_a_dropped_sublayer_is_refused_naming_the_recipe_fix(tmp_path):
    recipe = [{"pass": "drop_layers", "what": "attention", "layers": [1]}, {"pass": "quantize", "format": "int8"}]
    compressed = lqc.compress(lqc.models.load("tiny-llama").model, recipe, progress=False)
    checkpoint = lqc.save(compressed, tmp_path / "checkpoint")
    with pytest.raises(LqcConfigError, match="attention of block 1.*what: block"):
        lqc.export(checkpoint, "compressed-tensors", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_saved_folder_requantizing_only_when_asked(tmp_path, capsys):
    from lqc.cli import main

    compressed = lqc.compress(lqc.models.load("tiny-llama").model, [{"pass": "quantize", "format": "int4", "group_size": 32}], progress=False)
    checkpoint = str(lqc.save(compressed, tmp_path / "checkpoint"))
    out = ["--to", "compressed-tensors", "-o", str(tmp_path / "out")]
    assert main(["export", checkpoint, *out]) == 2
    assert "--requantize" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main(["export", checkpoint, *out, "--requantize"]) == 0
    printed = capsys.readouterr().out
    assert "14 x W4A16 int4 g32 integer zero points: 14 not bit-exact, largest weight change" in printed
    assert "holds no tokenizer, so the perplexity change was not measured" in printed  # tiny-llama has none
    assert main(["export", checkpoint, "--recipe", "int8", "--to", "gguf", "-o", str(tmp_path / "m.gguf")]) == 2
    assert "export it without --recipe" in capsys.readouterr().err


def test_a_pass_no_format_expresses_is_refused_by_name_before_saving(tmp_path):
    recipe = [{"pass": "concat_linears"}, {"pass": "quantize", "format": "int8"}]
    compressed = lqc.compress(lqc.models.load("tiny-llama").model, recipe, progress=False)
    with pytest.raises(LqcConfigError, match="recipe's concat_linears change the model"):
        lqc.export(compressed, "gguf", tmp_path / "m.gguf")
    assert not any(tmp_path.iterdir())


def test_an_export_replaces_its_own_output_and_nothing_else(tmp_path):
    compressed = lqc.compress(lqc.models.load("tiny-llama").model, [{"pass": "quantize", "format": "int8"}], progress=False)
    checkpoint = lqc.save(compressed, tmp_path / "checkpoint")
    lqc.export(checkpoint, "compressed-tensors", tmp_path / "out")
    lqc.export(checkpoint, "compressed-tensors", tmp_path / "out")  # its own earlier export: replaced
    theirs = tmp_path / "hf-model"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")  # someone's own model folder
    with pytest.raises(LqcConfigError, match="was not written by lqc export"):
        lqc.export(checkpoint, "compressed-tensors", theirs)
    assert (theirs / "config.json").read_text() == "{}"
