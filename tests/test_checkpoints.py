"""Checkpoints that can't lie (issue 29): every damaged, truncated, edited or half-written checkpoint
is refused by lqc.load with an LqcError naming the file and the fix, and an interrupted lqc.save
leaves the previous checkpoint loadable."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import lqc
import lqc.serialize as serialize
import lqc.checkpoint as ckpt
from lqc.checkpoint import CheckpointError

# Every file of the checkpoint the fixture writes: the corruption test runs over each of them.
FILES = ["lqc.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
RESAVE = "re-save the model with lqc.save"


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "a": 1, "b": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One compressed tiny model, saved once with a tokenizer; tests work on copies of that folder."""
    model = lqc.models.load("tiny-llama").model
    compressed = lqc.compress(model, "int8", progress=False)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = compressed(ids).logits
    path = tmp_path_factory.mktemp("pristine") / "checkpoint"
    tokenizer = _tiny_tokenizer()
    lqc.save(compressed, path, tokenizer=tokenizer)
    return SimpleNamespace(compressed=compressed, tokenizer=tokenizer, path=path, ids=ids, logits=logits)


@pytest.fixture
def checkpoint(saved, tmp_path):
    copy = tmp_path / "checkpoint"
    shutil.copytree(saved.path, copy)
    return copy


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _load_error(path: Path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as error:
        lqc.load(path, **kwargs)
    assert isinstance(error.value, lqc.LqcError)
    return str(error.value)


def _rewrite_manifest(checkpoint: Path, edit, rehash: bool = True) -> None:
    """Edit the manifest; with ``rehash`` its checksum is recomputed, so only a later check can object."""
    manifest = json.loads((checkpoint / "lqc.json").read_text())
    edit(manifest)
    if rehash:
        manifest["manifest_sha256"] = ckpt.manifest_digest(manifest)
    (checkpoint / "lqc.json").write_text(json.dumps(manifest, indent=1))


def _rewrite_tensors(checkpoint: Path, edit, table_edit=None) -> None:
    """Edit the stored tensors and record the new file's size and SHA-256 (and the manifest's), as a
    tool that rewrote the file on purpose would: only the semantic checks can catch the change."""
    path = checkpoint / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": ckpt.FORMAT})

    def update(manifest):
        manifest["files"]["model.safetensors"] = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        if table_edit:
            table_edit(manifest["tensors"])

    _rewrite_manifest(checkpoint, update)


def _overwrite(path: Path, offset: int, count: int = 64) -> None:
    """Flip every bit of ``count`` bytes at ``offset``: every byte of the region changes."""
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_round_trip_records_every_file_and_tensor(saved, checkpoint):
    assert sorted(p.name for p in checkpoint.iterdir()) == FILES  # the corruption test covers each one
    manifest = json.loads((checkpoint / "lqc.json").read_text())
    assert manifest["format_version"] == ckpt.FORMAT_VERSION == 2
    assert sorted(manifest["files"]) == [name for name in FILES if name != "lqc.json"]
    for name, record in manifest["files"].items():
        data = (checkpoint / name).read_bytes()
        assert record == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    stored = load_file(str(checkpoint / "model.safetensors"))
    assert manifest["tensors"] == {n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for n, t in stored.items()}
    assert manifest["manifest_sha256"] == ckpt.manifest_digest(manifest)
    assert torch.equal(_logits(lqc.load(checkpoint), saved.ids), saved.logits)
    assert torch.equal(_logits(lqc.load(checkpoint, verify=False), saved.ids), saved.logits)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("name", FILES)
def test_corrupting_any_region_of_any_file_is_detected(checkpoint, name, where):
    path = checkpoint / name
    size = path.stat().st_size
    _overwrite(path, {"start": 0, "middle": size // 2 - 32, "end": size - 64}[where])
    message = _load_error(checkpoint)
    assert str(path) in message and RESAVE in message


def test_a_changed_value_in_a_still_valid_manifest_is_detected(checkpoint):
    """Damage that leaves valid JSON (a digit changed) is caught by the manifest's own checksum."""
    _rewrite_manifest(checkpoint, lambda m: m["model"]["config"].update(rms_norm_eps=1e-3), rehash=False)
    message = _load_error(checkpoint)
    assert str(checkpoint / "lqc.json") in message and "does not match the checksum" in message and RESAVE in message


def _truncate(name):
    def damage(checkpoint):
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return damage


def _set_header_length(checkpoint):  # a header length past the end of the file, the checksum recomputed
    _rewrite_tensors(checkpoint, lambda t: None)
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (len(data) * 2).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    _rewrite_manifest(checkpoint, lambda m: m["files"]["model.safetensors"].update(sha256=hashlib.sha256(data).hexdigest()))


def _rename_tensor(tensors):
    tensors["model.norm.renamed"] = tensors.pop("model.norm.weight")


def _norm_to(shape):
    def edit(tensors):
        tensors["model.norm.weight"] = torch.ones(shape)
    return edit


def _table_norm_to(shape):
    def edit(table):
        table["model.norm.weight"]["shape"] = list(shape)
    return edit


def _first_layer(checkpoint) -> str:
    return next(iter(json.loads((checkpoint / "lqc.json").read_text())["layers"]))


def _qweight_rows_halved(checkpoint):  # file and table agree; the quantized layer's rows do not
    layer = _first_layer(checkpoint)
    name = f"{layer}.qweight"

    def edit(tensors):
        tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()

    def table(t):
        t[name]["shape"][0] //= 2

    _rewrite_tensors(checkpoint, edit, table)


# (case, damage, the file the message must name, what the message says, the fix it must name)
BAD_CHECKPOINTS = [
    ("tensors truncated to half", _truncate("model.safetensors"), "model.safetensors", "the file is truncated", RESAVE),
    ("tokenizer truncated to half", _truncate("tokenizer.json"), "tokenizer.json", "the file is truncated", RESAVE),
    ("manifest truncated to half", _truncate("lqc.json"), "lqc.json", "not valid JSON", RESAVE),
    ("manifest not JSON", lambda c: (c / "lqc.json").write_text("{not json"), "lqc.json", "not valid JSON", RESAVE),
    ("manifest is a list", lambda c: (c / "lqc.json").write_text("[1, 2]"), "lqc.json", "format 'list' is not", RESAVE),
    ("manifest key missing", lambda c: _rewrite_manifest(c, lambda m: m.pop("aliases")), "lqc.json", r"lacks \['aliases'\]", RESAVE),
    ("file table missing", lambda c: _rewrite_manifest(c, lambda m: m.pop("files")), "lqc.json", r"lacks \['files'\]", RESAVE),
    ("checksum missing", lambda c: _rewrite_manifest(c, lambda m: m.pop("manifest_sha256"), rehash=False), "lqc.json",
     "does not match the checksum", RESAVE),
    ("version from the future", lambda c: _rewrite_manifest(c, lambda m: m.update(format_version=3, lqc_version="9.0")), "lqc.json",
     r"written by lqc 9.0 in format version 3; lqc .* reads versions up to 2", "Upgrade lqc"),
    ("version not a number", lambda c: _rewrite_manifest(c, lambda m: m.update(format_version="2")), "lqc.json",
     "format_version '2' is not a version number", RESAVE),
    ("version 1 without checksums", lambda c: _rewrite_manifest(c, lambda m: m.update(format_version=1)), "lqc.json",
     "format version 1 records no checksums", r"verify=False"),
    ("layer of an unknown format", lambda c: _rewrite_manifest(c, lambda m: next(iter(m["layers"].values())).update(format="int3")),
     "lqc.json", "has format 'int3'.*knows formats int8, int4", RESAVE),
    ("file table reaches outside", lambda c: _rewrite_manifest(c, lambda m: m["files"].update({"../x": {"bytes": 1, "sha256": ""}})),
     "lqc.json", r"files lists '\.\./x', which is not a file beside it", RESAVE),
    ("configuration that builds no model", lambda c: _rewrite_manifest(c, lambda m: m["model"]["config"].update(hidden_size="wide")),
     "lqc.json", "configuration does not build a LlamaForCausalLM", RESAVE),
    ("listed file deleted", lambda c: (c / "tokenizer.json").unlink(), "tokenizer.json", "missing, though lqc.json lists it", RESAVE),
    ("file grown", lambda c: (c / "tokenizer_config.json").write_text((c / "tokenizer_config.json").read_text() + " "),
     "tokenizer_config.json", "the file changed after it was saved", RESAVE),
    ("safetensors header damaged, checksum recomputed", _set_header_length, "model.safetensors", "safetensors cannot read it", RESAVE),
    ("tensor renamed", lambda c: _rewrite_tensors(c, _rename_tensor), "model.safetensors",
     r"holds tensors lqc.json does not list \['model.norm.renamed'\] and lacks tensors lqc.json lists \['model.norm.weight'\]", RESAVE),
    ("tensor missing", lambda c: _rewrite_tensors(c, lambda t: t.pop("model.norm.weight")), "model.safetensors",
     r"model.safetensors: lacks tensors lqc.json lists \['model.norm.weight'\]", RESAVE),
    ("extra tensor", lambda c: _rewrite_tensors(c, lambda t: t.update(extra=torch.zeros(3))), "model.safetensors",
     r"model.safetensors: holds tensors lqc.json does not list \['extra'\]: ", RESAVE),
    ("dtype changed", lambda c: _rewrite_tensors(c, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()})),
     "model.safetensors", r"tensor model.norm.weight is float16 \[64\], but lqc.json says float32 \[64\]", RESAVE),
    ("shape changed", lambda c: _rewrite_tensors(c, _norm_to((32,))), "model.safetensors",
     r"tensor model.norm.weight is float32 \[32\], but lqc.json says float32 \[64\]", RESAVE),
    ("shape changed in file and table", lambda c: _rewrite_tensors(c, _norm_to((32,)), _table_norm_to((32,))), "model.safetensors",
     r"model.norm.weight is \[32\], but the LlamaForCausalLM its configuration builds has \[64\]", RESAVE),
    ("quantized rows changed in file and table", _qweight_rows_halved, "model.safetensors", r"quantized layer .*do not have \d+ rows", RESAVE),
    ("quantized tensor missing from file and table",
     lambda c: _rewrite_tensors(c, lambda t: t.pop(f"{_first_layer(c)}.scales"), lambda t: t.pop(f"{_first_layer(c)}.scales")),
     "model.safetensors", r"quantized layer .* lacks \[.*\.scales'\]", RESAVE),
]


@pytest.mark.parametrize("damage,file,says,fix", [case[1:] for case in BAD_CHECKPOINTS], ids=[case[0] for case in BAD_CHECKPOINTS])
def test_bad_checkpoints_are_refused_with_the_file_and_the_fix(checkpoint, damage, file, says, fix):
    damage(checkpoint)
    message = _load_error(checkpoint)
    assert str(checkpoint / file) in message
    assert re.search(says, message), message
    assert re.search(fix, message), message


def test_a_missing_folder_or_a_file_is_named(checkpoint, tmp_path):
    message = _load_error(tmp_path / "nowhere")
    assert f"{tmp_path / 'nowhere'} does not exist; give the folder lqc.save wrote" in message
    message = _load_error(checkpoint / "model.safetensors")
    assert f"{checkpoint / 'model.safetensors'} is a file; give the folder lqc.save wrote (the one that holds lqc.json)" in message


def test_a_save_cut_between_its_renames_says_where_the_previous_checkpoint_is(checkpoint):
    """Killed after moving the old checkpoint aside and before renaming the new one in: load says where the old one is."""
    aside = checkpoint.parent / ".checkpoint.lqc-old-999999999-0123abcd"
    checkpoint.rename(aside)
    message = _load_error(checkpoint)
    assert f"{checkpoint} does not exist: a save to it was interrupted, and the previous checkpoint is in {aside}" in message
    assert "rename that folder to checkpoint" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_file_is_named(checkpoint):
    (checkpoint / "tokenizer.json").chmod(0)
    message = _load_error(checkpoint)
    assert f"{checkpoint / 'tokenizer.json'}: cannot be read (Permission denied); check its permissions" in message


def test_verify_false_reads_no_checksums(saved, checkpoint, monkeypatch):
    """verify=False computes no SHA-256 at all, so damage inside a weight loads; sizes, the schema and
    the tensors' names, dtypes and shapes are still checked."""
    path = checkpoint / "model.safetensors"
    _overwrite(path, path.stat().st_size - 64)  # inside the last tensor's data: the header still parses
    assert "its SHA-256 is" in _load_error(checkpoint)

    def no_checksums(*args):
        raise AssertionError("verify=False must not compute a checksum")

    monkeypatch.setattr(ckpt, "sha256", no_checksums)
    monkeypatch.setattr(ckpt, "manifest_digest", no_checksums)
    loaded = lqc.load(checkpoint, verify=False)
    assert not torch.equal(_logits(loaded, saved.ids), saved.logits)  # the damage went through, as documented
    _truncate("model.safetensors")(checkpoint)
    assert "the file is truncated" in _load_error(checkpoint, verify=False)


def test_a_version_1_checkpoint_loads_unverified(saved, checkpoint):
    """A manifest written before checksums existed loads with verify=False (its tensors still checked)."""
    def as_version_1(manifest):
        for key in ("files", "tensors", "manifest_sha256", "dropped"):
            manifest.pop(key)
        manifest["format_version"] = 1

    _rewrite_manifest(checkpoint, as_version_1, rehash=False)
    assert "verify=False" in _load_error(checkpoint)
    assert torch.equal(_logits(lqc.load(checkpoint, verify=False), saved.ids), saved.logits)


def _snapshot(folder: Path) -> dict:
    """The folder's identity (its inode: a replaced folder gets a new one) and its files' content."""
    return {"inode": folder.stat().st_ino, **{p.name: p.read_bytes() for p in folder.iterdir()}}


def test_a_save_failing_while_writing_tensors_leaves_the_previous_checkpoint(saved, checkpoint, monkeypatch):
    before = _snapshot(checkpoint)
    real_write = serialize._write_tensors

    def write_half_then_fail(tensors, path):
        real_write(tensors, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialize, "_write_tensors", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        lqc.save(saved.compressed, checkpoint, tokenizer=saved.tokenizer)
    assert _snapshot(checkpoint) == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint"]  # the half-written folder is gone
    assert torch.equal(_logits(lqc.load(checkpoint), saved.ids), saved.logits)


def test_a_save_failing_at_the_rename_puts_the_previous_checkpoint_back(saved, checkpoint, monkeypatch):
    before = _snapshot(checkpoint)
    real_rename = os.rename
    renames = []

    def rename(src, dst):  # the old folder goes aside, then the new one cannot be renamed in
        renames.append((Path(src).name, Path(dst).name))
        if ".lqc-saving-" in Path(src).name:
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        lqc.save(saved.compressed, checkpoint, tokenizer=saved.tokenizer)
    monkeypatch.undo()
    assert [dst for _, dst in renames][0].startswith(".checkpoint.lqc-old-")  # it did get half-way
    assert _snapshot(checkpoint) == before
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint"]
    assert torch.equal(_logits(lqc.load(checkpoint), saved.ids), saved.logits)


def test_a_killed_save_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(saved, checkpoint):
    """A process killed (SIGKILL: no cleanup runs) half-way through writing the tensors."""
    before = _snapshot(checkpoint)
    pid = os.fork()
    if pid == 0:  # the child: write half the tensors, then die as a killed process does
        try:
            def write_half_and_die(tensors, path):
                path.write_bytes(b"\0" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)

            serialize._write_tensors = write_half_and_die
            lqc.save(saved.compressed, checkpoint)
        finally:
            os._exit(1)  # never return into pytest
    deadline = time.monotonic() + 120
    while (waited := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if waited == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the child process did not reach the write")
    assert os.WIFSIGNALED(waited[1]) and os.WTERMSIG(waited[1]) == signal.SIGKILL
    leftovers = [p.name for p in checkpoint.parent.iterdir() if p.name != "checkpoint"]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".checkpoint.lqc-saving-{pid}-")
    assert _snapshot(checkpoint) == before
    assert torch.equal(_logits(lqc.load(checkpoint), saved.ids), saved.logits)

    lqc.save(saved.compressed, checkpoint, tokenizer=saved.tokenizer)  # the next save removes what the killed one left
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint"]
    assert torch.equal(_logits(lqc.load(checkpoint), saved.ids), saved.logits)


def test_a_live_process_leftovers_stay(saved, checkpoint):
    """A leftover of a process that still runs may be a save in progress: the next save leaves it."""
    live = checkpoint.parent / f".checkpoint.lqc-saving-{os.getppid()}-0123abcd"
    live.mkdir()
    lqc.save(saved.compressed, checkpoint)
    assert live.is_dir()


def test_saving_again_replaces_the_whole_folder(saved, checkpoint):
    inode = checkpoint.stat().st_ino
    lqc.save(saved.compressed, checkpoint)  # without the tokenizer this time
    assert checkpoint.stat().st_ino != inode
    assert sorted(p.name for p in checkpoint.iterdir()) == ["lqc.json", "model.safetensors"]
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint"]
    assert torch.equal(_logits(lqc.load(checkpoint), saved.ids), saved.logits)


def test_save_refuses_a_folder_it_did_not_write(saved, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(lqc.LqcConfigError, match="holds files lqc.save did not write.*give a new or empty folder"):
        lqc.save(saved.compressed, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(lqc.LqcConfigError, match="notes.txt is a file; give the path of a folder"):
        lqc.save(saved.compressed, tmp_path / "notes.txt")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(lqc.LqcConfigError, match="is the current folder or holds it; give a folder path below it"):
        lqc.save(saved.compressed, ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
