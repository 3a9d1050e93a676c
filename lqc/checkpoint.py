"""A checkpoint folder that cannot lie: checksums, its manifest's schema, and atomic saves.

``lqc.save`` (lqc.serialize) decides what a compressed model's checkpoint holds; this module makes
the folder trustworthy. The manifest (``lqc.json``) records the SHA-256 and size of every file
beside it, and the SHA-256 of its own content; ``format_version`` is its schema version. A save
writes into a hidden sibling folder and renames it into place (the previous checkpoint moved aside
and deleted only after), so a save that crashes half-way leaves the previous checkpoint intact; a
leftover folder of a killed save is removed by the next save to the same target. Reading checks
the manifest's schema and version, each file's size and checksum; any mismatch is a
``CheckpointError`` naming the file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch

from lqc.ir.errors import LqcConfigError
from lqc.runtime.quantization.qlinear import KERNEL_LAYOUTS

from .version import __version__

FORMAT = "lqc-compressed-model"


FORMAT_VERSION = 2  # the manifest's schema: 2 added the file checksums, the tensor table and the manifest's own checksum


MANIFEST_CHECKSUM = "manifest_sha256"


RESAVE = "re-save the model with lqc.save"


RECOPY = f"copy the checkpoint again from where it came from, or {RESAVE}"


# Keys every manifest has, with their JSON types; version 2 added the second set.
REQUIRED_KEYS = {"format": str, "format_version": int, "lqc_version": str, "recipe": list, "target": str,
                 "model": dict, "aliases": dict, "layers": dict}


REQUIRED_KEYS_V2 = {"dropped": dict, "files": dict, "tensors": dict, MANIFEST_CHECKSUM: str}


LAYER_KEYS = {"format": str, "group_size": int, "in_features": int, "out_features": int, "kernel": str, "bias": bool}


MANIFEST = "lqc.json"


TENSORS = "model.safetensors"


QUANT_FORMATS = ("int8", "int4", "w8a8", "fp8", "fp8_dyn")


DROPPED_KINDS = ("attention", "mlp", "norm")


def check_save_target(target: Path) -> None:
    """save replaces the whole folder: refuse one that holds anything lqc.save did not write."""
    if target.exists() and not target.is_dir():
        raise LqcConfigError(f"lqc.save: {target} is a file; give the path of a folder (new, empty, or written by lqc.save)")
    if target == Path.cwd().resolve() or target in Path.cwd().resolve().parents:
        # the folder is replaced by a rename: this process (and a shell) would be left in a deleted folder
        raise LqcConfigError(f"lqc.save: {target} is the current folder or holds it; give a folder path below it")
    if target.is_dir() and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise LqcConfigError(
            f"lqc.save: {target} holds files lqc.save did not write, and saving replaces the whole folder; "
            f"give a new or empty folder, or one lqc.save wrote"
        )


def write_manifest(manifest: dict, path: Path) -> None:
    """The manifest as JSON, with the checksum of its own content (as load will read it back)."""
    plain = json.loads(json.dumps(manifest, default=json_default))
    plain[MANIFEST_CHECKSUM] = manifest_digest(plain)
    path.write_text(json.dumps(plain, indent=1) + "\n")
    fsync(path)


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of the manifest's content without its checksum key: keys sorted, no whitespace, so the
    digest does not depend on how the file was indented."""
    content = {key: value for key, value in manifest.items() if key != MANIFEST_CHECKSUM}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def file_record(path: Path) -> dict:
    fsync(path)  # the tokenizer's files too: on disk before the folder is renamed into place
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a rename never publishes data still in the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sibling_name(target: Path, kind: str) -> str:
    """A hidden folder beside the target, named after it, the kind of leftover and this process."""
    return f".{target.name}.lqc-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def move_into_place(staging: Path, target: Path) -> None:
    """Rename the complete new checkpoint to ``target``; an existing one is moved aside first and
    deleted only once the new one is in place (put back if the rename fails)."""
    if not target.exists():
        os.rename(staging, target)
    else:
        aside = target.parent / sibling_name(target, "old")
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync(target.parent)


def leftovers(target: Path, kinds: str = "saving|old") -> list[tuple[Path, int]]:
    """(folder, pid of the process that made it) for each leftover of an interrupted save to ``target``."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.lqc-({kinds})-(\d+)-[0-9a-f]+")
    if not target.parent.is_dir():
        return []
    found = [(p, pattern.fullmatch(p.name)) for p in target.parent.iterdir()]
    return sorted((p, int(m.group(2))) for p, m in found if m and p.is_dir())


def remove_interrupted_saves(target: Path) -> None:
    """Delete what saves to ``target`` by processes that no longer run left behind (killed mid-save).
    A live process's folders may be a save in progress, so they stay."""
    for path, pid in leftovers(target):
        if pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class CheckpointError(LqcConfigError):
    """A checkpoint ``lqc.load`` cannot trust or read: damaged, truncated, edited, incomplete or from a
    newer lqc. The message names the file and what to do."""


def check_files(directory: Path, manifest: dict, verify: bool) -> None:
    """Every file the manifest lists is there, as long as it was written, with the same SHA-256."""
    files = manifest.get("files", {TENSORS: None})  # format version 1 lists none: only the tensors must be there
    for name, record in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing, though {MANIFEST} lists it; the checkpoint is incomplete: {RECOPY}")
        if record is None:
            continue
        size = path.stat().st_size
        if size < record["bytes"]:
            raise CheckpointError(f"{path}: the file is truncated: {size:,} of {record['bytes']:,} bytes; {RECOPY}")
        if size > record["bytes"]:
            raise CheckpointError(
                f"{path}: {size:,} bytes, but lqc.save wrote {record['bytes']:,}: the file changed after it was saved; {RECOPY}"
            )
        if verify:
            try:
                actual = sha256(path)
            except OSError as e:
                raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions and the disk") from e
            if actual != record["sha256"]:
                raise CheckpointError(
                    f"{path}: its SHA-256 is {actual[:16]}…, but lqc.save recorded {record['sha256'][:16]}…: the file is "
                    f"damaged or was changed after it was saved; {RECOPY}"
                )


