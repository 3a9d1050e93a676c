"""GGUF export: one file llama.cpp, ollama and LM Studio load, written with the ``gguf`` package.

Llama-family models only (llama.cpp's ``llama`` architecture). lqc's formats map onto GGUF's
32-wide block types where they can:

| lqc | GGUF | how |
| --- | --- | --- |
| int4, group 32 | Q4_1 | lqc's own codes; ``d = s``, ``m = z - 8s`` rounded to fp16 (the only change) |
| int8, w8a8 | Q8_0 | lqc's own codes; every block of a row takes the row's scale as fp16 |
| int4, other groups; fp8 | Q4_1; Q8_0 | only with ``requantize``: re-blocked from the dequantized weight |
| float 2-D / 1-D | Q8_0 if it holds the values exactly, else F16 / F32 | embedding, unquantized head / norms, biases |

Names come from gguf's own tensor map, and q_proj/k_proj rows are permuted as llama.cpp's
converter does (its rope pairs neighbouring dimensions; transformers' GGUF loader undoes it). Every
quantized tensor is read back with ``gguf.quants.dequantize`` and compared with lqc's weight; the
report gives the largest change. Everything is converted and checked before the file is opened,
so a refusal writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

from lqc.ir.errors import LqcConfigError
from lqc.runtime.quantization.formats import QuantizedWeight, unpack_int4

from ..version import __version__
from .source import ExportSource

EXPORT_MARK = "lqc.export_version"

SUPPORTED = ("llama", "mistral")  # llama.cpp's converter writes MistralForCausalLM as llama too
QK = 32  # block width of Q4_1 and Q8_0
Q = gguf.GGMLQuantizationType
TENSOR_SUFFIXES = (".weight", ".bias")
FILE_TYPES = {Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
              Q.F16: gguf.LlamaFileType.MOSTLY_F16}


def write_gguf(source: ExportSource, path: Path, *, requantize: bool, tokenizer_gguf: Path | None) -> dict:
    """Write ``source`` as a GGUF file at ``path``; returns what each tensor became."""
    config = source.config
    _check_model(source)
    notes: list[str] = []
    tensors = _convert_tensors(source, requantize, notes)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hyperparameters(writer, config, _file_type(tensors))
    if tokenizer_gguf is not None:
        _copy_tokenizer(writer, Path(tokenizer_gguf), config["vocab_size"])
    else:
        _add_tokenizer_from_folder(writer, source.directory, config["vocab_size"], notes)
    for name, (data, qtype, _) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file(path=Path(path))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"format": "gguf", "path": str(path), "tensors": {n: entry for n, (_, _, entry) in tensors.items()},
            "notes": notes}


def _check_model(source: ExportSource) -> None:
    config = source.config
    if source.model_type not in SUPPORTED:
        raise LqcConfigError(
            f"export gguf: model type {source.model_type!r} is not supported; GGUF export handles "
            f"{' and '.join(SUPPORTED)} models (use fmt='compressed-tensors' for others)"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise LqcConfigError(f"export gguf: hidden_act {config['hidden_act']!r}; llama.cpp's llama runs silu only")
    rope_type = _rope(config)[1]
    if rope_type not in ("default", "linear"):
        raise LqcConfigError(
            f"export gguf: rope type {rope_type!r} is not supported (only default and linear); "
            f"export with fmt='compressed-tensors' instead"
        )


def _rope(config: dict) -> tuple[float, str, float | None]:
    """(theta, rope type, linear factor): transformers 5 keeps them under rope_parameters, older
    configs as rope_theta and rope_scaling."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), params.get("rope_type", params.get("type", "default")), params.get("factor")


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_hyperparameters(writer: gguf.GGUFWriter, config: dict, file_type: int) -> None:
    """The keys llama.cpp's converter writes for a Llama model."""
    heads = config["num_attention_heads"]
    head_dim = _head_dim(config)
    writer.add_name(Path(config.get("_name_or_path") or "").name or f"lqc-{config['model_type']}")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    theta, rope_type, factor = _rope(config)
    writer.add_rope_freq_base(theta)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factor))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config["hidden_size"]:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string(EXPORT_MARK, __version__)  # lets a later export replace this file, and nothing else


