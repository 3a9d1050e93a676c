"""lqc.export(..., "gguf"): Q4_1/Q8_0 from lqc's own codes, read back by gguf and by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lqc
import lqc.models
from lqc.exporters import export
from lqc.ir import LqcConfigError

gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

FP16_HALF_ULP = 2.0**-11  # rounding to fp16 moves a value by at most this much of itself
HEADS, KV_HEADS = 4, 2  # tiny-llama
TEXT = "the cat sat on the mat. the dog sat on the log."


def _tiny_tokenizer():
    """A byte-level BPE tokenizer of about 60 tokens (fewer than tiny-llama's 256 rows: the export
    pads the rest), so building the GGUF vocabulary is tested in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _checkpoint(root, quantize: dict, tokenizer=None):
    compressed = lqc.compress(lqc.models.load("tiny-llama").model, [{"pass": "quantize", **quantize}], progress=False)
    return lqc.save(compressed, root / "checkpoint", tokenizer=tokenizer)


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-int4")
    tokenizer = _tiny_tokenizer()
    checkpoint = _checkpoint(root, {"format": "int4", "group_size": 32}, tokenizer)
    report = export(checkpoint, "gguf", root / "out" / "m.gguf")
    return checkpoint, root / "out" / "m.gguf", report, tokenizer


@pytest.fixture(scope="module")
def int8(tmp_path_factory, int4):
    root = tmp_path_factory.mktemp("gguf-int8")
    checkpoint = _checkpoint(root, {"format": "int8", "kernels": False})
    # The int4 export's tokenizer stands in for a model's own GGUF (SmolLM2's takes seconds to read).
    report = export(checkpoint, "gguf", root / "out" / "m.gguf", tokenizer_gguf=int4[1])
    return checkpoint, root / "out" / "m.gguf", report


def _unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order, written as transformers' GGUF loader does it."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _read_back(path) -> dict:
    """gguf name -> (type name, float32 weight in lqc's row order, raw bytes)."""
    out = {}
    for tensor in gguf.GGUFReader(path).tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if ".attn_q." in tensor.name or ".attn_k." in tensor.name:
            weight = _unpermute(weight, HEADS if ".attn_q." in tensor.name else KV_HEADS)
        out[tensor.name] = (tensor.tensor_type.name, weight, np.asarray(tensor.data))
    return out


def _gguf_name(layer: str) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(layer)


def _served_like_lqc(checkpoint, path, report) -> tuple[float, float]:
    """transformers' GGUF loader against lqc.load (float32): each linear's weight moved by no more
    than the report says (q/k rows back in transformers' order), and (max |logit difference|, max |logit|)."""
    from transformers import AutoModelForCausalLM

    served = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    for layer, weight in lqc.exporters.source.read_source(checkpoint).layers.items():
        change = (served.get_submodule(layer).weight - weight.dequantize()).abs().max()
        assert change <= report["tensors"][f"{_gguf_name(layer)}.weight"]["max_abs_change"] + 1e-7, layer
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lqc.load(checkpoint)(ids).logits
        got = served(ids).logits
    return float((got - expected).abs().max()), float(expected.abs().max())


