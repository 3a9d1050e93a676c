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
made of ``cleanup``, ``drop_layers``, ``quantize`` and ``route_neurons`` passes can be saved (other
passes change the graph in ways a state dict does not hold), and only models returned by
``lqc.compress``. A routed FFN's per-neuron weights and skipped-neuron bias are stored beside its
projections (``routed`` in the manifest); ``load`` puts a RoutedGatedMLP there.
A dropped sublayer's weights are not written; the manifest lists its modules (``dropped``), and
``load`` puts stand-ins there (lqc.runtime.structural.dropped_layers): zeros for an attention or FFN, the
identity for the norm that fed it.

A checkpoint cannot lie about its content. The manifest records the SHA-256 and size of every file
beside it (``files``), the name, dtype and shape of every stored tensor (``tensors``), and the
SHA-256 of its own content (``manifest_sha256``, over its keys sorted, without that one);
``format_version`` is the manifest's schema version. ``save`` writes everything into a new
hidden folder next to the target and renames it into place, so a save that crashes half-way
leaves the previous checkpoint where it was (a leftover folder of a killed save is removed by the
next save to the same target). ``load`` checks the manifest's schema and version, each file's size
and checksum, and the tensors against the manifest and against the model its configuration
builds; any mismatch raises :class:`CheckpointError` naming the file and what to do.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from lqc.ir import op_name
from lqc.ir.errors import LqcConfigError, LqcError
from lqc.passes import recipe_entries
from lqc.passes.lowering import packed_layout
from lqc.runtime.structural.dropped_layers import DroppedAttention, DroppedMLP, keep_dropped_layers_out_of_caches
from lqc.runtime.structural.neuron_routing import RoutedGatedMLP
from lqc.runtime.kv.cache import attention_head_dim
from lqc.runtime.quantization.qlinear import QLinear
from lqc.runtime.quantization.formats import QuantizedWeight

from .checkpoint import (
    CheckpointError, FORMAT, FORMAT_VERSION, MANIFEST, RECOPY, RESAVE, TENSORS, check_files, check_save_target, file_record, files_under, fsync, move_into_place, remove_interrupted_saves, sibling_name, write_manifest, read_manifest,
)
from .compress import dropped_attention_layers
from .version import __version__

SAVABLE_PASSES = ("cleanup", "drop_layers", "quantize", "route_neurons")


def save(model: torch.nn.Module, directory: str | Path, tokenizer: Any = None) -> Path:
    """Write a model returned by ``lqc.compress`` to the folder ``directory``, atomically: the
    checkpoint appears complete or not at all, and a folder lqc.save wrote before is replaced (as a
    whole) only once the new one is complete. A folder holding anything else is refused. Nothing is
    pickled."""
    compression = getattr(model, "_lqc_compression", None)
    if compression is None or not compression.graphs:
        raise LqcConfigError("lqc.save needs a model returned by lqc.compress(model, recipe, ...); compress it first")
    recipe = recipe_entries(compression.session.recipe)  # as the session resolved it, once
    _check_savable(recipe)

    floats, layers = _compressed_state(compression.graphs[0], packed=compression.target != "triton")
    dropped = dict(compression.dropped_modules)
    state = _state_to_write(model, floats, layers, dropped)
    tensors, aliases = _unique_tensors(state)
    routed = _routed_ffns(compression.graphs[0], model, tensors)
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
        "aliases": aliases, "layers": manifest_layers, "dropped": dropped, "routed": routed,
    }
    manifest["tensors"] = {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()}

    target = Path(directory).resolve()  # a symlinked target: replace the folder it points to, not the link
    check_save_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / sibling_name(target, "saving")
    os.mkdir(staging)
    try:
        _write_tensors(tensors, staging / TENSORS)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(staging))
        manifest["files"] = {name: file_record(staging / name) for name in files_under(staging)}
        write_manifest(manifest, staging / MANIFEST)
        fsync(staging)
        move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the previous checkpoint, if any, is untouched
        raise
    remove_interrupted_saves(target)
    return Path(directory)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": FORMAT})  # flushed to disk with the other files (file_record)


def _check_savable(recipe: list[dict]) -> None:
    unsupported = sorted({entry["pass"] for entry in recipe} - set(SAVABLE_PASSES))
    if unsupported:
        raise LqcConfigError(
            f"lqc.save stores recipes of {', '.join(SAVABLE_PASSES)} passes; this one also has {', '.join(unsupported)}"
        )
    if any(entry.get("include_embedding") for entry in recipe):
        raise LqcConfigError("lqc.save does not store int8 embedding tables yet: compress without include_embedding to save")


