"""Text for calibration and evaluation: locating it, tokenizing it, cutting windows.

The evaluation text (``eval.txt``) and calibration text (``calib.txt``) live in the shared data
folder (``$LQC_DATA_DIR``, else ``../shared/data`` next to the repository, else the copy in
``benchmarks/data``). They never overlap:
calibrating on the evaluation text would flatter every method.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from lqc.ir.errors import LqcConfigError
from lqc.ir.inputs import token_windows
from lqc.passes import Calibration

_REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    candidates = [
        os.environ.get("LQC_DATA_DIR"),
        _REPO.parent / "shared" / "data",
        Path.cwd().parent / "shared" / "data",
        _REPO / "benchmarks" / "data",  # the repository's own copy, for clones outside the workspace
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "eval.txt").is_file():
            return Path(candidate)
    raise LqcConfigError(
        "cannot find the shared text data (eval.txt, calib.txt): set LQC_DATA_DIR to the folder that holds them"
    )


def data_file(name: str) -> Path:
    """``"eval"`` / ``"calib"`` (or a bare file name) in the shared data folder; a path is returned as is."""
    path = Path(name)
    if path.is_file() or len(path.parts) > 1:
        return path
    if name in ("eval", "calib"):
        name += ".txt"
    return data_dir() / name


@functools.lru_cache(maxsize=8)
def _tokenize_file(path: str, mtime: float, tokenizer_id: int, tokenizer: Any) -> torch.Tensor:
    return tokenize(Path(path).read_text(encoding="utf-8"), tokenizer)


def tokenize(text: str, tokenizer: Any) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, as a 1-D int64 tensor."""
    if tokenizer is None:
        raise LqcConfigError("text needs a tokenizer: pass tokenizer=... (e.g. the one lqc.models.load returns)")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_token(tokenizer: Any) -> int | None:
    """The BOS id when ``tokenizer`` puts one before every text (Gemma's does: its model degenerates
    without one), else None (SmolLM2's does not). Windows cut from a token stream get it in front,
    for calibration and for evaluation, the way the model sees a prompt."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_file(path: str | Path, tokenizer: Any) -> torch.Tensor:
    path = data_file(str(path))
    if not path.is_file():
        raise LqcConfigError(f"text file {str(path)!r} does not exist")
    return _tokenize_file(str(path), path.stat().st_mtime, id(tokenizer), tokenizer)


def windows(ids: torch.Tensor, length: int = 512, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping [n, length] windows from the start of a 1-D token stream."""
    return token_windows(ids, length, max_windows)


def calibration_from(value: Any, tokenizer: Any = None, *, max_windows: int = 32) -> Calibration | None:
    """Calibration data from what a user passes: a Calibration, token id tensors, a text file path
    (``"calib"`` names the shared calibration text), or a list of strings."""
    if value is None or isinstance(value, Calibration):
        return value
    if isinstance(value, torch.Tensor):
        sequences = list(value) if value.dim() == 2 else [value]
        return Calibration(sequences, max_windows=max_windows)
    if isinstance(value, (str, os.PathLike)):
        return Calibration([tokenize_file(value, tokenizer)], max_windows=max_windows, bos=bos_token(tokenizer))
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return Calibration([tokenize(v, tokenizer) for v in value], max_windows=max_windows, bos=bos_token(tokenizer))
    if isinstance(value, Sequence) and value and all(isinstance(v, torch.Tensor) for v in value):
        return Calibration(list(value), max_windows=max_windows)
    raise LqcConfigError(
        f"calibration must be a text file path, a list of strings, token id tensors or lqc.passes.Calibration; "
        f"got {type(value).__name__}"
    )


def example_token_ids(model: torch.nn.Module, calibration: Calibration | None, tokens: int, caller: str) -> torch.Tensor:
    """Token ids [1, n] to capture ``model`` on: the first calibration window (at most ``tokens``
    long), else ``tokens`` random ids of the model's vocabulary. ``caller`` names the function
    the error points back to."""
    if calibration is not None:
        return calibration.windows(1, min(tokens, calibration.num_tokens), 1)[0]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise LqcConfigError(f"{caller} needs token ids for this model: pass example_inputs= (token ids), or calibration= text "
                             f"and its tokenizer (this model has no config.vocab_size to draw random ids from)")
    return torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
