"""lqc.save / lqc.load: the same logits after a round trip, no pickle, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import lqc
from lqc.ir import LqcConfigError
from lqc.checkpoint import manifest_digest


def _compress_and_save(model, recipe, directory, ids, **kwargs):
    # captured on ids: the logits below reuse that graph (another shape would be a second capture)
    compressed = lqc.compress(model, recipe, progress=False, example_inputs=ids, **kwargs)
    with torch.no_grad():
        logits = compressed(ids).logits
    lqc.save(compressed, directory)
    return compressed, logits


@pytest.mark.parametrize(
    "quantize",
    [{"format": "int4", "group_size": 32}, {"format": "int8", "kernels": False}, {"format": "w8a8"}, {"format": "fp8"}, {"format": "fp8_dyn"}],
)
def test_round_trip_gives_identical_logits(tiny_llama, token_ids, tmp_path, quantize):
    _, logits = _compress_and_save(tiny_llama, [{"pass": "cleanup"}, {"pass": "quantize", **quantize}], tmp_path, token_ids)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lqc.json", "model.safetensors"]  # no pickle anywhere
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.lqc-")] == []  # no leftovers
    loaded = lqc.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, logits)
    manifest = json.loads((tmp_path / "lqc.json").read_text())
    assert manifest["lqc_version"] == lqc.__version__ and manifest["recipe"][1]["format"] == quantize["format"]
    assert len(manifest["layers"]) == 14
    assert {info["format"] for info in manifest["layers"].values()} == {quantize["format"]}


def test_migrated_norms_are_saved(tiny_llama, token_ids, tmp_path):
    """AWQ divides norm weights and up_proj rows by its scales: the saved model must hold those."""
    from lqc.passes import Calibration

    calibration = Calibration([torch.randint(0, 256, (1500,), generator=torch.Generator().manual_seed(3))])
    recipe = [{"pass": "quantize", "format": "int4", "group_size": 32, "method": "awq", "calibration_tokens": 1500}]
    _, logits = _compress_and_save(tiny_llama, recipe, tmp_path, token_ids, calibration=calibration)
    loaded = lqc.load(tmp_path)
    norm = loaded.model.layers[0].input_layernorm.weight
    assert not torch.equal(norm, tiny_llama.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids).logits, logits)


def test_errors(tiny_llama, token_ids, tmp_path):
    with pytest.raises(LqcConfigError, match=r"needs a model returned by lqc.compress"):
        lqc.save(tiny_llama, tmp_path)
    with pytest.raises(LqcConfigError, match="holds no lqc.json"):
        lqc.load(tmp_path)
    _compress_and_save(tiny_llama, [{"pass": "quantize", "format": "int8"}], tmp_path, token_ids)
    manifest_path = tmp_path / "lqc.json"
    manifest = json.loads(manifest_path.read_text())

    def write(edited):  # with the manifest's checksum recomputed, so the check under test is what objects
        manifest_path.write_text(json.dumps({**edited, "manifest_sha256": manifest_digest(edited)}))

    write({**manifest, "format_version": 99, "lqc_version": "9.0"})
    with pytest.raises(LqcConfigError, match=r"written by lqc 9.0 in format version 99; lqc .* reads versions up to 2. Upgrade lqc"):
        lqc.load(tmp_path)
    layer = next(iter(manifest["layers"]))
    write({**manifest, "layers": {**manifest["layers"], layer: {**manifest["layers"][layer], "format": "int3"}}})
    with pytest.raises(LqcConfigError, match=r"has format 'int3'.*knows formats int8, int4, w8a8, fp8"):
        lqc.load(tmp_path)
    write({k: v for k, v in manifest.items() if k != "aliases"})
    with pytest.raises(LqcConfigError, match=r"lacks \['aliases'\].*re-save the model with lqc.save"):
        lqc.load(tmp_path)
    manifest_path.write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(LqcConfigError, match="is not 'lqc-compressed-model'"):
        lqc.load(tmp_path)


def test_recipes_with_other_passes_are_refused(tiny_llama, token_ids, tmp_path):
    from lqc.passes import Pass, PassResult

    class Nothing(Pass):  # not registered: a recipe may hold Pass objects
        name = "nothing"

        def run(self, graph, ctx):
            return PassResult()

    compressed = lqc.compress(tiny_llama, [Nothing(), lqc.passes.get_pass("quantize")()], progress=False)
    with pytest.raises(LqcConfigError, match="stores recipes of cleanup, drop_layers, quantize, route_neurons passes; this one also has nothing"):
        lqc.save(compressed, tmp_path)
    compressed = lqc.compress(tiny_llama, [{"pass": "quantize", "include_embedding": True}], progress=False)
    with pytest.raises(LqcConfigError, match="does not store int8 embedding tables yet"):
        lqc.save(compressed, tmp_path)


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_int4_loads_in_a_fresh_process(smollm2, eval_ids, tmp_path):
    from safetensors.torch import save_file

    ids = eval_ids[:64][None]
    recipe = [{"pass": "cleanup"}, {"pass": "quantize", "format": "int4", "group_size": 64}]
    compressed, logits = _compress_and_save(smollm2.model, recipe, tmp_path / "model", ids)
    save_file({"ids": ids, "logits": logits}, str(tmp_path / "expected.safetensors"))
    manifest = json.loads((tmp_path / "model" / "lqc.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}  # tied: stored once
    stored = (tmp_path / "model" / "model.safetensors").stat().st_size
    assert stored < 0.55 * sum(p.numel() * 4 for p in smollm2.model.parameters())
    script = textwrap.dedent(f"""
        import torch, lqc
        from safetensors.torch import load_file
        expected = load_file({str(tmp_path / 'expected.safetensors')!r})
        model = lqc.load({str(tmp_path / 'model')!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-2000:]


def test_compress_says_when_dynamo_gave_up(tiny_llama):
    """Past dynamo's recompile limit the forward runs uncompiled: compress must not return it as compressed."""
    from lqc.ir import LqcError

    with pytest.raises(LqcError, match=r"dynamo compiled no graph.*torch._dynamo.reset\(\)"):
        for iters in range(torch._dynamo.config.recompile_limit + 1):
            lqc.compress(tiny_llama, [{"pass": "quantize", "hqq_iters": iters + 1}], progress=False)
