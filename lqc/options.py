"""The options of ``torch.compile(model, backend="lqc", options={...})`` and ``lqc.compress``."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

from lqc.codegen.targets import TARGETS, resolve_target
from lqc.ir.errors import LqcConfigError


@dataclass(eq=False)  # identity equality: torch.compile compares backend options, which may hold tensors
class CompileOptions:
    recipe: Any = "default"  # a named recipe, a YAML path, a dict, or a list of entries / Pass objects
    calibration: Any = None  # text file path, list of strings, token id tensors, or Calibration
    tokenizer: Any = None  # turns calibration text into token ids
    target: str = "auto"  # auto | inductor | eager | triton
    verify: bool = False  # measure each pass's numeric error against the uncompressed graph
    debug_dir: str | None = None  # per-graph folders with one readable file per pass and a summary
    progress: bool = True  # progress bars in long passes
    viz: bool = False  # keep per-pass snapshots, fusion groups and per-node errors for lqc.viz
    autotune: bool | None = None  # target="triton": tune launch configs (None: on a GPU, off under the interpreter)
    share_blocks: bool = True  # target="inductor": compile each distinct decoder block once
    check_inputs: bool = True  # check the token ids' range on every call (one reduction), not only the first
    cpp_wrapper: bool = False  # target="inductor": Inductor's C++ wrapper, no Python between kernels

    HELP = {
        "recipe": "named recipe (see `lqc recipes`), YAML file, dict, or list of {'pass': NAME, ...options}",
        "calibration": "text file path ('calib' = the shared calibration text), list of strings, or token id tensors",
        "tokenizer": "Hugging Face tokenizer for calibration text",
        "target": f"one of {'|'.join(TARGETS)}",
        "verify": "measure relative error and cosine of the outputs after every pass",
        "debug_dir": "folder for per-pass dumps and summary tables",
        "progress": "show progress bars",
        "autotune": "target='triton': time a few launch configs per kernel and shape on first use, keep the fastest "
                    "(cached on disk beside the kernels); default: on for a GPU, off under the interpreter",
        "share_blocks": "target='inductor': compile each distinct decoder block once and run it for every block like "
                        "it (static graphs of 4+ blocks; SmolLM2's cold compile ~2x faster); false: the whole graph at once",
        "check_inputs": "check on every call that token ids lie inside the embedding table (one min/max per call, "
                        "a few microseconds); the first call of each graph checks them in full either way. false: "
                        "skip the per-call check (an id outside the table then reads out of bounds in generated code)",
        "cpp_wrapper": "target='inductor': Inductor's C++ wrapper calls the kernels (no Python between them: faster "
                       "decode steps; the first compile of each graph takes longer)",
        "viz": "keep what lqc.viz draws (graph snapshots per pass, fusion groups, per-node error); a debug_dir turns it on",
    }

    @classmethod
    def parse(cls, options: Any) -> "CompileOptions":
        if options is None:
            return cls()
        if isinstance(options, CompileOptions):
            return options
        if not isinstance(options, dict):
            raise LqcConfigError(f"lqc options must be a dict; got {type(options).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise LqcConfigError(f"unknown lqc option {key!r}.{hint} Valid options: {', '.join(names)}")
        parsed = cls(**options)
        resolve_target(parsed.target)
        for flag in ("verify", "viz", "share_blocks", "check_inputs", "cpp_wrapper"):
            if not isinstance(getattr(parsed, flag), bool):
                raise LqcConfigError(f"{flag} must be true or false; got {getattr(parsed, flag)!r}")
        if parsed.autotune not in (None, True, False):
            raise LqcConfigError(f"autotune must be true, false or null (on for a GPU only); got {parsed.autotune!r}")
        return parsed
