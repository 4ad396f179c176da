"""Reading the JSON, JSON-lines and YAML files we (or users) write, with one-line errors.

The writing side is :mod:`mood_data.atomic`. Every reader here raises the error class it is
given (``DataError`` for data, ``BundleError`` for bundles and statistics, ...) with a message
that names the file, and the row for JSON lines: never a ``JSONDecodeError`` traceback.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import reprlib
import stat
import sys
import zlib
from pathlib import Path
from typing import IO, Any, Iterator, Mapping

import yaml

from .errors import DataError, MoodguardError, where


# a YAML document may expand (through aliases) to at most this many nodes: an alias bomb is
# refused after a walk of its node graph, before anything is constructed or printed
MAX_YAML_NODES = 100_000
# lists / mappings nested deeper than this in any JSON or YAML document (or JSON line) are
# refused: every consumer below may then walk a document recursively
MAX_DEPTH = 100
# a JSON / CSV line is read at most this long (bytes, decompressed): a small .gz expanding to
# one huge line is refused after MAX_LINE_BYTES, never read whole
MAX_LINE_BYTES = 64 << 20
# a whole-file JSON document (.json, .json.gz) at most this long once decompressed
MAX_DOCUMENT_BYTES = 1 << 30

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxtuple, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for error messages: never expands a big or alias-shared structure."""
    return _SHORT.repr(value)