def _file_type(tensors: dict) -> int:
    """llama.cpp's label for the file: the type most linear weights have."""
    counts: dict = {}
    for name, (_, qtype, _) in tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and qtype in FILE_TYPES:
            counts[qtype] = counts.get(qtype, 0) + 1
    return FILE_TYPES[max(counts, key=counts.get)] if counts else gguf.LlamaFileType.MOSTLY_F16


# --- tensors -------------------------------------------------------------------------------------


def _convert_tensors(source: ExportSource, requantize: bool, notes: list[str]) -> dict[str, tuple]:
    """gguf name -> (data, GGML type, report entry), for every tensor the file holds."""
    config = source.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])

    def gguf_name(name: str) -> str:
        mapped = names.get_name(name, try_suffixes=TENSOR_SUFFIXES)
        if mapped is None:
            raise LqcConfigError(f"export gguf: GGUF's llama tensor table has no place for {name}; "
                                 f"export with fmt='compressed-tensors' instead")
        return mapped

    # llama.cpp runs a file without output.weight with token_embd as the head, as a tied model
    # does; a head lqc quantized is written as output.weight from its codes instead.
    skip_head = config.get("tie_word_embeddings", False) or "lm_head" in source.layers
    out: dict[str, tuple] = {}
    for name, tensor in source.floats.items():
        # llama.cpp computes rope frequencies from freq_base, so a stored inv_freq has no place.
        if name.endswith("rotary_emb.inv_freq") or (skip_head and name == "lm_head.weight"):
            continue
        target = gguf_name(name)
        out[target] = _float_tensor(tensor, _row_order(target, config, tensor.shape[0]))
    for layer, weight in source.layers.items():
        target = gguf_name(f"{layer}.weight")
        out[target] = _quantized_tensor(layer, weight, _row_order(target, config, weight.out_features), requantize)
    for fmt in sorted({w.format for w in source.layers.values()} & {"w8a8", "fp8_dyn"}):
        notes.append(f"{fmt} layers: GGUF stores weights only; llama.cpp's kernels quantize activations their own "
                     f"way, not per token as lqc does")
    for layer, bias in source.biases.items():
        target = gguf_name(f"{layer}.bias")
        out[target] = _float_tensor(bias, _row_order(target, config, bias.shape[0]))
    if config.get("sliding_window") and config["sliding_window"] < config["max_position_embeddings"]:
        notes.append(f"sliding_window {config['sliding_window']} is not written: llama.cpp's llama attends to "
                     f"the whole context, so outputs match only up to that many tokens")
    return out


def _row_order(gguf_name: str, config: dict, rows: int) -> torch.Tensor | None:
    """llama.cpp's q/k row permutation (each head's two rotary halves interleaved), as an index."""
    if ".attn_q." in gguf_name:
        heads = config["num_attention_heads"]
    elif ".attn_k." in gguf_name:
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    else:
        return None
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _entry(qtype, fmt: str, reference: torch.Tensor, written: np.ndarray) -> dict:
    change = float(np.abs(written.astype(np.float32) - reference.numpy()).max()) if reference.numel() else 0.0
    absmax = float(reference.abs().max()) if reference.numel() else 0.0
    return {"type": qtype.name, "source": fmt, "max_abs_change": change,
            "relative_change": change / absmax if absmax else 0.0, "exact": change == 0.0}


def _float_tensor(tensor: torch.Tensor, order: torch.Tensor | None) -> tuple:
    """F32 for 1-D tensors; a 2-D one as Q8_0 if that holds its values exactly (an embedding that
    came from a Q8_0 GGUF, as SmolLM2's did: half the bytes of F16, and llama.cpp then runs the
    same kernels as on the original file), else F16."""
    reference = tensor.detach().to(torch.float32)
    if order is not None:
        reference = reference[order]
    source = str(tensor.dtype).removeprefix("torch.")
    if reference.dim() >= 2 and reference.shape[-1] % QK == 0:
        data = gguf.quants.quantize(reference.numpy(), Q.Q8_0)
        entry = _entry(Q.Q8_0, source, reference, gguf.quants.dequantize(data, Q.Q8_0))
        if entry["exact"]:
            return data, Q.Q8_0, entry
    qtype = Q.F16 if reference.dim() >= 2 else Q.F32
    data = gguf.quants.quantize(reference.numpy(), qtype)
    return data, qtype, _entry(qtype, source, reference, data)


