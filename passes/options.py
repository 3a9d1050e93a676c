"""Typed pass options: a dataclass per pass, built from recipe dicts with clear errors.

A recipe entry ``{"pass": "quantize", "group_size": "64"}`` is checked against the pass's
options dataclass: unknown keys are refused with the valid ones listed (and a close match
suggested), values are checked against the field types (``Literal`` choices listed).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin

from lqc.ir.errors import LqcConfigError


@dataclass
class PassOptions:
    """Options every pass takes."""

    targets: list[str] = field(
        default_factory=list,
        metadata={"help": "regexes (re.search) over module paths: only these modules are rewritten; empty means all"},
    )
    ignore: list[str] = field(
        default_factory=list, metadata={"help": "regexes (re.search) over module paths to leave alone"}
    )
    strict: bool = field(
        default=True,
        metadata={
            "help": "a targets/ignore pattern that matches no module of a graph is an error; false: only a warning "
            "(for recipes meant for several model families, whose module names differ)"
        },
    )


def parse_options(cls: type[PassOptions], values: dict[str, Any], *, pass_name: str) -> PassOptions:
    """Build ``cls`` from ``values``, raising LqcConfigError that names the pass and the fix."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise LqcConfigError(
                f"pass {pass_name!r} has no option {key!r}.{hint} Valid options: {', '.join(sorted(fields))}"
            )
    hints = typing.get_type_hints(cls)
    converted = {key: _check(value, hints[key], f"{pass_name}.{key}") for key, value in values.items()}
    try:
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LqcConfigError):
            raise
        raise LqcConfigError(f"pass {pass_name!r}: {exc}") from exc


def describe_options(cls: type[PassOptions]) -> list[dict[str, str]]:
    """name, type, default and help of every option, for `lqc passes` and the docs."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append(
            {"name": f.name, "type": type_label(hints[f.name]), "default": repr(default), "help": f.metadata.get("help", "")}
        )
    return rows


def type_label(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_label(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        return f"list[{type_label(inner)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise LqcConfigError(f"{where} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _check(value, option, where)
            except LqcConfigError:
                continue
        raise LqcConfigError(f"{where} must be {type_label(tp)}; got {value!r}")
    if tp is type(None):
        if value is not None:
            raise LqcConfigError(f"{where} must be None; got {value!r}")
        return value
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if isinstance(value, str):  # targets: "mlp" means ["mlp"]
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise LqcConfigError(f"{where} must be a list; got {value!r}")
        return [_check(v, inner, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise LqcConfigError(f"{where} must be a mapping; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise LqcConfigError(f"{where} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise LqcConfigError(f"{where} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LqcConfigError(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise LqcConfigError(f"{where} must be a string; got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise LqcConfigError(f"{where} must be a {tp.__name__}; got {value!r}")
    return value
