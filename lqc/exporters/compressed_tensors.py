"""An lqc model as a compressed-tensors checkpoint: what llm-compressor writes, vLLM and transformers load.

Each quantized linear becomes the compressed-tensors scheme that holds lqc's parameters as they are,
written by the compressed-tensors package's own compressors (never re-implemented packing):

| lqc format | scheme | compressed-tensors format |
| --- | --- | --- |
| ``int8`` (per channel) | W8A16, int8 symmetric, strategy channel | ``pack-quantized`` |
| ``int4`` group g | W4A16, int4 strategy group, symmetric or with integer zero points | ``pack-quantized`` |
| ``w8a8`` | int8 channel weights, dynamic per-token int8 activations | ``int-quantized`` |
| ``fp8`` / ``fp8_dyn`` | float8 e4m3 channel weights (``fp8_dyn``: dynamic per-token fp8 activations) | ``float-quantized`` |

compressed-tensors dequantizes int4 as ``(c - zp) * s`` with an integer zp; lqc's ``(c - 8) * s + z``
is the same weight when ``z = -zp * s`` (``quantize`` with ``zero_point: integer`` or ``symmetric``).
lqc's default float zero points cannot be written exactly: the export refuses them unless
``requantize`` is asked for, and then re-rounds the codes to the nearest integer zero point and
reports how far each weight moved. Every layer is checked before anything is written: the integer
codes, zero points and scales the compressor wrote must be lqc's own, bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from lqc.ir.errors import LqcConfigError
from lqc.runtime.quantization.formats import INT4_OFFSET, QuantizedWeight, integer_zero_points, quantize_int4, unpack_int4

from ..checkpoint import MANIFEST, TENSORS
from ..version import __version__
from .source import ExportSource

INSTALL = "pip install 'lqc[export]' (compressed-tensors==0.17.1)"


def write_compressed_tensors(source: ExportSource, folder: Path, *, requantize: bool) -> dict:
    """Write ``source`` into the (empty) ``folder``: model.safetensors, config.json with its
    ``quantization_config``, and the tokenizer's files. Returns the per-layer report."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError as e:
        raise LqcConfigError(f"export to compressed-tensors needs the compressed-tensors package: {INSTALL}") from e
    tensors = {name: t for name, t in source.floats.items() if name.rpartition(".")[0] not in source.layers}
    tensors = _drop_tied_head(source, tensors)
    groups: dict[tuple, dict] = {}
    report: dict = {"format": "compressed-tensors", "layers": {}, "requantized": []}
    for layer, q in source.layers.items():  # every layer first: a refusal leaves nothing written
        q, change = _exactly_writable(layer, q, requantize)
        if change is not None:
            report["requantized"].append(layer)
        scheme_key, scheme = _scheme(q)
        group = groups.setdefault(scheme_key, {"scheme": scheme, "targets": []})
        group["targets"].append(layer)
        compressed = _compress(layer, q, scheme)
        tensors.update({f"{layer}.{name}": t for name, t in compressed.items()})
        if layer in source.biases:
            tensors[f"{layer}.bias"] = source.biases[layer]
        report["layers"][layer] = {"scheme": _describe(scheme_key), "exact": change is None, "max_abs_change": change or 0.0}
    config_groups = {}
    for i, group in enumerate(groups.values()):
        group["scheme"].targets = group["targets"]
        config_groups[f"group_{i}"] = group["scheme"]
    formats = {group["scheme"].format for group in groups.values()}
    ignore = _float_linears(source)
    quantization = QuantizationConfig(
        config_groups=config_groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed", ignore=ignore,
    )
    report["ignore"] = ignore
    _write(source, folder, tensors, quantization)
    return report


def _exactly_writable(layer: str, q: QuantizedWeight, requantize: bool) -> tuple[QuantizedWeight, float | None]:
    """(the weight to write, None) when compressed-tensors holds it as it is; with ``requantize`` an
    int4 weight of float zero points re-rounded to integer ones, and the largest weight change."""
    if q.format != "int4" or integer_zero_points(q) is not None:
        return q, None
    if not requantize:
        raise LqcConfigError(
            f"export: {layer} has lqc's float int4 zero points, which compressed-tensors cannot hold (it stores "
            f"integers). Compress with zero_point: integer (or symmetric) in the recipe's quantize entry, or export "
            f"with --requantize (requantize=True) to re-round the codes to integer zero points, which moves the weights"
        )
    weight = q.dequantize()
    fitted = quantize_int4(weight, q.group_size, q.scales, q.zeros, param_dtype=q.scales.dtype, zero_point="integer")
    return fitted, float((fitted.dequantize() - weight).abs().max())