def _state_to_write(model: torch.nn.Module, floats: dict[str, torch.Tensor], layers: dict, dropped: dict) -> dict[str, torch.Tensor]:
    """The model's state dict with the compressed graph's float constants in, without the weights
    of quantized layers (stored in their canonical form) and of dropped sublayers."""
    state = {name: t for name, t in model.state_dict().items() if isinstance(t, torch.Tensor)}
    for path in dropped:  # a dropped sublayer's weights are not stored; load puts stand-ins there
        # except its compensation (drop_layers' stand-in fitted for it), which the stand-in loads
        compensation = {name: t for name, t in floats.items() if name.startswith(path + ".compensation.")}
        still_used = [name for name in floats if name.startswith(path + ".") and name not in compensation]
        if still_used:
            raise LqcError(f"lqc.save: {path} was dropped but the compressed graph still uses {still_used[0]}")
        state = {name: t for name, t in state.items() if not name.startswith(path + ".")} | compensation
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


def load(directory: str | Path, verify: bool = True) -> torch.nn.Module:
    """The model ``save`` wrote, as an eager module; compile it like any other.

    Before building anything, ``load`` checks the manifest (``lqc.json``: its schema, its version, its
    own checksum), that every file it lists is there with the size it records, the SHA-256 of each
    file, and that the stored tensors' names, dtypes and shapes are those the manifest lists and the
    model its configuration builds expects. Any failure raises :class:`CheckpointError` (an
    ``lqc.LqcError``) naming the file and what to do.

    ``verify=False`` skips the checksums, which read every byte of every file (about a second per GB):
    for a checkpoint you trust. Sizes, the schema and the tensors' names, dtypes and shapes are still
    checked, but a damaged byte inside a weight then loads silently.
    """
    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    check_files(directory, manifest, verify)
    tensors = read_tensors(directory, manifest)
    return _build_model(directory, manifest, tensors)


