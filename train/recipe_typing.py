"""The typed parser of a recipe: a merged mapping checked against the schema's dataclasses
(:mod:`train.recipe_schema`), every problem one line naming the file that set the key; and the
explanation of a resolved recipe (each value with its help text and origin).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Mapping

from mood_data.errors import RecipeError
from mood_data.readers import short_repr


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


_PLAIN: dict[Any, Any] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    dict: lambda v: isinstance(v, dict),
}


def _convert(value: Any, tp: Any, dotted: str, origin: Mapping[str, str], fallback: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    org = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return build(tp, value, dotted + ".", origin, fallback)
    if org in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, dotted, origin, fallback)
            except _Mismatch:
                continue
        raise _Mismatch
    if org is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if org is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{dotted}[{i}]", origin, fallback) for i, v in enumerate(value)]
    if tp in _PLAIN:  # taken as they are when the YAML type matches exactly (bool is no int)
        if _PLAIN[tp](value):
            return value
        raise _Mismatch
    if tp is float:  # finite numbers only: NaN / inf (.nan, .inf, "nan", 1e999) are refused
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                out = float(value)
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(out):
            raise _Mismatch
        return out
    raise TypeError(f"unsupported annotation {tp!r}")  # pragma: no cover - schema bug


def _non_finite(value: Any) -> bool:
    try:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool) and not math.isfinite(float(value))
    except (ValueError, OverflowError):
        return False


def where(dotted: str, origin: Mapping[str, str], fallback: str) -> str:
    key = dotted.split("[", 1)[0]
    while key:
        if key in origin:
            return origin[key]
        key = key.rsplit(".", 1)[0] if "." in key else ""
    return fallback


def build(cls: type, data: Mapping[str, Any], prefix: str, origin: Mapping[str, str], fallback: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise RecipeError(f"{where(dotted, origin, fallback)}: key '{dotted}': unknown key")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{fallback}: key '{dotted}': missing required key")
            continue
        value = data[name]
        try:
            kwargs[name] = _convert(value, hints[name], dotted, origin, fallback)
        except _Mismatch:
            raise RecipeError(
                f"{where(dotted, origin, fallback)}: key '{dotted}': expected {_type_name(hints[name])}, "
                f"got {short_repr(value)}{' (NaN/inf refused: a finite number)' if _non_finite(value) else ''}"
            ) from None
    return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class Explained:
    """One resolved value of a recipe: its dotted key, value, help text and where it came from."""

    key: str
    value: Any
    help: str
    origin: str


def explain_values(obj: Any, origins: Mapping[str, str], prefix: str = "") -> list[Explained]:
    """Every leaf value of a schema dataclass instance (sections recursed), in schema order, with
    its help and the file (or override) that set exactly that key; ``default`` when none did."""
    out: list[Explained] = []
    for f in dataclasses.fields(obj):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += explain_values(value, origins, key + ".")
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):  # a list of sections (cascade.stages): one row per field
                out += [dataclasses.replace(row, origin=where(row.key, origins, "default"))
                        for row in explain_values(item, origins, f"{key}[{i}].")]
        else:
            out.append(Explained(key, value, f.metadata.get("help", ""), origins.get(key, "default")))
    return out


__all__ = ["Explained", "build", "explain_values", "where"]
