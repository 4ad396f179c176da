"""One-line checks of values read from a file we did not write (a bundle's JSON, an adapter's
config): each names the file and field, as a :class:`~mood_data.errors.BundleError`."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mood_data.errors import BundleError
from mood_data.readers import short_repr


def fail(path: Path, field: str, message: str):
    raise BundleError(f"{path}: field '{field}': {message}")


def check_int(path: Path, field: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        fail(path, field, f"expected an integer, got {short_repr(value)}")
    if value < minimum:
        fail(path, field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        fail(path, field, f"must be <= {maximum}, got {short_repr(value)}")
    return value


def check_bool(path: Path, field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        fail(path, field, f"expected true or false (a JSON boolean), got {short_repr(value)}")
    return value


def check_str(path: Path, field: str, value: Any, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str) or not value:
        fail(path, field, f"expected a non-empty string, got {short_repr(value)}")
    if choices is not None and value not in choices:
        fail(path, field, f"expected one of {list(choices)}, got {short_repr(value)}")
    return value


def check_number(path: Path, field: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        fail(path, field, f"expected a finite number, got {short_repr(value)}")
    return float(value)


def check_name(path: Path, field: str, value: Any) -> str:
    """A file/folder name inside the bundle: no separators, no '..'."""
    check_str(path, field, value)
    if "/" in value or "\\" in value or value in (".", ".."):
        fail(path, field, f"{short_repr(value)} is not a plain name")
    return value


__all__ = ["check_bool", "check_int", "check_name", "check_number", "check_str", "fail"]
