"""``lqc.export(model_or_dir, fmt, path)``: a compressed model in the formats serving engines read.

- ``compressed-tensors`` (a folder): what llm-compressor writes and vLLM and transformers load
  (``AutoModelForCausalLM.from_pretrained(path)`` with the ``compressed-tensors`` package, no lqc);
  lqc.export.compressed_tensors.
- ``gguf`` (a file): what llama.cpp, ollama and LM Studio load; lqc.export.gguf.

The source is a model ``lqc.compress`` returned (saved first with ``lqc.save`` into a temporary
folder) or a folder ``lqc.save`` wrote. Everything that cannot be written exactly is refused before
anything is written, with what to change; an export writes into a hidden sibling and renames it
into place, so a failed export leaves nothing at ``path``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lqc.ir.errors import LqcConfigError

from ..checkpoint import fsync, sibling_name
from .source import ExportSource, read_source

FORMATS = ("compressed-tensors", "gguf")


def export(model_or_dir: torch.nn.Module | str | Path, fmt: str, path: str | Path, *, tokenizer: Any = None,
           requantize: bool = False, tokenizer_gguf: str | Path | None = None) -> dict:
    """Write ``model_or_dir`` as ``fmt`` to ``path``; returns the exporter's report (per layer what was
    written, and the largest weight change where the format could not hold lqc's values exactly).

    ``requantize``: where the format cannot hold lqc's parameters exactly (float int4 zero points in
    compressed-tensors, group sizes GGUF has no block type for), quantize again in the format's own
    scheme instead of refusing. ``tokenizer_gguf``: a GGUF file whose tokenizer metadata the GGUF
    export carries over (otherwise it is built from the checkpoint's tokenizer files)."""
    if fmt not in FORMATS:
        raise LqcConfigError(f"export: format {fmt!r} is not one of {', '.join(FORMATS)}")
    target = Path(path).resolve()
    _check_target(target, fmt)
    with tempfile.TemporaryDirectory(prefix="lqc-export-") as scratch:
        if isinstance(model_or_dir, torch.nn.Module):
            from ..serialize import save

            _check_exportable_recipe(model_or_dir)
            model_or_dir = save(model_or_dir, Path(scratch) / "checkpoint", tokenizer=tokenizer)
        source = read_source(model_or_dir)
        return _write(source, fmt, target, requantize, tokenizer_gguf)


def _write(source: ExportSource, fmt: str, target: Path, requantize: bool, tokenizer_gguf) -> dict:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / sibling_name(target, "exporting")
    try:
        if fmt == "compressed-tensors":
            from .compressed_tensors import write_compressed_tensors

            os.mkdir(staging)
            report = write_compressed_tensors(source, staging, requantize=requantize)
        else:
            from .gguf import write_gguf

            report = write_gguf(source, staging, requantize=requantize, tokenizer_gguf=tokenizer_gguf)
        fsync(staging)
        _replace(staging, target)
        report["path"] = str(target)
    except BaseException:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()
        raise
    return report


def _check_exportable_recipe(model: torch.nn.Module) -> None:
    """Passes whose result no engine's format expresses, refused by name before anything is saved."""
    from ..serialize import SAVABLE_PASSES

    compression = getattr(model, "_lqc_compression", None)
    if compression is None:
        raise LqcConfigError("export needs a model returned by lqc.compress(model, recipe, ...), or a folder lqc.save wrote")
    names = [p.name for p in compression.session.recipe]
    unexportable = sorted(set(names) - set(SAVABLE_PASSES) | ({"route_neurons"} & set(names)))
    if unexportable:
        raise LqcConfigError(
            f"export: the recipe's {', '.join(unexportable)} change the model in ways neither compressed-tensors nor GGUF "
            f"can express (they hold quantized linears and whole dropped blocks); export a recipe without them"
        )


def _check_target(target: Path, fmt: str) -> None:
    """An export replaces a previous lqc export at the same path, never anything else (a user's own
    model folder or GGUF file)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if fmt == "gguf":
        if target.is_file() and target.suffix == ".gguf" and _is_lqc_gguf(target):
            return
    elif target.is_dir() and (target / "config.json").is_file() and "lqc_export" in _json(target / "config.json"):
        return
    raise LqcConfigError(f"export: {target} exists and was not written by lqc export; give a new path (or an empty folder)")


def _is_lqc_gguf(path: Path) -> bool:
    import gguf

    from .gguf import EXPORT_MARK

    try:
        return EXPORT_MARK in gguf.GGUFReader(path).fields
    except Exception:  # not a readable GGUF file: not ours
        return False


def _json(path: Path) -> dict:
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _replace(staging: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    os.replace(staging, target)
    fsync(target.parent)
