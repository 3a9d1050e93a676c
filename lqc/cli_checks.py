"""The ``lqc`` command's arguments, checked before a model loads: a typo costs a second, not a
model load and a run. Each ``check_NAME`` (for the subcommand NAME) raises LqcConfigError naming
the flag and the fix; ``lqc.cli.main`` prints it and exits with code 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml


def recipe_arg(value: str) -> Any:
    """A recipe from the command line: a name, a file, or inline YAML/JSON (``'[{pass: cleanup}]'``)."""
    if value.lstrip().startswith(("[", "{")):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError as exc:
            from lqc.ir.errors import LqcConfigError

            mark = getattr(exc, "problem_mark", None)
            where = f" at column {mark.column + 1}" if mark is not None else ""
            raise LqcConfigError(f"--recipe {value!r} is not valid inline YAML ({getattr(exc, 'problem', exc)}{where}); "
                                 f"write it like --recipe '[{{pass: cleanup}}, {{pass: quantize, format: int8}}]'") from None
    return value


def check_eval(args) -> None:
    _check_numbers(args, positive=("windows", "gen_tokens", "threads"), at_least_zero=("gen_prompts",))
    if args.window_length < 2:
        _refuse(f"--window-length must be at least 2 (every token of a window but the first is scored); got {args.window_length}")
    _check_recipe(args.recipe, calibration_missing=args.calibration is None)
    _check_target(args.target)
    _check_text(args.text, "--text")
    _check_text(args.calibration, "--calibration")
    _check_writable(args.debug_dir, "--debug-dir", folder=True)
    _check_writable(args.json, "--json")
    _check_model(args.model)
    _check_tokenizer(args.model, "lqc eval scores text")


def check_compress(args) -> None:
    _check_numbers(args, positive=("threads",))
    from lqc.serialize import SAVABLE_PASSES

    passes = _check_recipe(args.recipe, calibration_missing=args.calibration is None)
    # what lqc.save will refuse after the compression, refused before it
    unsavable = sorted({p.name for p in passes} - set(SAVABLE_PASSES))
    if unsavable:
        _refuse(f"lqc compress saves recipes of {', '.join(SAVABLE_PASSES)} passes; recipe {args.recipe!r} also has "
                f"{', '.join(unsavable)}: drop them, or try it without saving with lqc eval")
    if any(getattr(p.options, "include_embedding", False) for p in passes):
        _refuse(f"lqc compress cannot save int8 embedding tables yet (recipe {args.recipe!r} sets include_embedding): "
                f"use a recipe without it, or try it without saving with lqc eval")
    _check_text(args.calibration, "--calibration")
    _check_writable(args.out, "--out", folder=True)
    _check_model(args.model)
    if args.calibration is not None:
        _check_tokenizer(args.model, "--calibration is text")


def check_sensitivity(args) -> None:
    from lqc.passes.recipe import make_pass

    _check_numbers(args, positive=("tokens", "window_length", "top", "threads"))
    # the quantize entry cmd_sensitivity runs, built now: format, group size and --targets regexes checked
    make_pass({"pass": "quantize", "format": args.format, "group_size": args.group_size,
               "include_lm_head": args.include_lm_head, "targets": args.targets})
    _check_text(args.calibration, "--calibration")
    _check_writable(args.json, "--json")
    _check_model(args.model)
    _check_tokenizer(args.model, "lqc sensitivity calibrates on text")


def check_kv(args) -> None:
    from lqc.runtime.kv.cache import check_cache_options

    if any(context < 1 for context in args.context):
        _refuse(f"--context must be at least 1 token; got {' '.join(map(str, args.context))}")
    try:
        check_cache_options(args.bits or None, args.group, args.residual, args.sinks, args.window, None, 1)
    except ValueError as exc:
        _refuse(f"--bits/--group/--residual/--sinks/--window: {exc}")
    _check_writable(args.json, "--json")
    _check_model(args.model)


def check_bench(args) -> None:
    _check_numbers(args, positive=("prefill_tokens", "prompt_tokens", "decode_tokens", "runs", "threads", "profile_steps"))
    _check_recipe(args.recipe)
    _check_target(args.target)
    _check_writable(args.json, "--json")
    _check_model(args.model)


def check_demo(args) -> None:
    _check_numbers(args, positive=("windows", "decode_tokens", "runs", "threads"))
    _check_writable(args.cache_dir, "--cache-dir", folder=True)
    _check_model(args.model)
    _check_tokenizer(args.model, "lqc demo scores text")


def check_viz(args) -> None:
    if args.svg and not args.dot:
        _refuse("--svg renders the --dot file: pass --dot too")
    _check_numbers(args, positive=("tokens", "threads"))
    _check_recipe(args.recipe)  # calibration: "calib" unless given, dropped for a model without a tokenizer
    from lqc.models import TINY_CONFIGS

    if args.model not in TINY_CONFIGS:
        _check_text(args.calibration, "--calibration")
    elif args.calibration != "calib":  # the default is dropped for a tiny model (random ids); a text given is not
        _check_tokenizer(args.model, "--calibration is text")
    for value, flag in ((args.out, "--out"), (args.dot, "--dot"), (args.svg, "--svg")):
        _check_writable(value, flag)
    _check_model(args.model)


def _refuse(message: str):
    from lqc.ir.errors import LqcConfigError

    raise LqcConfigError(message)


def _check_numbers(args, positive: tuple[str, ...] = (), at_least_zero: tuple[str, ...] = ()) -> None:
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            _refuse(f"--{name.replace('_', '-')} must be a positive integer; got {value}")
    for name in at_least_zero:
        value = getattr(args, name)
        if value < 0:
            _refuse(f"--{name.replace('_', '-')} must be 0 or more; got {value}")


def _check_recipe(value: str, *, calibration_missing: bool = False) -> list:
    """Resolve and build the recipe (names, options, regexes); refuse a pass that needs calibration
    when the command has none to give it."""
    from lqc.passes import load_recipe
    from lqc.recipes import resolve_recipe

    passes = load_recipe(resolve_recipe(recipe_arg(value)))
    needy = [p.name for p in passes if "calibration" in p.requirements()]
    if calibration_missing and needy:
        _refuse(f"recipe {value!r} needs calibration data (pass {needy[0]!r}): add --calibration calib "
                f"(the shared calibration text) or --calibration PATH of a text file")
    return passes


def _check_target(target: str) -> None:
    from lqc.codegen.targets import TARGETS

    if target not in TARGETS:
        _refuse(f"--target must be one of {', '.join(TARGETS)}; got {target!r}")


def _check_text(value: str | None, flag: str) -> None:
    """A text argument: 'eval' / 'calib' (the shared texts) or a file; None: not given."""
    if value is None:
        return
    from lqc.data import data_file

    path = data_file(value)  # raises, naming LQC_DATA_DIR, when the shared folder is missing
    if not path.is_file():
        _refuse(f"{flag} {value!r}: no such file ({path}); give 'eval' or 'calib' (the shared texts) or a text file path")


def _check_writable(value: str | None, flag: str, folder: bool = False) -> None:
    """Where output goes: not a file where a folder goes (or the reverse), under a folder we may write."""
    if value is None:
        return
    path = Path(value)
    if folder and path.is_file():
        _refuse(f"{flag} {value!r} is a file; give a folder to write into")
    if not folder and path.is_dir():
        _refuse(f"{flag} {value!r} is a folder; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # missing folders are made: check the first that exists
        parent = parent.parent
    if not parent.is_dir():
        _refuse(f"{flag} {value!r}: {parent} is a file, so nothing can be written under it; pick another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        _refuse(f"{flag} {value!r}: cannot write into {parent} (permission denied); pick a folder you can write")


def _check_model(name: str) -> None:
    """What lqc.models.load would load, checked without loading it (lqc.models.model_kind)."""
    from lqc.ir.errors import LqcConfigError
    from lqc.models import model_kind

    try:
        model_kind(name)
    except LqcConfigError as exc:
        _refuse(f"--model: {exc}")


def _check_tokenizer(name: str, why: str) -> None:
    """The tiny random models have no tokenizer (lqc.models builds them from a config alone)."""
    from lqc.models import TINY_CONFIGS

    if name in TINY_CONFIGS:
        _refuse(f"{why} and {name} has no tokenizer (a tiny random model): text needs a tokenizer. "
                f"Give a model that has one (smollm2-135m, a Hugging Face folder with its tokenizer)")