def _quantized_tensor(layer: str, weight: QuantizedWeight, order: torch.Tensor | None, requantize: bool) -> tuple:
    """Bytes for one quantized linear, checked by dequantizing them with gguf's own code."""
    reference = weight.dequantize(torch.float32)
    if order is not None:
        reference = reference[order]
    exact_blocks = weight.in_features % QK == 0
    if weight.format == "int4" and weight.group_size == QK and exact_blocks:
        qtype, data = Q.Q4_1, _q4_1_from_codes(weight, order)
    elif weight.format in ("int8", "w8a8") and exact_blocks:
        qtype, data = Q.Q8_0, _q8_0_from_codes(weight, order)
    else:
        _refuse_unless_requantize(layer, weight, exact_blocks, requantize)
        qtype = (Q.Q4_1 if weight.format == "int4" else Q.Q8_0) if exact_blocks else Q.F16
        data = gguf.quants.quantize(reference.numpy(), qtype)
    entry = _entry(qtype, weight.format, reference, gguf.quants.dequantize(data, qtype))
    if not np.isfinite(entry["max_abs_change"]):
        raise LqcConfigError(f"export gguf: {layer}'s scales or zero points overflow fp16 in {qtype.name}; "
                             f"quantize it with smaller weights or leave it out (ignore: [{layer}])")
    return data, qtype, entry


def _refuse_unless_requantize(layer: str, weight: QuantizedWeight, exact_blocks: bool, requantize: bool) -> None:
    if requantize:
        return
    if not exact_blocks:
        why = f"its input width {weight.in_features} is not a multiple of GGUF's block of {QK}, so it would be F16"
        instead = "leave it out of the quantize entry (ignore)"
    elif weight.format == "int4":
        why = f"GGUF has no 4-bit block of {weight.group_size} inputs (Q4_1 blocks are {QK})"
        instead = f"quantize with group_size: {QK}"
    else:
        why = f"GGUF has no {weight.format} type, so it would be re-blocked to Q8_0"
        instead = "quantize with format: int8"
    raise LqcConfigError(
        f"export gguf: {layer} ({weight.format}) cannot be written exactly: {why}. Pass requantize=True "
        f"(lqc export --requantize) to re-block it from lqc's dequantized weight and report the change, or {instead}"
    )


