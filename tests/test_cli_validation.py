"""`lqc` checks every argument before it loads a model: a bad one is exit code 2, "lqc: error: ..."
naming the fix, within a second, and no model is ever loaded."""

from __future__ import annotations

import time

import pytest

import lqc.demo
import lqc.models
from lqc.cli import main


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded before the arguments were checked: {args}")

    monkeypatch.setattr(lqc.models, "load", refuse)
    monkeypatch.setattr(lqc.demo, "run_demo", refuse)  # lqc demo loads its model in run_demo


def _refused(argv: list[str], capsys) -> str:
    started = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - started < 1.0
    captured = capsys.readouterr()
    assert captured.err.startswith("lqc: error: ") and captured.out == ""
    return captured.err


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("some text")
    return str(path)


def test_unknown_recipe_suggests_the_nearest_before_the_model_loads(capsys):
    # the case: this loaded SmolLM2 and ran the float32 baseline for 86 s before failing
    err = _refused(["eval", "--model", "smollm2-135m", "--recipe", "int9"], capsys)
    assert "no named recipe 'int9'. Did you mean 'int8'?" in err and "Shipped recipes:" in err


def test_unknown_recipe_in_a_composition(capsys):
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "moe+int9", "--out", "x"], capsys)
    assert "no named recipe 'int9'. Did you mean 'int8'?" in err


def test_missing_recipe_file(capsys):
    err = _refused(["bench", "--model", "tiny-llama", "--recipe", "my/recipe.yaml"], capsys)
    assert "recipe 'my/recipe.yaml' is neither a named recipe nor a file" in err


def test_bad_inline_recipe_yaml(capsys):
    err = _refused(["viz", "--model", "tiny-llama", "--recipe", "[{pass: cleanup}"], capsys)
    assert "is not valid inline YAML" in err and "--recipe '[{pass: cleanup}" in err


def test_unknown_pass_option_in_inline_recipe(capsys):
    err = _refused(["eval", "--model", "smollm2-135m", "--recipe", "[{pass: quantize, group: 64}]"], capsys)
    assert "pass 'quantize' has no option 'group'" in err


def test_invalid_targets_regex_in_recipe(capsys):
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "[{pass: quantize, targets: ['mlp.(']}]",
                    "--out", "x"], capsys)
    assert "targets entry 'mlp.(' is not a valid regular expression" in err and "escape" in err


def test_recipe_needing_calibration_without_it(capsys, tmp_path):
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "int4-awq", "--out", str(tmp_path / "o")], capsys)
    assert "needs calibration data" in err and "add --calibration calib" in err


def test_recipe_lqc_save_cannot_store(capsys, tmp_path):
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "int8+kv-int8", "--out", str(tmp_path / "o")], capsys)
    assert "also has compress_kv" in err and "lqc eval" in err


def test_unknown_model_suggests_the_nearest(capsys):
    err = _refused(["eval", "--model", "smolm2-135m", "--recipe", "int8"], capsys)
    assert "--model: cannot load 'smolm2-135m': no such model name or path. Did you mean 'smollm2-135m'?" in err
    assert "tiny-llama" in err and ".gguf" in err


def test_model_folder_without_a_config(capsys, tmp_path):
    err = _refused(["kv", "--model", str(tmp_path)], capsys)
    assert "a folder without config.json or lqc.json" in err


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--windows", "0"], "--windows must be a positive integer; got 0"),
    (["eval", "--threads", "-1"], "--threads must be a positive integer; got -1"),
    (["eval", "--window-length", "1"], "--window-length must be at least 2"),
    (["eval", "--gen-prompts", "-2"], "--gen-prompts must be 0 or more"),
    (["bench", "--decode-tokens", "0"], "--decode-tokens must be a positive integer"),
    (["bench", "--profile", "--profile-steps", "0"], "--profile-steps must be a positive integer"),
    (["sensitivity", "--tokens", "0"], "--tokens must be a positive integer"),
    (["demo", "--windows", "0"], "--windows must be a positive integer"),
    (["viz", "--tokens", "-5"], "--tokens must be a positive integer"),
    (["kv", "--context", "2048", "0"], "--context must be at least 1 token"),
])
def test_bad_numbers(argv, flag, capsys):
    assert flag in _refused(argv, capsys)


def test_bad_group_size_for_sensitivity(capsys):
    err = _refused(["sensitivity", "--model", "tiny-llama", "--group-size", "48"], capsys)
    assert "group_size must be one of 32, 64, 128, 256 for int4; got 48" in err


def test_bad_kv_options(capsys):
    assert "KV bits must be one of 8, 4, 2; got 3" in _refused(["kv", "--model", "tiny-llama", "--bits", "3"], capsys)
    assert "--bits/--group/--residual/--sinks/--window: residual and sinks must be >= 0" in _refused(
        ["kv", "--model", "tiny-llama", "--sinks", "-1"], capsys)


def test_unknown_target(capsys):
    err = _refused(["bench", "--model", "tiny-llama", "--target", "gpu"], capsys)
    assert "--target must be one of auto, inductor, eager, triton; got 'gpu'" in err


def test_missing_text_and_calibration_files(capsys, tmp_path):
    missing = str(tmp_path / "nope.txt")
    err = _refused(["eval", "--text", missing], capsys)
    assert f"--text '{missing}': no such file" in err and "give 'eval' or 'calib'" in err
    err = _refused(["eval", "--calibration", missing], capsys)
    assert f"--calibration '{missing}': no such file" in err
    err = _refused(["sensitivity", "--calibration", missing], capsys)
    assert "--calibration" in err and "no such file" in err


def test_output_paths(capsys, text_file, tmp_path):
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "int8", "--out", text_file], capsys)
    assert "--out" in err and "is a file; give a folder to write into" in err
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "int8", "--out", f"{text_file}/sub/out"], capsys)
    assert "is a file, so nothing can be written under it" in err
    err = _refused(["viz", "--model", "tiny-llama", "--out", str(tmp_path)], capsys)
    assert "is a folder; give a file path" in err
    err = _refused(["eval", "--json", f"{text_file}/results.json"], capsys)
    assert "--json" in err and "is a file, so nothing can be written under it" in err


def test_svg_needs_dot(capsys):
    assert "--svg renders the --dot file: pass --dot too" in _refused(["viz", "--svg", "graph.svg"], capsys)


def test_text_on_a_model_without_a_tokenizer(capsys, text_file):
    err = _refused(["compress", "--model", "tiny-llama", "--recipe", "int8", "--calibration", text_file, "--out", "x"], capsys)
    assert "text needs a tokenizer" in err and "smollm2-135m" in err
    assert "lqc demo scores text and tiny-llama has no tokenizer" in _refused(["demo", "--model", "tiny-llama"], capsys)
    err = _refused(["viz", "--model", "tiny-gpt2", "--calibration", text_file, "--tokens", "0"], capsys)
    assert "--tokens must be a positive integer" in err  # numbers first
    err = _refused(["viz", "--model", "tiny-gpt2", "--calibration", text_file], capsys)
    assert "--calibration is text and tiny-gpt2 has no tokenizer" in err