def regular_file(path: Path, error: type[MoodguardError] = MoodguardError, *, what: str = "file") -> Path:
    """``path`` if it is a regular file; else a one-line ``error``: not found, or what it is
    instead (a FIFO would block the reader, a folder or device is never an input)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise error(f"{path}: is {kind}, not a regular {what}")
    return path


def _expanded_size(node, limit: int) -> int:
    """Nodes in the document once every alias is expanded (shared nodes counted per use,
    memoised, so the walk itself is linear in the file); stops early past ``limit``."""
    memo: dict[int, int] = {}
    busy: set[int] = set()

    def size(n, depth: int) -> int:
        key = id(n)
        if key in memo:
            return memo[key]
        if key in busy:
            raise yaml.YAMLError("recursive alias")
        if depth > MAX_DEPTH and isinstance(n, (yaml.SequenceNode, yaml.MappingNode)):
            raise YamlTooLarge(f"nested deeper than {MAX_DEPTH} levels")
        busy.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            for child in n.value:
                total += size(child, depth + 1)
                if total > limit:
                    break
        elif isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                total += size(k, depth + 1) + size(v, depth + 1)
                if total > limit:
                    break
        busy.discard(key)
        memo[key] = total
        return total

    return size(node, 1)


class DocumentRefused(ValueError):
    """A JSON / YAML document (or line) that parses but is refused: nested deeper than
    :data:`MAX_DEPTH`, a number too long to convert, an alias bomb, a line too long."""


class YamlTooLarge(DocumentRefused):
    pass


def _too_deep(doc: Any, limit: int = MAX_DEPTH) -> bool:
    """True when lists / mappings in ``doc`` nest deeper than ``limit`` (an iterative walk)."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _digits_refused() -> str:
    return f"a number with more than {sys.get_int_max_str_digits()} digits"


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` with bounds: a syntax error is the usual ``json.JSONDecodeError``; a
    document nested deeper than :data:`MAX_DEPTH` or holding an integer too long to convert is a
    :class:`DocumentRefused` (never a ``RecursionError`` / ``ValueError`` traceback)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise DocumentRefused(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise DocumentRefused(_digits_refused()) from None
    brackets = text.count(b"[" if isinstance(text, bytes) else "[") + text.count(b"{" if isinstance(text, bytes) else "{")
    if brackets > MAX_DEPTH and _too_deep(doc):
        raise DocumentRefused(f"nested deeper than {MAX_DEPTH} levels")
    return doc


def safe_load_bounded(text: str, limit: int = MAX_YAML_NODES) -> Any:
    """``yaml.safe_load`` that refuses (:class:`YamlTooLarge`) a document expanding to more than
    ``limit`` nodes or nested deeper than :data:`MAX_DEPTH`: the node graph is composed (aliases
    stay shared), measured, and only then constructed. A value the constructor cannot convert
    (an integer of thousands of digits, a date such as 2020-13-45) is refused the same way."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YamlTooLarge(f"nested deeper than {MAX_DEPTH} levels") from None
        if node is None:
            return None
        try:
            n = _expanded_size(node, limit)
        except RecursionError:
            raise YamlTooLarge(f"nested deeper than {MAX_DEPTH} levels") from None
        if n > limit:
            raise YamlTooLarge(f"expands to more than {limit} nodes through aliases")
        try:
            return loader.construct_document(node)
        except (ValueError, OverflowError) as exc:
            if "integer string conversion" in str(exc):
                raise YamlTooLarge(_digits_refused()) from None
            raise YamlTooLarge(f"a value cannot be converted ({short_repr(str(exc))})") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path, error: type[MoodguardError] = MoodguardError, *, what: str = "file") -> Any:
    """``yaml.safe_load`` of ``path`` (never the unsafe loaders); a missing file or a YAML
    syntax error is a one-line ``error``: ``<path>: <what> not found`` /
    ``<path>: invalid YAML at line N``."""
    path = Path(path)
    regular_file(path, error, what=what)
    try:
        return safe_load_bounded(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid UTF-8 (offset {exc.start})") from None
    except YamlTooLarge as exc:
        raise error(f"{path}: YAML document refused ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise error(f"{path}: invalid YAML{f' at line {mark.line + 1}' if mark is not None else ''}") from None


def read_json(path: str | Path, error: type[MoodguardError] = MoodguardError, *, expect: type | None = dict) -> Any:
    """The parsed JSON document at ``path`` (an object unless ``expect`` says otherwise)."""
    path = Path(path)
    regular_file(path, error)
    try:
        doc = loads_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid UTF-8 (offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except DocumentRefused as exc:
        raise error(f"{path}: JSON document refused ({exc})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if expect is not None and not isinstance(doc, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                    f"got {type(doc).__name__}")
    return doc


def read_lines(fh: IO[bytes], label: object, error: type[MoodguardError] = DataError,
               limit: int = MAX_LINE_BYTES) -> Iterator[bytes]:
    """The byte lines of a binary stream (line ends kept), each read with ``readline(limit + 1)``:
    a line longer than ``limit`` bytes is a one-line ``error`` naming ``label`` and the row,
    and is never held whole (a 2 MB .gz expanding to one 2 GiB line costs ``limit`` bytes)."""
    n = 0
    while True:
        line = fh.readline(limit + 1)
        if not line:
            return
        n += 1
        if len(line) > limit:
            raise error(f"{label}: line {n}: longer than {limit >> 20} MiB (refused)")
        yield line


def read_capped(fh: IO[bytes], label: object, error: type[MoodguardError] = DataError,
                limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The whole stream, refused (one line) past ``limit`` bytes instead of read whole."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"{label}: longer than {limit >> 20} MiB once decompressed (refused; use JSON lines)")
    return data


def open_binary(path: Path):
    """``path`` opened for reading bytes; ``.gz`` decompressed on the fly."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


# what a damaged or non-gzip .gz raises while it is read
READ_ERRORS = (OSError, EOFError, zlib.error)


def jsonl_rows(path: str | Path, error: type[MoodguardError] = DataError) -> Iterator[tuple[int, dict]]:
    """``(row number, object)`` for every non-blank line of a ``.jsonl`` (or ``.jsonl.gz``) file.

    Lines are decoded one at a time, so a bad byte is reported on its own row with its offset;
    a line is read at most :data:`MAX_LINE_BYTES` long; a truncated or non-gzip ``.gz`` is a
    one-line error naming the file."""
    path = Path(path)
    regular_file(path, error)
    try:
        with open_binary(path) as fh:
            yield from _jsonl_objects(read_lines(fh, path, error), path, error)
    except READ_ERRORS as exc:
        raise error(f"{path}: cannot read file ({_read_error(exc)})") from None


def _read_error(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _jsonl_objects(lines: Iterator[bytes], path: Path, error: type[MoodguardError]) -> Iterator[tuple[int, dict]]:
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where(path, i)}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start})") from None
        try:
            row = loads_json(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where(path, i)}: not valid JSON ({exc.msg})") from None
        except DocumentRefused as exc:
            raise error(f"{where(path, i)}: refused ({exc})") from None
        if not isinstance(row, dict):
            raise error(f"{where(path, i)}: expected a JSON object")
        if "\\u" in line:  # only an escape can smuggle in a lone surrogate
            bad = lone_surrogate_field(row)
            if bad is not None:
                raise error(f"{where(path, i, bad)}: not valid Unicode (a lone surrogate such as \\ud800)")
        yield i, row


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def utf8_encodable(value: Any) -> bool:
    """False when a string anywhere in ``value`` (dict keys and values, list items) holds a lone
    surrogate (a JSON ``\\ud800`` escape, or non-UTF-8 bytes decoded with ``surrogateescape``)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, Mapping):
        return all(utf8_encodable(k) and utf8_encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(utf8_encodable(v) for v in value)
    return True


def lone_surrogate_field(row: dict) -> str | None:
    """The first top-level field of ``row`` holding a string with a lone surrogate."""
    return next((str(k) for k, v in row.items() if not (utf8_encodable(k) and utf8_encodable(v))), None)
