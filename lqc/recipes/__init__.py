"""Named recipes shipped with lqc: ``options={"recipe": "default"}``.

Each is a YAML file in this folder with a ``description`` and a ``passes`` list; `lqc recipes`
lists them. Anything that is not a name here is handed to lqc.passes.load_recipe unchanged
(a YAML path, a dict, a list of entries or Pass objects).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

_FOLDER = resources.files(__name__)


def named_recipes() -> dict[str, str]:
    """name -> description of every shipped recipe."""
    out = {}
    for entry in sorted(_FOLDER.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            data = yaml.safe_load(entry.read_text())
            out[entry.name[: -len(".yaml")]] = data.get("description", "")
    return out


def resolve_recipe(recipe: Any) -> Any:
    """The recipe data for a shipped name; anything else unchanged."""
    if isinstance(recipe, str) and not recipe.endswith((".yaml", ".yml", ".json")) and "/" not in recipe:
        entry = _FOLDER / f"{recipe}.yaml"
        if entry.is_file():
            return yaml.safe_load(entry.read_text())
        from lqc.ir.errors import LqcConfigError

        raise LqcConfigError(
            f"no named recipe {recipe!r}; shipped recipes: {', '.join(named_recipes())}. "
            f"A recipe can also be a YAML file path, a dict or a list of passes."
        )
    return recipe