def _q4_1_from_codes(weight: QuantizedWeight, order: torch.Tensor | None) -> np.ndarray:
    """Q4_1 blocks (fp16 d, fp16 m, 16 bytes: element j low nibble, j + 16 high) holding lqc's codes:
    (q - 8) * s + z = d * q + m with d = s and m = z - 8s."""
    codes, scales, zeros = unpack_int4(weight.qweight), weight.scales.float(), weight.zeros.float()
    if order is not None:
        codes, scales, zeros = codes[order], scales[order], zeros[order]
    d = scales.to(torch.float16)
    m = (zeros - 8 * d.float()).to(torch.float16)  # fp16 rounding here is the export's one change
    blocks = codes.reshape(-1, 2, QK // 2).numpy()
    nibbles = blocks[:, 0, :] | (blocks[:, 1, :] << np.uint8(4))
    data = np.concatenate([_fp16_bytes(d), _fp16_bytes(m), nibbles], axis=1)
    return data.reshape(weight.out_features, -1)


def _q8_0_from_codes(weight: QuantizedWeight, order: torch.Tensor | None) -> np.ndarray:
    """Q8_0 blocks (fp16 d, 32 int8) keeping lqc's codes: each block of a row takes the row's scale,
    so the only change is that scale's fp16 rounding (re-blocking to per-block maxima would round
    every code again)."""
    codes, scales = weight.qweight, weight.scales.float()
    if order is not None:
        codes, scales = codes[order], scales[order]
    d = scales.to(torch.float16)[:, None].expand(-1, codes.shape[1] // QK)
    blocks = codes.reshape(-1, QK).numpy().view(np.uint8)
    return np.concatenate([_fp16_bytes(d), blocks], axis=1).reshape(weight.out_features, -1)


def _fp16_bytes(values: torch.Tensor) -> np.ndarray:
    return values.reshape(-1, 1).numpy().astype(np.float16).view(np.uint8)


# --- tokenizer -----------------------------------------------------------------------------------


def _copy_tokenizer(writer: gguf.GGUFWriter, path: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` field of another GGUF file (e.g. the model's original), as stored."""
    if not path.is_file():
        raise LqcConfigError(f"export gguf: tokenizer_gguf {path} is not a file")
    fields = {k: f for k, f in gguf.GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    if "tokenizer.ggml.tokens" not in fields:
        raise LqcConfigError(f"export gguf: {path} holds no tokenizer (no tokenizer.ggml.tokens)")
    count = len(fields["tokenizer.ggml.tokens"].data)
    if count != vocab_size:
        raise LqcConfigError(f"export gguf: {path}'s tokenizer has {count} tokens but the model's vocabulary "
                             f"is {vocab_size}; pass the GGUF of this model's own tokenizer")
    for key, field in fields.items():
        kind, sub = field.types[0], field.types[-1]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, _array_items(field, sub), kind, sub_type=sub)
        elif kind == gguf.GGUFValueType.STRING:  # raw bytes: a token need not be valid UTF-8
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), kind)
        else:
            writer.add_key_value(key, field.parts[field.data[0]][0].item(), kind)


def _array_items(field, sub) -> list:
    if sub == gguf.GGUFValueType.STRING:
        return [bytes(field.parts[i]) for i in field.data]
    if sub == gguf.GGUFValueType.ARRAY:
        raise LqcConfigError(f"export gguf: {field.name} is an array of arrays, which lqc cannot copy")
    return [field.parts[i][0].item() for i in field.data]


def _add_tokenizer_from_folder(writer: gguf.GGUFWriter, directory: Path, vocab_size: int, notes: list[str]) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's ``gpt2`` tokenizer; others are refused."""
    found = sorted(p.name for p in directory.glob("*") if p.name.startswith(("tokenizer", "vocab", "merges"))
                   or p.suffix == ".model")
    if not found:
        notes.append("no tokenizer was saved with the checkpoint, so the file has none: llama.cpp cannot run "
                     "it as is; save with lqc.save(model, dir, tokenizer=...) or pass tokenizer_gguf")
        return
    data = json.loads((directory / "tokenizer.json").read_text()) if "tokenizer.json" in found else {}
    if (data.get("model") or {}).get("type") != "BPE" or not _byte_level(data):
        raise LqcConfigError(
            f"export gguf: lqc builds GGUF tokenizers only from byte-level BPE tokenizer.json files (GPT-2, "
            f"SmolLM2, Llama 3); this checkpoint has {', '.join(found)}. Pass tokenizer_gguf=<a GGUF file of "
            f"this model> (lqc export --tokenizer-gguf PATH) to copy its tokenizer"
        )
    tokens, types = _vocabulary(data, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise LqcConfigError(f"export gguf: {directory / 'tokenizer.json'} has no BPE merges; pass tokenizer_gguf")
    # llama.cpp adds BOS to a gpt2-model prompt unless told not to; say what the HF tokenizer does.
    special.add_special_token.setdefault("bos", _adds_bos(data))
    special.add_to_gguf(writer, quiet=True)
    notes.append("tokenizer built from tokenizer.json without tokenizer.ggml.pre: llama.cpp splits text with its "
                 "default pre-tokenizer; pass tokenizer_gguf (the model's own GGUF) for its exact one")


def _byte_level(data: dict) -> bool:
    """GPT-2 style tokens (bytes mapped to printable characters), which llama.cpp's gpt2 model expects."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _adds_bos(data: dict) -> bool:
    """Whether the tokenizer's post-processor puts a special token before the text."""
    post = data.get("post_processor") or {}
    steps = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    templates = [step["single"] for step in steps if step.get("type") == "TemplateProcessing"]
    return bool(templates) and "SpecialToken" in templates[0][0]


def _vocabulary(data: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id and their types, padded with unused placeholders up to the embedding's size."""
    tokens: dict[int, str] = {i: t for t, i in data["model"]["vocab"].items()}
    types = {i: gguf.TokenType.NORMAL for i in tokens}
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise LqcConfigError(f"export gguf: the tokenizer has token id {max(tokens)} but the model's vocabulary is "
                             f"{vocab_size}; save the model with its own tokenizer")
    by_id = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [int(types.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return by_id, kinds
