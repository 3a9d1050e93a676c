"""The pass registry: recipe names -> Pass classes.

Built-in passes register when ``lqc.passes`` is imported. A user's pass registers with the
``@register_pass`` decorator when its module is imported; a package can also publish passes
under the entry-point group ``lqc.passes`` (``name = "module:PassClass"``), loaded on first lookup.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from lqc.ir.errors import LqcConfigError

from lqc.passes.base import Pass

_REGISTRY: dict[str, type[Pass]] = {}
_entry_points_loaded = False


def register_pass(cls: type[Pass] | None = None, *, replace: bool = False):
    """Class decorator: make ``cls`` usable in recipes as ``{"pass": cls.name}``."""

    def register(cls: type[Pass]) -> type[Pass]:
        if not cls.name:
            raise ValueError(f"{cls.__name__} needs a class attribute `name` to be registered")
        existing = _REGISTRY.get(cls.name)
        if existing is not None and existing is not cls and not replace:
            raise ValueError(
                f"a pass named {cls.name!r} is already registered ({existing.__module__}.{existing.__qualname__}); "
                f"choose another name or pass replace=True"
            )
        _REGISTRY[cls.name] = cls
        return cls

    return register(cls) if cls is not None else register


def unregister_pass(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_pass(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        _load_entry_points()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise LqcConfigError(
            f"no pass named {name!r} is registered.{hint} Registered passes: {', '.join(sorted(_REGISTRY)) or '(none)'}. "
            f"A pass of your own registers with @lqc.passes.register_pass when its module is imported."
        )
    return _REGISTRY[name]


def registered_passes() -> dict[str, type[Pass]]:
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group="lqc.passes"):
        cls = ep.load()
        if ep.name not in _REGISTRY:
            _REGISTRY[ep.name] = cls
