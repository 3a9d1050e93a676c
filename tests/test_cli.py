"""The `lqc` command: listings and clear errors (exit code 2, message naming the fix)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lqc.cli import main


def test_passes_lists_options_and_defaults(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "cleanup: remove no-op" in out
    assert "targets (list[str], default [])" in out and "ignore (list[str], default [])" in out


def test_recipes(capsys):
    assert main(["recipes"]) == 0
    assert "default:" in capsys.readouterr().out
    assert main(["recipes", "default"]) == 0
    out = capsys.readouterr().out
    assert "format: int8" in out and "include_lm_head: true" in out and "include_embedding: true" in out
    assert main(["recipes", "max"]) == 0
    out = capsys.readouterr().out
    assert "method: gptq" in out and "pass: compress_kv" not in out  # the float cache decodes faster here
    assert main(["recipes", "max+kv-int8"]) == 0
    out = capsys.readouterr().out
    assert out.index("method: gptq") < out.index("pass: compress_kv") and "bits: 8" in out
    assert main(["recipes", "moe+int8"]) == 0  # a composition, in stage order
    out = capsys.readouterr().out
    assert out.index("pass: route_neurons") < out.index("pass: quantize")


def test_bad_recipe_is_a_clear_error(capsys):
    assert main(["recipes", "int5"]) == 2
    assert "no named recipe 'int5'" in capsys.readouterr().err
    assert main(["recipes", "int8+int4"]) == 2
    assert "recipes 'int8' and 'int4' conflict" in capsys.readouterr().err


def test_import_registers_user_passes(tmp_path):
    plugin = tmp_path / "my_lqc_plugin.py"
    plugin.write_text(
        "from lqc.passes import Pass, PassResult, register_pass\n"
        "@register_pass\n"
        "class Noop(Pass):\n"
        "    name = 'my_noop'\n"
        "    description = 'does nothing, on purpose'\n"
        "    def run(self, graph, ctx):\n"
        "        return PassResult()\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "lqc.cli", "--import", "my_lqc_plugin", "passes"],
        capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert "my_noop: does nothing, on purpose" in result.stdout


def test_compress_saves_a_loadable_model(tmp_path, capsys):
    import torch

    import lqc

    out = tmp_path / "tiny-int8"
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"saved to {out}" in printed
    # how many modules each pass changed, from the session's pass records
    assert "passes on graph0:\n  cleanup: " in printed and "  quantize: 14 modules changed\n" in printed
    loaded = lqc.models.load(str(out))
    assert loaded.name == "tiny-int8" and type(loaded.model.model.layers[0].mlp.down_proj).__name__ == "QLinear"
    with torch.no_grad():
        assert loaded.model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
    assert main(["compress", "--model", "tiny-llama", "--recipe", "int4-awq", "--out", str(out)]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_sensitivity_needs_text_a_tokenizer_can_read(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("some text")
    assert main(["sensitivity", "--model", "tiny-llama", "--calibration", str(calib)]) == 2
    assert "text needs a tokenizer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.real_model
def test_sensitivity_on_smollm2(smollm2_for_the_cli, tmp_path, capsys):
    import json

    out = tmp_path / "ranking.json"
    # two blocks' linears (all 210 take minutes on 2 cores; the ranking code is the same)
    assert main(["sensitivity", "--tokens", "128", "--window-length", "128", "--top", "5", "--json", str(out),
                 "--targets", r"layers\.(0|29)\."]) == 0
    printed = capsys.readouterr().out
    ranking = json.loads(out.read_text())["ranking"]
    assert len(ranking) == 2 * 7 and ranking[0]["rel_error"] >= ranking[-1]["rel_error"] > 0
    assert {row["layer"].split(".")[2] for row in ranking} == {"0", "29"}
    assert ranking[0]["layer"] in printed and "rank" in printed


def test_demo_needs_a_model_with_a_tokenizer(tmp_path, capsys):
    assert main(["demo", "--model", "tiny-llama", "--cache-dir", str(tmp_path)]) == 2
    assert "lqc demo scores text and tiny-llama has no tokenizer" in capsys.readouterr().err
