"""Recipes: an ordered list of ``{"pass": NAME, ...options}``, as data.

Accepted forms: a list of entries (dicts or Pass objects), a dict ``{"passes": [...]}``, a single
entry dict, or the path of a YAML/JSON file holding one of those. Named recipes ("int4") live in
``lqc.recipes``, above this layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from lqc.ir.errors import LqcConfigError

from lqc.passes.base import Pass
from lqc.passes.registry import get_pass

RecipeLike = "None | str | os.PathLike | dict | list"


def load_recipe(recipe: Any) -> list[Pass]:
    """Turn any recipe form into Pass objects, validating every name and option up front."""
    if recipe is None:
        return []
    if isinstance(recipe, Pass):
        return [recipe]
    if isinstance(recipe, (str, os.PathLike)):
        return load_recipe(read_recipe_file(recipe))
    if isinstance(recipe, dict):
        if "passes" in recipe:
            return load_recipe(recipe["passes"])
        if "pass" in recipe:
            return [make_pass(recipe)]
        raise LqcConfigError(f"a recipe dict needs a 'passes' list or a 'pass' name; got keys {sorted(recipe)}")
    if isinstance(recipe, Iterable):
        passes = []
        for i, entry in enumerate(recipe):
            if isinstance(entry, Pass):
                passes.append(entry)
            elif isinstance(entry, dict):
                passes.append(make_pass(entry, index=i))
            else:
                raise LqcConfigError(f"recipe entry {i} must be a dict like {{'pass': 'cleanup'}} or a Pass; got {entry!r}")
        return passes
    raise LqcConfigError(f"cannot read a recipe from a {type(recipe).__name__}")


def make_pass(entry: dict[str, Any], *, index: int | None = None) -> Pass:
    where = f"recipe entry {index}" if index is not None else "recipe entry"
    if "pass" not in entry:
        raise LqcConfigError(f"{where} has no 'pass' key: {entry!r}")
    options = {k: v for k, v in entry.items() if k != "pass"}
    return get_pass(str(entry["pass"]))(**options)


def read_recipe_file(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise LqcConfigError(
            f"recipe {str(path)!r} is neither a named recipe nor a file. "
            f"Give a named recipe (see `lqc recipes`), a YAML file, a dict or a list of passes."
        )
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise LqcConfigError(f"recipe file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {exc}") from exc


def recipe_entries(passes: list[Pass]) -> list[dict[str, Any]]:
    """The recipe as plain data again (for manifests, cache keys and reports)."""
    import dataclasses

    return [{"pass": p.name, **dataclasses.asdict(p.options)} for p in passes]


def options_digest(p: Pass) -> str:
    """A stable digest of a pass's name and options: the part of a cache key a recipe controls."""
    import dataclasses

    options = dataclasses.asdict(p.options)
    options.pop("strict")  # whether a pattern matching nothing errors or warns changes no weight: same cache key
    text = json.dumps({"pass": p.name, **options}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
