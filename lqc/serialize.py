"""``lqc.save(model, dir)`` and ``lqc.load(dir)``: a compressed model on disk, without pickle.

The directory holds:

- ``model.safetensors``: every float tensor of the model's state dict as compression left it
  (scale migrations such as AWQ's and SmoothQuant's change norm weights), and per quantized
  linear its canonical ``{layer}.qweight``, ``.scales`` and ``.zeros`` (lqc.runtime.quantization.formats);
- ``lqc.json``: the manifest: lqc and format versions, the recipe, the model's architecture and
  configuration, and per quantized layer its format, group size, shape and kernel layout (the
  qlinear fmt the compressed graph ran: the canonical format, or the packed CPU layout the
  pack_cpu_layouts lowering chose, which ``load`` rebuilds from the canonical tensors);
- the tokenizer's own files (JSON, chat template), when one was given.

``load`` builds the model from its configuration, puts a ``QLinear`` module (which calls
``lqc::qlinear`` with the same constants the compressed graph used) where each quantized linear
was, and loads the tensors: no calibration, no quantization, and the same logits. Only recipes
made of ``cleanup``, ``drop_layers`` and ``quantize`` passes can be saved (other passes change
the graph in ways a state dict does not hold), and only models returned by ``lqc.compress``.
A dropped sublayer's weights are not written; the manifest lists its modules (``dropped``), and
``load`` puts stand-ins there (lqc.runtime.structural.dropped_layers): zeros for an attention or FFN, the
identity for the norm that fed it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lqc.ir import op_name
from lqc.ir.errors import LqcConfigError, LqcError
from lqc.passes import recipe_entries
from lqc.passes.lowering import packed_layout
from lqc.runtime.structural.dropped_layers import DroppedAttention, DroppedMLP, keep_dropped_layers_out_of_caches
from lqc.runtime.kv.cache import attention_head_dim
from lqc.runtime.quantization.qlinear import KERNEL_LAYOUTS, QLinear
from lqc.runtime.quantization.formats import QuantizedWeight

from .compress import dropped_attention_layers
from .version import __version__

FORMAT = "lqc-compressed-model"
FORMAT_VERSION = 1
MANIFEST = "lqc.json"
TENSORS = "model.safetensors"
SAVABLE_PASSES = ("cleanup", "drop_layers", "quantize")
QUANT_FORMATS = ("int8", "int4", "w8a8", "fp8", "fp8_dyn")
DROPPED_KINDS = ("attention", "mlp", "norm")


def save(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a model returned by ``lqc.compress`` to ``directory`` (created if needed)."""
    from safetensors.torch import save_file

    compression = getattr(model, "_lqc_compression", None)
    if compression is None or not compression.graphs:
        raise LqcConfigError("lqc.save needs a model returned by lqc.compress(model, recipe, ...); compress it first")
    recipe = recipe_entries(compression.session.recipe)  # as the session resolved it, once
    unsupported = sorted({entry["pass"] for entry in recipe} - set(SAVABLE_PASSES))
    if unsupported:
        raise LqcConfigError(
            f"lqc.save stores recipes of {', '.join(SAVABLE_PASSES)} passes; this one also has {', '.join(unsupported)}"
        )
    if any(entry.get("include_embedding") for entry in recipe):
        raise LqcConfigError("lqc.save does not store int8 embedding tables yet: compress without include_embedding to save")

    floats, layers = _compressed_state(compression.graphs[0], packed=compression.target != "triton")
    dropped = dict(compression.dropped_modules)
    state = _state_to_write(model, floats, layers, dropped)
    tensors, aliases = _unique_tensors(state)
    manifest_layers = {}
    for layer, info in layers.items():
        q: QuantizedWeight = info["canonical"]
        for part in ("qweight", "scales", "zeros"):
            if getattr(q, part) is not None:
                tensors[f"{layer}.{part}"] = getattr(q, part).contiguous()
        manifest_layers[layer] = {
            "format": q.format, "group_size": q.group_size, "in_features": q.in_features,
            "out_features": q.out_features, "kernel": info["kernel"], "bias": info["bias"],
        }

    config = getattr(model, "config", None)
    if config is None or not getattr(config, "architectures", None) and not hasattr(config, "model_type"):
        raise LqcConfigError("lqc.save stores Hugging Face models (a `config` with `model_type`); this model has none")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "lqc_version": __version__, "torch_version": torch.__version__,
        "recipe": recipe, "target": compression.target,
        "model": {"architecture": type(model).__name__, "config": config.to_dict()},
        "aliases": aliases, "layers": manifest_layers, "dropped": dropped,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / TENSORS), metadata={"format": FORMAT})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_json_default) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory


