"""The one error type that user-facing commands turn into a one-line message.

Every problem caused by the user's input (a data file, a recipe, a bundle, a command-line
value) is raised as :class:`MoodguardError` or a subclass. The CLI prints ``str(err)`` on one
line and exits non-zero; it never shows a traceback for these.
"""
from __future__ import annotations


class MoodguardError(Exception):
    """A problem with user input. ``str()`` is a single line naming file, row and field."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()) if "\n" in str(message) else str(message))


class DataError(MoodguardError):
    """Bad data file or row."""


class RecipeError(MoodguardError):
    """Bad recipe file or key."""


class BundleError(MoodguardError):
    """Bad or tampered monitor bundle / fitted statistics."""


class OutputError(MoodguardError):
    """An output cannot be written: disk full, not a folder, locked by another process, or a
    value (NaN / inf) that must never reach a JSON file."""


def where(file: object, row: int | None = None, field: str | None = None) -> str:
    """Format the location prefix used by every data error: ``file:row: field 'x':``."""
    parts = [str(file)]
    if row is not None:
        parts.append(f"row {row}")
    loc = ":".join(parts) if row is None else f"{parts[0]}: {parts[1]}"
    if field is not None:
        loc += f": field '{field}'"
    return loc
