"""Reading the JSON, JSON-lines and YAML files we (or users) write, with one-line errors.

The writing side is :mod:`mood_data.atomic`. Every reader here raises the error class it is
given (``DataError`` for data, ``BundleError`` for bundles and statistics, ...) with a message
that names the file, and the row for JSON lines: never a ``JSONDecodeError`` traceback.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any, Iterator

import yaml

from .errors import DataError, MoodguardError, where


def read_yaml(path: str | Path, error: type[MoodguardError] = MoodguardError, *, what: str = "file") -> Any:
    """``yaml.safe_load`` of ``path`` (never the unsafe loaders); a missing file or a YAML
    syntax error is a one-line ``error``: ``<path>: <what> not found`` /
    ``<path>: invalid YAML at line N``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid UTF-8 (offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(f"{path}: invalid YAML{f' at line {mark.line + 1}' if mark is not None else ''}") from None


def read_json(path: str | Path, error: type[MoodguardError] = MoodguardError, *, expect: type | None = dict) -> Any:
    """The parsed JSON document at ``path`` (an object unless ``expect`` says otherwise)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid UTF-8 (offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if expect is not None and not isinstance(doc, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                    f"got {type(doc).__name__}")
    return doc


def jsonl_rows(path: str | Path, error: type[MoodguardError] = DataError) -> Iterator[tuple[int, dict]]:
    """``(row number, object)`` for every non-blank line of a ``.jsonl`` (or ``.jsonl.gz``) file.

    Lines are decoded one at a time, so a bad byte is reported on its own row with its offset."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for i, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise error(f"{where(path, i)}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                            f"{exc.start})") from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where(path, i)}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{where(path, i)}: expected a JSON object")
            yield i, row