def _scheme(q: QuantizedWeight):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if q.format == "int4":
        symmetric = bool((q.zeros == 0).all())
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=written_group(q))
        return ("int4", q.group_size, symmetric, written_group(q)), QuantizationScheme(targets=[], weights=weights, format="pack-quantized")
    float_type = q.format in ("fp8", "fp8_dyn")
    weights = QuantizationArgs(num_bits=8, type="float" if float_type else "int", symmetric=True, strategy="channel")
    activations = None
    if q.format in ("w8a8", "fp8_dyn"):
        activations = QuantizationArgs(num_bits=8, type=weights.type, symmetric=True, strategy="token", dynamic=True)
    fmt = "float-quantized" if float_type else "int-quantized" if q.format == "w8a8" else "pack-quantized"
    return (q.format,), QuantizationScheme(targets=[], weights=weights, input_activations=activations, format=fmt)


def _describe(key: tuple) -> str:
    if key[0] == "int4":
        split = f", written as g{key[3]} groups repeating each group's parameters" if key[3] != key[1] else ""
        return f"W4A16 int4 g{key[1]} {'symmetric' if key[2] else 'integer zero points'}{split}"
    return {"int8": "W8A16 int8 channel", "w8a8": "W8A8 int8 channel, dynamic per-token int8 activations",
            "fp8": "FP8 channel weights", "fp8_dyn": "FP8 channel weights, dynamic per-token fp8 activations"}[key[0]]


def _compress(layer: str, q: QuantizedWeight, scheme) -> dict[str, torch.Tensor]:
    """The layer's tensors as compressed-tensors' own compressor writes them, checked to hold lqc's
    codes, zero points and scales exactly."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    state = {"weight": q.dequantize(torch.float32), "weight_scale": q.scales[:, None]}
    if q.format == "int4":
        state["weight_scale"] = _per_written_group(q, q.scales)
        if not scheme.weights.symmetric:
            state["weight_zero_point"] = _per_written_group(q, integer_zero_points(q))
    compressed = compressor.compress(state, scheme)
    _check_codes(layer, q, compressed, scheme)
    return {name: t.contiguous() for name, t in compressed.items()}


def written_group(q: QuantizedWeight) -> int:
    """The group size compressed-tensors stores: lqc's, or where it does not divide the true width (lqc
    pads the last group: 576 inputs in groups of 128) the largest size dividing both. Each lqc group
    is then several written groups with the same scale and zero point: the same weights, exactly."""
    return math.gcd(q.group_size, q.in_features)


def _per_written_group(q: QuantizedWeight, params: torch.Tensor) -> torch.Tensor:
    """[N, groups of lqc] -> [N, groups of written_group(q)] over the true width."""
    repeat = q.group_size // written_group(q)
    return params.repeat_interleave(repeat, dim=1)[:, : q.in_features // written_group(q)].contiguous()


def _check_codes(layer: str, q: QuantizedWeight, compressed: dict, scheme) -> None:
    if q.format == "int4":
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        codes = unpack_from_int32(compressed["weight_packed"], 4, torch.Size((q.out_features, q.in_features)))
        expected = unpack_int4(q.qweight)[:, : q.in_features].to(torch.int8) - INT4_OFFSET
    elif q.format in ("fp8", "fp8_dyn"):
        codes, expected = compressed["weight"].view(torch.uint8), q.qweight.view(torch.uint8)
    else:
        packed = compressed.get("weight_packed")
        codes = compressed["weight"] if packed is None else _unpack8(packed, q)
        expected = q.qweight
    if not torch.equal(codes.to(torch.int32), expected.to(torch.int32)):
        wrong = int((codes.to(torch.int32) != expected.to(torch.int32)).sum())
        raise LqcConfigError(f"export: compressed-tensors wrote {wrong} codes of {layer} differently from lqc's; "
                             f"this is a bug in the exporter (scheme {scheme.weights})")


def _unpack8(packed: torch.Tensor, q: QuantizedWeight) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, 8, torch.Size((q.out_features, q.in_features)))


def _drop_tied_head(source: ExportSource, tensors: dict) -> dict:
    """A tied lm_head is the embedding: transformers re-ties it from the config, so it is stored once."""
    if source.config.get("tie_word_embeddings") and "lm_head" not in source.layers:
        tensors = {name: t for name, t in tensors.items() if name != "lm_head.weight"}
    return tensors


def _float_linears(source: ExportSource) -> list[str]:
    """Linear modules that stayed float (the lm_head, say): compressed-tensors' ``ignore`` list."""
    from lqc.serialize import _empty_model

    with torch.device("meta"):
        model, _ = _empty_model(source.directory / MANIFEST, {"architecture": source.architecture, "config": source.config})
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in source.layers]


def _write(source: ExportSource, folder: Path, tensors: dict, quantization) -> None:
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / TENSORS), metadata={"format": "pt"})
    # lqc_export marks the folder as an export, which a later export may replace (and nothing else)
    config = dict(source.config, architectures=[source.architecture], lqc_export=__version__)
    config["quantization_config"] = {**quantization.model_dump(mode="json"), "quant_method": "compressed-tensors"}
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    for path in source.directory.iterdir():  # the tokenizer's files, as lqc.save stored them
        if path.is_file() and path.name not in (MANIFEST, TENSORS):
            shutil.copy2(path, folder / path.name)
