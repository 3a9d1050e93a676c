"""A search's choice as an ordinary recipe: per-level ``quantize`` entries (and ``lowrank`` ones)
whose ``targets`` list the linears by their exact module paths, so anyone can read, edit, commit
and rerun it without searching again."""

from __future__ import annotations

import json
import re

from lqc.auto.levels import Level

# the tied embedding and lm_head as int8 rows (the `max` recipe's entry)
TABLE_ENTRY = {"pass": "quantize", "format": "int8", "include_lm_head": True, "include_embedding": True,
               "targets": ["^lm_head$", "embed_tokens$"], "strict": False}


def recipe_from(config: dict[str, str], levels: list[Level], *, method: str, calibration_tokens: int,
                table_int8: bool, description: str) -> dict:
    """``config`` (module path -> level name) as a recipe; linears at ``float`` are left alone."""
    by_name = {lv.name: lv for lv in levels}
    quantize: dict[str, dict] = {}  # one entry per distinct quantize setting, targets gathered
    ranks: dict[int, list[str]] = {}
    for unit, name in config.items():
        level = by_name[name]
        entry = level.quantize_entry(method, calibration_tokens)
        if entry is None:
            continue
        quantize.setdefault(json.dumps(entry, sort_keys=True), {**entry, "targets": []})["targets"].append(_exact(unit))
        if level.rank:
            ranks.setdefault(level.rank, []).append(_exact(unit))
    passes = [{"pass": "cleanup"}, *quantize.values()]
    passes += [{"pass": "lowrank", "rank": r, "calibration_tokens": calibration_tokens, "targets": t} for r, t in sorted(ranks.items())]
    if table_int8:
        passes.append(dict(TABLE_ENTRY))
    return {"description": description, "passes": passes}


def _exact(path: str) -> str:
    return f"^{re.escape(path)}$"
