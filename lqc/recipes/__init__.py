"""Named recipes shipped with lqc: ``options={"recipe": "default"}``.

Each is a YAML file in this folder with a ``description`` and a ``passes`` list; `lqc recipes`
lists them. Anything that is not a name here is handed to lqc.passes.load_recipe unchanged
(a YAML path, a dict, a list of entries or Pass objects).
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Sequence

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
    """The recipe data for a shipped name, a composition of names (``"moe+int8"`` or
    ``["moe", "int8"]``); anything else unchanged."""
    if isinstance(recipe, str) and not recipe.endswith((".yaml", ".yml", ".json")) and "/" not in recipe:
        if "+" in recipe:
            return compose(recipe.split("+"))
        return _named(recipe)
    if isinstance(recipe, (list, tuple)) and recipe and all(isinstance(entry, str) for entry in recipe):
        return compose(list(recipe))
    return recipe


def recipe_file(name: str) -> dict:
    """A shipped recipe's YAML as written."""
    entry = _FOLDER / f"{name.strip()}.yaml"
    if not entry.is_file():
        import difflib

        from lqc.ir.errors import LqcConfigError

        shipped = list(named_recipes())
        close = difflib.get_close_matches(name.strip(), shipped, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LqcConfigError(
            f"no named recipe {name!r}.{hint} Shipped recipes: {', '.join(shipped)}. "
            f"A recipe can also be a composition ('moe+int8'), a YAML file path, a dict or a list of passes."
        )
    return yaml.safe_load(entry.read_text())


def _named(name: str) -> dict:
    data = recipe_file(name)
    return {"description": data.get("description", ""), "passes": data.get("passes") or []}


# -- composing named recipes: "moe+int8", or ["reparam", "int4-gptq"] ------------------------------
# The order every composition follows (docs/recipes.md): clean-up, then passes that change the
# model's structure (what they remove is then never quantized), then exact rewrites, then weight
# quantization, then the KV cache (it rewrites the attention the earlier stages left).
STAGES = {
    "clean-up": ("cleanup",),
    "structural": ("drop_layers", "ffn_to_moe", "route_neurons"),
    "exact": ("merge_adapters", "fold_batchnorm", "merge_branches", "fold_norms", "concat_linears", "rotate"),
    "quantization": ("quantize",),
    "kv-cache": ("compress_kv",),
}
_STAGE_OF = {name: i for i, names in enumerate(STAGES.values()) for name in names}
_ONCE = ("drop_layers", "ffn_to_moe", "route_neurons", "compress_kv")  # a second one would act on what the first made


def compose(names: Sequence[str]) -> dict:
    """One recipe from named recipes, their passes merged in stage order (a stable sort: within a
    stage each recipe's own order is kept). An exact pass both recipes run, with the same options,
    runs once. Raises LqcConfigError naming the two recipes and the pass when they conflict: both
    quantize the same layers, or both carve, drop or compress the KV cache."""
    from lqc.ir.errors import LqcConfigError

    entries: list[tuple[str, dict]] = []
    for name in names:
        for entry in _named(name)["passes"]:
            stage = _STAGE_OF.get(entry["pass"])
            if stage is None:
                raise LqcConfigError(f"recipe {name!r} has pass {entry['pass']!r}, which has no composition stage; "
                                     f"stages: {_stage_list()}")
            if any(entry == seen for _, seen in entries):
                continue  # the same exact rewrite twice: once is enough
            for other, seen in entries:
                if other != name and _conflict(entry, seen):
                    raise LqcConfigError(
                        f"recipes {other!r} and {name!r} conflict: both run {entry['pass']!r}"
                        + (" on the same layers (give one of them `targets`, or pick one recipe)" if entry["pass"] == "quantize"
                           else " (a second one would act on what the first made: pick one recipe)")
                    )
            entries.append((name, entry))
    ordered = sorted(entries, key=lambda item: _STAGE_OF[item[1]["pass"]])
    return {"description": f"composed from {' + '.join(names)}, in stage order: {' -> '.join(STAGES)}",
            "passes": [entry for _, entry in ordered]}


def _conflict(entry: dict, seen: dict) -> bool:
    if entry["pass"] != seen["pass"]:
        return False
    if entry["pass"] in _ONCE:
        return True
    # two quantize steps may share a recipe only when their targets keep them apart
    return entry["pass"] == "quantize" and not (entry.get("targets") and seen.get("targets"))


def _stage_list() -> str:
    return "; ".join(f"{stage}: {', '.join(names)}" for stage, names in STAGES.items())