def test_int4_g32_is_q4_1_holding_lqc_codes(int4):
    checkpoint, path, report, _ = int4
    source = lqc.exporters.source.read_source(checkpoint)
    back = _read_back(path)
    assert {name: kind for name, (kind, _, _) in back.items() if not name.startswith("blk.")} == {
        "token_embd.weight": "F16", "output_norm.weight": "F32"}  # tied head: no output.weight
    assert {kind for name, (kind, _, _) in back.items() if name.endswith("norm.weight")} == {"F32"}
    assert len(source.layers) == 14
    for layer, weight in source.layers.items():
        name = f"{_gguf_name(layer)}.weight"
        kind, written, raw = back[name]
        assert kind == "Q4_1" and report["tensors"][name]["source"] == "int4"
        # The only change is m = z - 8s rounded to fp16: per block at most |m| * 2^-11 (plus float32
        # rounding of the two dequantizations, far below 1e-6 here).
        m = np.abs(raw.reshape(-1, 20)[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(-1)
        if ".attn_q." in name or ".attn_k." in name:
            m = _unpermute(m.reshape(weight.out_features, -1), HEADS if ".attn_q." in name else KV_HEADS).reshape(-1)
        error = np.abs(written - weight.dequantize().numpy()).reshape(-1, 32).max(axis=1)
        assert (error <= m * FP16_HALF_ULP + 1e-6).all(), layer
        assert report["tensors"][name]["max_abs_change"] == pytest.approx(float(error.max()), abs=1e-7)
    assert any("pre-tokenizer" in note for note in report["notes"])


def test_transformers_loads_the_int4_export_with_the_same_logits_and_tokenizer(int4):
    from transformers import AutoTokenizer

    checkpoint, path, report, tokenizer = int4
    difference, scale = _served_like_lqc(checkpoint, path, report)
    # Weights move by at most 2^-11 of themselves (fp16 embedding, fp16 m): measured ~2e-3 of the
    # largest logit. (The weight check above is what catches a wrong q/k row order: in a random
    # tiny model it moves the logits by only ~5e-3.)
    assert difference < 1e-2 * scale
    served = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert served(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert served.eos_token == "<|endoftext|>"


def test_int8_is_q8_0_with_lqc_codes_and_a_copied_tokenizer(int4, int8):
    checkpoint, path, report = int8
    source = lqc.exporters.source.read_source(checkpoint)
    back = _read_back(path)
    for layer, weight in source.layers.items():
        name = f"{_gguf_name(layer)}.weight"
        kind, written, _ = back[name]
        expected = weight.dequantize().numpy()
        assert kind == "Q8_0" and report["tensors"][name]["source"] == "int8"
        # lqc's codes with the row's scale in fp16: the change is under 2^-11 of the weight's absmax.
        assert np.abs(written - expected).max() <= FP16_HALF_ULP * np.abs(expected).max() * 1.001
        assert report["tensors"][name]["relative_change"] <= FP16_HALF_ULP * 1.001
    difference, scale = _served_like_lqc(checkpoint, path, report)
    assert difference < 1e-2 * scale
    mine = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    theirs = {k: f.contents() for k, f in gguf.GGUFReader(int4[1]).fields.items() if k.startswith("tokenizer.")}
    assert mine == theirs and len(mine["tokenizer.ggml.tokens"]) == 256
    assert mine["tokenizer.ggml.model"] == "gpt2" and not mine["tokenizer.ggml.add_bos_token"]  # as the HF tokenizer


def test_int4_g64_needs_requantize(tmp_path):
    checkpoint = _checkpoint(tmp_path, {"format": "int4", "group_size": 64})
    target = tmp_path / "out" / "m.gguf"
    with pytest.raises(LqcConfigError, match="requantize"):
        export(checkpoint, "gguf", target)
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # nothing left behind
    report = export(checkpoint, "gguf", target, requantize=True)
    back = _read_back(target)
    source = lqc.exporters.source.read_source(checkpoint)
    for layer, weight in source.layers.items():
        name = f"{_gguf_name(layer)}.weight"
        entry = report["tensors"][name]
        assert entry["type"] == back[name][0] == "Q4_1" and entry["source"] == "int4" and not entry["exact"]
        measured = np.abs(back[name][1] - weight.dequantize().numpy()).max()
        assert 0 < entry["max_abs_change"] == pytest.approx(float(measured), abs=1e-7)


def test_refusals(tmp_path, int4):
    checkpoint = int4[0]
    with pytest.raises(LqcConfigError, match="256"):  # a tokenizer of another size is refused
        export(checkpoint, "gguf", tmp_path / "a.gguf", tokenizer_gguf=_small_tokenizer_gguf(tmp_path))
    assert not (tmp_path / "a.gguf").exists()
    source = lqc.exporters.source.read_source(checkpoint)
    source.config["model_type"] = "gpt2"
    from lqc.exporters.gguf import write_gguf

    with pytest.raises(LqcConfigError, match="llama and mistral"):
        write_gguf(source, tmp_path / "b", requantize=False, tokenizer_gguf=None)


def _small_tokenizer_gguf(directory):
    writer = gguf.GGUFWriter(directory / "tok.gguf", "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return directory / "tok.gguf"
