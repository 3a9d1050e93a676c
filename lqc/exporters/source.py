"""What an export reads: an ``lqc.save`` checkpoint, checked, as plain tensors and quantized weights.

Every exporter starts from the same thing, whatever the engine it writes for: the model's Hugging
Face configuration, its float tensors under their state-dict names (tied weights resolved), each
quantized linear's canonical ``QuantizedWeight`` (lqc.runtime.quantization.formats) and what the
recipe dropped. Whole dropped blocks are taken out here and the blocks after them renumbered
(``without_dropped_blocks``), so an exporter only ever sees a smaller model of the same family.
Anything an engine's format cannot hold (a dropped sublayer inside a kept block, a fitted stand-in,
routed FFNs, embedding tables lqc quantized) is refused here, before anything is written, with the
recipe entry to change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lqc.ir.errors import LqcConfigError
from lqc.runtime.quantization.formats import QuantizedWeight

from ..checkpoint import check_files, read_manifest
from ..serialize import read_tensors


@dataclass
class ExportSource:
    directory: Path  # the lqc.save checkpoint it was read from (tokenizer files live there)
    architecture: str  # transformers class name, e.g. LlamaForCausalLM
    config: dict  # the model's configuration as config.to_dict() wrote it
    floats: dict[str, torch.Tensor]  # state-dict name -> tensor, tied names each present
    layers: dict[str, QuantizedWeight]  # module path -> canonical quantized weight
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> bias of a quantized linear
    recipe: list[dict] = field(default_factory=list)
    dropped_blocks: list[int] = field(default_factory=list)  # original indices of the blocks taken out

    @property
    def model_type(self) -> str:
        return self.config["model_type"]


def read_source(directory: str | Path, verify: bool = True) -> ExportSource:
    """The checkpoint ``lqc.save`` wrote to ``directory``, checked as ``lqc.load`` checks it."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=verify)
    check_files(directory, manifest, verify)
    tensors = read_tensors(directory, manifest)
    _refuse_what_engines_cannot_hold(manifest)
    layers, biases = {}, {}
    for layer, info in manifest["layers"].items():
        layers[layer] = QuantizedWeight(
            info["format"], tensors.pop(f"{layer}.qweight"), tensors.pop(f"{layer}.scales"),
            tensors.pop(f"{layer}.zeros", None), info["group_size"], info["in_features"],
        )
        if info["bias"]:
            biases[layer] = tensors.pop(f"{layer}.bias")
    for alias, name in manifest["aliases"].items():
        tensors[alias] = tensors[name]
    source = ExportSource(directory, manifest["model"]["architecture"], dict(manifest["model"]["config"]),
                          tensors, layers, biases, manifest["recipe"])
    return without_dropped_blocks(source, manifest["dropped"])


def _refuse_what_engines_cannot_hold(manifest: dict) -> None:
    if manifest.get("routed"):
        raise LqcConfigError(
            f"export: route_neurons routed {len(manifest['routed'])} FFNs, which neither compressed-tensors nor GGUF "
            f"can express; export a recipe without its route_neurons entry"
        )


def without_dropped_blocks(source: ExportSource, dropped: dict[str, dict]) -> ExportSource:
    """The source with every wholly dropped block removed and the later blocks renumbered; a
    dropped attention or FFN whose block stays is refused (HF configurations cannot express it)."""
    if not dropped:
        return source
    kinds: dict[int, set[str]] = {}
    for info in dropped.values():
        kinds.setdefault(info["block"], set()).add(info["kind"])
    partial = {block: sorted(k - {"norm"}) for block, k in kinds.items() if not {"attention", "mlp"} <= k}
    if partial:
        block, parts = sorted(partial.items())[0]
        raise LqcConfigError(
            f"export: drop_layers dropped the {' and '.join(parts)} of block {block} but kept the block; a Hugging Face "
            f"configuration (and GGUF) can only hold whole blocks. Use drop_layers with what: block (or span) in the recipe"
        )
    compensated = [name for name in source.floats if ".compensation." in name]
    if compensated:
        raise LqcConfigError(
            f"export: drop_layers fitted a stand-in for a dropped block ({compensated[0]}), which engines cannot run; "
            f"use drop_layers with compensation: none in the recipe"
        )
    prefix = _blocks_prefix(next(iter(dropped)))
    gone = sorted(kinds)
    count = source.config["num_hidden_layers"]
    renumber = {old: new for new, old in enumerate(b for b in range(count) if b not in gone)}

    def renamed(name: str) -> str | None:
        match = re.match(rf"{re.escape(prefix)}(\d+)\.(.*)", name)
        if match is None:
            return name
        block = int(match.group(1))
        return None if block in gone else f"{prefix}{renumber[block]}.{match.group(2)}"

    def rename_all(table: dict) -> dict:
        return {new: value for name, value in table.items() if (new := renamed(name)) is not None}

    config = dict(source.config, num_hidden_layers=count - len(gone))
    if isinstance(config.get("layer_types"), list):  # per-block attention kinds (sliding/full) follow their blocks
        config["layer_types"] = [t for b, t in enumerate(config["layer_types"]) if b not in gone]
    return ExportSource(source.directory, source.architecture, config, rename_all(source.floats),
                        rename_all(source.layers), rename_all(source.biases), source.recipe, gone)


def _blocks_prefix(path: str) -> str:
    """``model.layers.`` from a dropped module's path such as ``model.layers.3.self_attn``."""
    match = re.match(r"(.*?\.)\d+\.", path)
    if match is None:
        raise LqcConfigError(f"export: cannot tell which block {path} belongs to")
    return match.group(1)
