"""Reading the rows of one data file (JSON lines, JSON, CSV, parquet; ``.gz`` where it makes sense)
or one hub split, numbered from 1, not yet validated: every read problem is a one-line
:class:`~mood_data.errors.DataError` naming the file and row (``docs/data.md``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .errors import DataError, where
from .readers import (MAX_LINE_BYTES, READ_ERRORS, DocumentRefused, loads_json, lone_surrogate_field, open_binary,
                      read_capped, read_lines, utf8_encodable)

SPLITS: tuple[str, ...] = ("train", "test")
# file-name suffix -> reader; .gz only where it makes sense (parquet is compressed already)
SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json",
    ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv",
}
_CSV_BOOL = {"0": 0, "1": 1, "false": False, "true": True}

Record = tuple[int, Any]  # (1-based row number, parsed row)



def file_format(path: str | Path) -> str:
    """``jsonl`` / ``json`` / ``parquet`` / ``csv`` from the file name, else a DataError."""
    name = Path(path).name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIXES[suffix]
    raise DataError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)})")


def infer_split(path: str | Path) -> str | None:
    """``train`` / ``test`` when the file name starts with it, else ``None``."""
    name = Path(path).name.lower()
    return next((s for s in SPLITS if name.startswith(s)), None)


def _read_bytes(path: Path) -> bytes:
    try:
        with open_binary(path) as fh:
            return read_capped(fh, path)
    except READ_ERRORS as exc:  # gzip.BadGzipFile is an OSError; a damaged stream zlib.error / EOFError
        raise DataError(f"{path}: cannot read file ({exc})") from None


def bad_utf8_field(obj: Any) -> str | None:
    return lone_surrogate_field(obj) if isinstance(obj, Mapping) else None


def _parse_json_line(raw: bytes, label: str, n: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = f"byte 0x{raw[exc.start]:02x}"
        try:  # name the field when the line still parses
            field = bad_utf8_field(loads_json(raw.decode("utf-8", "surrogateescape")))
        except (json.JSONDecodeError, DocumentRefused):
            field = None
        if field is not None:
            raise DataError(f"{where(label, n, field)}: not valid UTF-8 ({byte})") from None
        raise DataError(f"{where(label, n)}: not valid UTF-8 ({byte} at offset {exc.start})") from None
    text = text.rstrip("\r\n")
    if n == 1:
        text = text.lstrip("\ufeff")
    try:
        return loads_json(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where(label, n)}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
    except DocumentRefused as exc:
        raise DataError(f"{where(label, n)}: refused ({exc})") from None


def _read_jsonl_lines(lines: Iterable[bytes], label: str) -> Iterator[Record]:
    seen = False
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        seen = True
        yield n, _parse_json_line(raw, label, n)
    if not seen:
        raise DataError(f"{label}: empty file (no rows)")


def _read_jsonl(path: Path, label: str) -> Iterator[Record]:
    try:
        with open_binary(path) as fh:
            yield from _read_jsonl_lines(read_lines(fh, label), label)
    except READ_ERRORS as exc:
        raise DataError(f"{label}: cannot read file ({exc})") from None


def _read_json(path: Path, label: str) -> Iterator[Record]:
    raw = _read_bytes(path)
    if not raw.strip():
        raise DataError(f"{label}: empty file (no rows)")
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{label}: line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})") from None
    try:
        doc = loads_json(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl_lines(raw.splitlines(), label)
            return
        raise DataError(f"{label}: line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    except DocumentRefused as exc:
        raise DataError(f"{label}: JSON document refused ({exc})") from None
    if isinstance(doc, dict):  # a single row object
        doc = [doc]
    if not isinstance(doc, list):
        raise DataError(f"{label}: expected a JSON array of row objects, got {type_name(doc)}")
    yield from enumerate(doc, 1)


def _csv_text_lines(lines: Iterable[bytes]) -> Iterator[str]:
    """Decoded CSV lines (a leading BOM dropped; bad bytes kept as surrogates, reported per cell)."""
    for n, raw in enumerate(lines):
        text = raw.decode("utf-8", "surrogateescape")
        yield text.lstrip("\ufeff") if n == 0 else text


def _read_csv(path: Path, label: str) -> Iterator[Record]:
    csv.field_size_limit(MAX_LINE_BYTES)  # conversations can be long, but never unbounded
    try:
        with open_binary(path) as fb:
            reader = csv.DictReader(_csv_text_lines(read_lines(fb, label)))
            if not reader.fieldnames:
                raise DataError(f"{label}: empty file (no rows)")
            for n, row in enumerate(reader, 1):
                if None in row:
                    raise DataError(f"{where(label, n)}: more values than header columns")
                for key, value in row.items():
                    if value is None:
                        raise DataError(f"{where(label, n, key)}: missing value (fewer values than header columns)")
                    if not utf8_encodable(value):
                        raise DataError(f"{where(label, n, key)}: not valid UTF-8")
                yield n, _coerce_csv_row(row, label, n)
    except READ_ERRORS as exc:
        raise DataError(f"{label}: cannot read file ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{label}: malformed CSV ({exc})") from None


def _coerce_csv_row(row: dict, label: str, n: int) -> dict:
    """CSV cells are strings: labels ``0/1/true/false`` become ints/bools, ``messages`` is JSON."""
    out = dict(row)
    for key in ("malign", "safe"):
        if key in out and out[key].strip().lower() in _CSV_BOOL:
            out[key] = _CSV_BOOL[out[key].strip().lower()]
    if out.get("messages") not in (None, ""):
        try:
            out["messages"] = loads_json(out["messages"])
        except json.JSONDecodeError as exc:
            raise DataError(f"{where(label, n, 'messages')}: not valid JSON ({exc.msg})") from None
        except DocumentRefused as exc:
            raise DataError(f"{where(label, n, 'messages')}: refused ({exc})") from None
    elif "messages" in out:
        out["messages"] = None
    if out.get("conversation") == "" and out.get("messages") is not None:
        out["conversation"] = None  # empty cell: render the messages instead
    return out


def _read_parquet(path: Path, label: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    if path.stat().st_size == 0:
        raise DataError(f"{label}: empty file (no rows)")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise DataError(f"{label}: not a readable parquet file ({first_line(exc)})") from None
    yield from enumerate(table.to_pylist(), 1)


_READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}


def read_records(path: str | Path) -> Iterator[Record]:
    """Parsed rows of one local file, numbered from 1 (not validated)."""
    from .readers import regular_file

    path = Path(path)
    fmt = file_format(path)
    regular_file(path, DataError)
    return _no_lone_surrogates(_READERS[fmt](path, str(path)), str(path))


def _no_lone_surrogates(records: Iterator[Record], label: str) -> Iterator[Record]:
    """A JSON escape such as ``"\\ud800"`` decodes to a lone surrogate, which no encoder (Arrow,
    the tokenizer, our writers) accepts: a one-line error naming the row and field."""
    for n, row in records:
        field = bad_utf8_field(row)
        if field is not None:
            raise DataError(f"{where(label, n, field)}: not valid Unicode (a lone surrogate such as \\ud800)")
        yield n, row


def read_hub_records(source: str, split: str) -> Iterator[Record]:
    """Rows of ``datasets.load_dataset(source, split=split)`` (a hub id or a local dataset folder)."""
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as exc:  # datasets raises many types (offline, unknown split, bad files)
        raise DataError(
            f"{source}: could not load split '{split}' with datasets.load_dataset "
            f"({type(exc).__name__}: {first_line(exc)})"
        ) from None
    return enumerate(ds, 1)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = ["Record", "SPLITS", "SUFFIXES", "file_format", "first_line", "infer_split", "read_hub_records", "read_records",
           "type_name"]