def read_manifest(directory: str | Path, verify: bool = True) -> dict:
    """The manifest of a saved model, checked: its format, version, own checksum (with ``verify``)
    and schema. A :class:`CheckpointError` names what this lqc cannot read and what to do."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(no_manifest_message(directory))
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the manifest is damaged: {RECOPY}") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); check its permissions and the disk") from e
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found != FORMAT:
        raise CheckpointError(f"{path}: format {found!r} is not {FORMAT!r}: not a manifest lqc.save wrote, or a damaged one; {RESAVE}")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: format_version {version!r} is not a version number; the manifest is damaged: {RECOPY}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by lqc {manifest.get('lqc_version')} in format version {version}; lqc {__version__} "
            f"reads versions up to {FORMAT_VERSION}. Upgrade lqc to load it, or {RESAVE} of this version"
        )
    if version == 1 and verify:
        raise CheckpointError(
            f"{path}: format version 1 records no checksums, so lqc.load cannot verify it; load it unverified with "
            f"lqc.load(path, verify=False), or {RESAVE} for a checkpoint that can be verified"
        )
    if verify:
        actual = manifest_digest(manifest)
        if manifest.get(MANIFEST_CHECKSUM) != actual:
            raise CheckpointError(
                f"{path}: its content does not match the checksum lqc.save recorded in it ({MANIFEST_CHECKSUM}): "
                f"the manifest is damaged or was edited; {RECOPY}"
            )
    check_schema(path, manifest, version)
    return manifest


def check_schema(path: Path, manifest: dict, version: int) -> None:
    """Every key this lqc reads is there, with the JSON type it expects."""
    if version == 1:
        manifest.setdefault("dropped", {})  # absent from files written before layer dropping could be saved
    required = {**REQUIRED_KEYS, **(REQUIRED_KEYS_V2 if version >= 2 else {})}
    missing = [key for key in required if key not in manifest]
    if missing:
        raise CheckpointError(f"{path}: the manifest lacks {missing}; it is damaged: {RESAVE}")
    wrong = [f"{key} is {type(manifest[key]).__name__}, not {kind.__name__}" for key, kind in required.items()
             if not isinstance(manifest[key], kind)]
    model = manifest["model"]
    if not {"architecture", "config"} <= set(model) or not isinstance(model["config"], dict) or "model_type" not in model["config"]:
        wrong.append("model lacks architecture, config or config.model_type")
    if not all(isinstance(name, str) for name in manifest["aliases"].values()):
        wrong.append("aliases name other things than tensors")
    for name, record in manifest.get("files", {}).items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or name == MANIFEST:
            wrong.append(f"files lists {name!r}, which is not a file beside it")  # never read outside the folder
        elif not isinstance(record, dict) or type(record.get("bytes")) is not int or not isinstance(record.get("sha256"), str):
            wrong.append(f"files[{name!r}] is {record!r}, not a size and a sha256")
    if version >= 2 and TENSORS not in manifest["files"]:
        wrong.append(f"files does not list {TENSORS}")
    for name, record in manifest.get("tensors", {}).items():
        if not isinstance(record, dict) or not isinstance(record.get("dtype"), str) or not isinstance(record.get("shape"), list):
            wrong.append(f"tensors[{name!r}] is {record!r}, not a dtype and a shape")
    if wrong:
        raise CheckpointError(f"{path}: the manifest is damaged ({'; '.join(wrong[:3])}): {RESAVE}")
    for module, info in manifest["dropped"].items():
        if not isinstance(info, dict) or info.get("kind") not in DROPPED_KINDS or type(info.get("block")) is not int:
            raise CheckpointError(
                f"{path}: dropped module {module} is {info!r}; this lqc knows dropped kinds {', '.join(DROPPED_KINDS)} "
                f"with a block index. The manifest is damaged: {RESAVE}"
            )
    for layer, info in manifest["layers"].items():
        bad = [key for key, kind in LAYER_KEYS.items() if not isinstance(info, dict) or not isinstance(info.get(key), kind)]
        if bad:
            raise CheckpointError(f"{path}: layer {layer} lacks a valid {', '.join(bad)}; the manifest is damaged: {RESAVE}")
        if info["format"] not in QUANT_FORMATS or info["kernel"] not in KERNEL_LAYOUTS:
            raise CheckpointError(
                f"{path}: layer {layer} has format {info['format']!r} / kernel {info['kernel']!r}; "
                f"this lqc knows formats {', '.join(QUANT_FORMATS)} and kernels {', '.join(KERNEL_LAYOUTS)}: {RESAVE}"
            )


def no_manifest_message(directory: Path) -> str:
    if not directory.exists():
        aside = leftovers(directory.resolve(), "old")
        if aside:
            return (f"{directory} does not exist: a save to it was interrupted, and the previous checkpoint is in "
                    f"{aside[-1][0]}; rename that folder to {directory.name}, or {RESAVE}")
        return f"{directory} does not exist; give the folder lqc.save wrote"
    if not directory.is_dir():
        return f"{directory} is a file; give the folder lqc.save wrote (the one that holds {MANIFEST})"
    return f"{directory} holds no {MANIFEST}: not a model written by lqc.save; give the folder lqc.save wrote, or {RESAVE}"


def json_default(value: Any) -> Any:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"lqc.save cannot write {type(value).__name__} {value!r} into the manifest")