def read_tensors(directory: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The stored tensors, after checking their names, dtypes and shapes against the manifest's table."""
    from safetensors.torch import load_file

    path = directory / TENSORS
    try:
        tensors = load_file(str(path))
        # safetensors packs tensors back to back, so a tensor's data can start at any multiple of its
        # element size; torch's packed CPU kernels (_weight_int8pack_mm) read with aligned vector
        # loads and crash on a misaligned weight: copy those into fresh (64-byte aligned) memory
        tensors = {name: t if t.data_ptr() % 64 == 0 else t.clone() for name, t in tensors.items()}
    except Exception as e:  # safetensors raises its own SafetensorError (or OSError) for a damaged header
        raise CheckpointError(f"{path}: safetensors cannot read it ({e}); the file is damaged: {RECOPY}") from e
    expected = manifest.get("tensors")
    if expected is None:  # format version 1 has no table; the model's own check below still runs
        return tensors
    extra, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if extra or missing:
        differences = ([f"holds tensors {MANIFEST} does not list {extra[:5]}"] if extra else []) + (
            [f"lacks tensors {MANIFEST} lists {missing[:5]}"] if missing else [])
        raise CheckpointError(
            f"{path}: {' and '.join(differences)}: the two files come from different saves or were edited; {RESAVE}"
        )
    for name, tensor in tensors.items():
        found = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        if found != expected[name]:
            raise CheckpointError(
                f"{path}: tensor {name} is {found['dtype']} {found['shape']}, but {MANIFEST} says "
                f"{expected[name]['dtype']} {expected[name]['shape']}: the file was edited after it was saved; {RESAVE}"
            )
    return tensors


def _build_model(directory: Path, manifest: dict, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model the manifest's configuration builds, with QLinear modules, stand-ins for dropped
    sublayers, and the tensors loaded; each tensor checked against the module it goes into."""
    manifest_path, tensors_path = directory / MANIFEST, directory / TENSORS
    model, config = _empty_model(manifest_path, manifest["model"])
    for layer, info in manifest["layers"].items():
        parts = ("qweight", "scales", "zeros") if info["format"] == "int4" else ("qweight", "scales")
        lacking = [f"{layer}.{part}" for part in parts if f"{layer}.{part}" not in tensors]
        if lacking:
            raise CheckpointError(f"{tensors_path}: quantized layer {layer} lacks {lacking}; {RESAVE}")
        q = QuantizedWeight(
            info["format"], tensors.pop(f"{layer}.qweight"), tensors.pop(f"{layer}.scales"),
            tensors.pop(f"{layer}.zeros", None), info["group_size"], info["in_features"],
        )
        problem = _quantized_layer_problem(model, layer, q, info)
        if problem:
            raise CheckpointError(f"{tensors_path}: quantized layer {layer}: {problem}; the checkpoint is damaged: {RESAVE}")
        bias = tensors.get(f"{layer}.bias")
        parent_name, _, child = layer.rpartition(".")
        try:
            setattr(model.get_submodule(parent_name), child, QLinear(q, info["kernel"], bias))
        except Exception as e:  # a kernel layout that cannot hold these tensors
            raise CheckpointError(f"{tensors_path}: quantized layer {layer} does not load ({type(e).__name__}: {e}); {RESAVE}") from e
    dropped = manifest["dropped"]
    for path, info in dropped.items():
        parent_name, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            raise CheckpointError(f"{manifest_path}: dropped module {path} is not in a {type(model).__name__}; {RESAVE}") from None
        setattr(parent, child, _stand_in(info, config))
    for path, info in manifest.get("routed", {}).items():  # after the QLinear swaps: the routed MLP keeps them
        parent_name, _, child = path.rpartition(".")
        try:
            mlp = model.get_submodule(path)
            setattr(model.get_submodule(parent_name), child, RoutedGatedMLP(mlp, info["k"], info["bias"]))
        except AttributeError:
            raise CheckpointError(f"{manifest_path}: routed FFN {path} is not a gated MLP of a {type(model).__name__}; {RESAVE}") from None
    for alias, name in manifest["aliases"].items():
        if name not in tensors:
            raise CheckpointError(f"{manifest_path}: {alias} is stored as {name}, which {TENSORS} does not hold; {RESAVE}")
        tensors[alias] = tensors[name]

    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, tensor in tensors.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(
                f"{tensors_path}: {name} is {list(tensor.shape)}, but the {type(model).__name__} its configuration builds "
                f"has {list(shapes[name])}; {RESAVE}"
            )
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k.rpartition(".")[0] not in manifest["layers"]]  # QLinear buffers: set above
    if missing or unexpected:
        raise CheckpointError(
            f"{tensors_path}: the saved tensors do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}); {RESAVE}"
        )
    keep_dropped_layers_out_of_caches(model, dropped_attention_layers(dropped))
    return model


def _empty_model(manifest_path: Path, model_info: dict) -> tuple[torch.nn.Module, Any]:
    """(the randomly initialized model the manifest's architecture and configuration build, its config)."""
    import transformers

    architecture = getattr(transformers, model_info["architecture"], None)
    if architecture is None:
        raise CheckpointError(
            f"{manifest_path}: architecture {model_info['architecture']!r} is not in transformers {transformers.__version__}; "
            f"install the transformers version the model was saved with ({model_info['config'].get('transformers_version')})"
        )
    try:
        config_dict = dict(model_info["config"])
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        return architecture(config).eval(), config
    except Exception as e:  # transformers raises many kinds for a configuration it cannot build
        raise CheckpointError(
            f"{manifest_path}: its model configuration does not build a {model_info['architecture']} "
            f"({type(e).__name__}: {e}); the manifest is damaged: {RESAVE}"
        ) from e


def _quantized_layer_problem(model: torch.nn.Module, layer: str, q: QuantizedWeight, info: dict) -> str | None:
    """What is wrong with a quantized layer's tensors, for the module they replace; None if nothing."""
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        return f"the model has no module {layer}"
    if q.qweight.dim() != 2 or q.scales.dim() < 1 or {q.qweight.shape[0], q.scales.shape[0]} != {info["out_features"]}:
        return f"qweight {list(q.qweight.shape)} and scales {list(q.scales.shape)} do not have {info['out_features']} rows"
    if q.padded_in_features < info["in_features"]:
        return f"qweight holds {q.padded_in_features} inputs, fewer than its {info['in_features']} in_features"
    if isinstance(module, torch.nn.Linear) and (module.in_features, module.out_features) != (info["in_features"], info["out_features"]):
        return f"{MANIFEST} says {info['in_features']}→{info['out_features']}, the model's Linear is {module.in_features}→{module.out_features}"
    return None


def _stand_in(info: dict, config) -> torch.nn.Module:
    """The module that replaces a dropped attention, FFN or norm: zeros, zeros, and the identity
    (a norm that only fed a dropped sublayer; its output is not used)."""
    if info["kind"] == "attention":
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return DroppedAttention(info["block"], kv_heads, attention_head_dim(config))
    if info["kind"] == "mlp":
        return DroppedMLP()
    return torch.nn.Identity()


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


def _routed_ffns(graph, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """{mlp path: {k, bias}} of the FFNs route_neurons routed, their constants added to ``tensors``
    as ``{mlp}.neuron_weight`` and ``{mlp}.skipped_bias``. Only gated MLPs with gate/up/down
    projections (the Llama family's) load back; others are refused here, before writing."""
    routed = {}
    for node in graph.nodes:
        info = node.meta.get("lqc_routed")
        if info is None:
            continue
        layer = info["layer"]
        mlp = model.get_submodule(layer) if layer else None
        if not info["gated"] or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            raise LqcConfigError(f"lqc.save stores route_neurons on gated MLPs with gate_proj, up_proj, down_proj and act_fn "
                                 f"(the Llama family's); {layer} is a {type(mlp).__name__}: save the model without route_neurons")
        tensors[f"{layer}.neuron_weight"] = graph.constant(info["neuron_weight"]).contiguous()
        if info["skipped_bias"] is not None:
            tensors[f"{layer}.skipped_bias"] = graph.constant(info["skipped_bias"]).contiguous()
        routed[layer] = {"k": info["k"], "bias": info["skipped_bias"] is not None}
    return routed


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _unchanged_attribute(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> bool:
    try:
        current = model.get_buffer(name)
    except AttributeError:
        return False
    return current.shape == tensor.shape and torch.equal(current, tensor)