def _state_to_write(model: torch.nn.Module, floats: dict[str, torch.Tensor], layers: dict, dropped: dict) -> dict[str, torch.Tensor]:
    """The model's state dict with the compressed graph's float constants in, without the weights
    of quantized layers (stored in their canonical form) and of dropped sublayers."""
    state = {name: t for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    for path in dropped:  # a dropped sublayer's weights are not stored; load puts stand-ins there
        still_used = [name for name in floats if name.startswith(path + ".")]
        if still_used:
            raise LqcError(f"lqc.save: {path} was dropped but the compressed graph still uses {still_used[0]}")
        state = {name: t for name, t in state.items() if not name.startswith(path + ".")}
    for name, tensor in floats.items():
        if name not in state:
            if _unchanged_attribute(model, name, tensor):
                continue  # a non-persistent buffer (rotary frequencies): the model rebuilds it
            raise LqcError(f"lqc.save: the compressed graph changed {name}, which the model's state dict does not hold")
        if tensor.shape != state[name].shape or tensor.dtype != state[name].dtype:
            raise LqcError(f"lqc.save: {name} is {tuple(tensor.shape)} {tensor.dtype} in the compressed graph, "
                           f"{tuple(state[name].shape)} {state[name].dtype} in the model")
        state[name] = tensor
    for layer in layers:
        state.pop(f"{layer}.weight", None)

    return state


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors to write, {alias: the name it is written under}): tied weights are stored once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple, str] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in by_storage:
            aliases[name] = by_storage[key]
            continue
        by_storage[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def load(directory: str | Path) -> torch.nn.Module:
    """The model ``save`` wrote, as an eager module; compile it like any other."""
    import transformers
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    model_info = manifest["model"]
    architecture = getattr(transformers, model_info["architecture"], None)
    if architecture is None:
        raise LqcConfigError(
            f"{directory}: architecture {model_info['architecture']!r} is not in transformers {transformers.__version__}"
        )
    config_dict = dict(model_info["config"])
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    model = architecture(config).eval()

    tensors = load_file(str(directory / TENSORS))
    for layer, info in manifest["layers"].items():
        q = QuantizedWeight(
            info["format"], tensors.pop(f"{layer}.qweight"), tensors.pop(f"{layer}.scales"),
            tensors.pop(f"{layer}.zeros", None), info["group_size"], info["in_features"],
        )
        bias = tensors.get(f"{layer}.bias")
        parent_name, _, child = layer.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QLinear(q, info["kernel"], bias))
    dropped = manifest.get("dropped", {})  # absent from files written before layer dropping could be saved
    for path, info in dropped.items():
        parent_name, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_name), child, _stand_in(info, config))
    for alias, name in manifest["aliases"].items():
        tensors[alias] = tensors[name]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k.rpartition(".")[0] not in manifest["layers"]]  # QLinear buffers: set above
    if missing or unexpected:
        raise LqcError(f"{directory}: the saved tensors do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    keep_dropped_layers_out_of_caches(model, dropped_attention_layers(dropped))
    return model


def _stand_in(info: dict, config) -> torch.nn.Module:
    """The module that replaces a dropped attention, FFN or norm: zeros, zeros, and the identity
    (a norm that only fed a dropped sublayer; its output is not used)."""
    if info["kind"] == "attention":
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return DroppedAttention(info["block"], kv_heads, attention_head_dim(config))
    if info["kind"] == "mlp":
        return DroppedMLP()
    return torch.nn.Identity()


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a saved model, checked: a clear error for anything this lqc cannot read."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise LqcConfigError(f"{directory} holds no {MANIFEST}: not a model written by lqc.save")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise LqcConfigError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LqcConfigError(
            f"{path}: written by lqc {manifest.get('lqc_version')} in format version {manifest.get('format_version')}; "
            f"lqc {__version__} reads version {FORMAT_VERSION}. Load it with that lqc version, or compress and save again"
        )
    missing = [key for key in ("model", "layers", "aliases") if key not in manifest]
    if missing or not {"architecture", "config"} <= set(manifest.get("model", {})):
        raise LqcConfigError(f"{path}: the manifest lacks {missing or ['model.architecture/config']}; it is damaged: save the model again")
    for module, info in manifest.get("dropped", {}).items():
        if not isinstance(info, dict) or info.get("kind") not in DROPPED_KINDS or not isinstance(info.get("block"), int):
            raise LqcConfigError(
                f"{path}: dropped module {module} is {info!r}; this lqc knows dropped kinds {', '.join(DROPPED_KINDS)} "
                f"with a block index. The manifest is damaged: save the model again"
            )
    for layer, info in manifest["layers"].items():
        if info.get("format") not in QUANT_FORMATS or info.get("kernel") not in KERNEL_LAYOUTS:
            raise LqcConfigError(
                f"{path}: layer {layer} has format {info.get('format')!r} / kernel {info.get('kernel')!r}; "
                f"this lqc knows formats {', '.join(QUANT_FORMATS)} and kernels {', '.join(KERNEL_LAYOUTS)}"
            )
    return manifest


def _compressed_state(graph, packed: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(float constants by module path, quantized layers) of a graph after the recipe's passes.
    A layer's kernel is the qlinear format the model ran: with ``packed`` (targets eager and
    inductor) the packed CPU layout the pack_cpu_layouts lowering gave it, if any."""
    layers: dict[str, dict] = {}
    quantized_inputs = set()
    for node in graph.nodes:
        if op_name(node) == "lqc::qlinear":
            info = node.meta["lqc_quantized"]
            bias = node.args[4]
            layers[info["layer"]] = {
                "canonical": info["canonical"], "kernel": (packed and packed_layout(graph, node)) or node.args[5],
                "bias": bias is not None and bool(graph.fqns(bias)),
            }
            quantized_inputs.update(a.target for a in node.args[1:4] if graph.is_constant(a))
    floats: dict[str, torch.Tensor] = {}
    for name, tensor in graph.constants():
        if name in quantized_inputs:
            continue
        for fqn in graph.fqns(name):
            if fqn in floats and not torch.equal(floats[fqn], tensor):
                raise LqcError(f"lqc.save: the compressed graph holds two different values for {fqn}")
            floats[fqn] = tensor
    return floats, layers


def _unchanged_attribute(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> bool:
    try:
        current = model.get_buffer(name)
    except AttributeError:
        return False
    return current.shape == tensor.shape and torch.equal(current, tensor)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"lqc.save cannot write {type(value).__name__} {value!r} into the manifest")
