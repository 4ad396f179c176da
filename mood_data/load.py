"""Load MOOD splits from the embedded benchmark, local files/folders or the hub, and validate them.

Every row is checked here (see ``docs/data.md``); any problem is a one-line
:class:`~mood_data.errors.DataError` of the form ``<file>: row <n>: field '<field>': <problem>``.
The result is one ``datasets.Dataset`` per split with exactly the columns ``id`` (str),
``conversation`` (str), ``domain`` (str) and ``malign`` (int 0/1).

Row numbers are 1-based: the line number for JSON lines, the record number (header not
counted) for CSV, the position in the array / table for JSON, parquet and hub splits.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .domains import DEFAULT_REGISTRY, DomainRegistry, check_domain_name, load_registry
from .errors import DataError, where
from .readers import (MAX_LINE_BYTES, READ_ERRORS, DocumentRefused, loads_json, lone_surrogate_field, open_binary,
                      read_capped, read_lines, utf8_encodable)
from .render import ROLES, has_text, is_blank, render

COLUMNS: tuple[str, ...] = ("id", "conversation", "domain", "malign")
OPTIONAL_COLUMNS: tuple[str, ...] = ("source", "meta", "messages", "safe")
SPLITS: tuple[str, ...] = ("train", "test")
# file-name suffix -> reader; .gz only where it makes sense (parquet is compressed already)
SUFFIXES: dict[str, str] = {
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json",
    ".parquet": "parquet", ".csv": "csv", ".csv.gz": "csv",
}
_CSV_BOOL = {"0": 0, "1": 1, "false": False, "true": True}

Record = tuple[int, Any]  # (1-based row number, parsed row)


class LeakageWarning(UserWarning):
    """Train and test share conversations, and ``allow_leakage=True`` let it through."""


class Splits(dict):
    """``{split: datasets.Dataset}``; ``.leakage`` holds the train/test leakage report
    (``None`` when only one split was loaded)."""

    leakage: dict | None = None


# --------------------------------------------------------------------------- file readers

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


def _bad_utf8_field(obj: Any) -> str | None:
    return lone_surrogate_field(obj) if isinstance(obj, Mapping) else None


def _parse_json_line(raw: bytes, label: str, n: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = f"byte 0x{raw[exc.start]:02x}"
        try:  # name the field when the line still parses
            field = _bad_utf8_field(loads_json(raw.decode("utf-8", "surrogateescape")))
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
        raise DataError(f"{label}: expected a JSON array of row objects, got {_type(doc)}")
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
        raise DataError(f"{label}: not a readable parquet file ({_first_line(exc)})") from None
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
        field = _bad_utf8_field(row)
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
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    return enumerate(ds, 1)


# --------------------------------------------------------------------------- validation

def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _label_value(value: Any, loc: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise DataError(f"{loc}: expected 0/1 or bool, got {value!r}")


def _check_messages(messages: Any, loc: str) -> list:
    if not isinstance(messages, list):
        raise DataError(f"{loc}: expected a list of {{role, content}} objects, got {_type(messages)}")
    if not messages:
        raise DataError(f"{loc}: empty list of messages")
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, Mapping):
            raise DataError(f"{loc}: message {i}: expected an object, got {_type(msg)}")
        if msg.get("role") not in ROLES:
            raise DataError(f"{loc}: message {i}: unknown role {msg.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(msg.get("content"), (str, list, type(None))):
            raise DataError(f"{loc}: message {i}: 'content' must be a string, got {_type(msg.get('content'))}")
        if not isinstance(msg.get("tool_calls"), (list, type(None))):
            raise DataError(f"{loc}: message {i}: 'tool_calls' must be a list, got {_type(msg.get('tool_calls'))}")
    return messages


def _conversation(row: Mapping, label: str, n: int, template: Any) -> str:
    conv = row.get("conversation")
    if conv is None and row.get("messages") is not None:
        loc = where(label, n, "messages")
        messages = _check_messages(row["messages"], loc)
        if not has_text(messages):
            raise DataError(f"{loc}: no message holds any text (an empty conversation)")
        try:
            conv = render(messages, template)
        except Exception as exc:  # a user chat template can fail in many ways
            raise DataError(f"{loc}: cannot render ({_first_line(exc)})") from None
        if is_blank(conv):
            raise DataError(f"{loc}: renders to an empty conversation")
        return conv
    loc = where(label, n, "conversation")
    if "conversation" not in row:
        raise DataError(f"{loc}: missing column (and no 'messages' column to render)")
    if not isinstance(conv, str):
        raise DataError(f"{loc}: expected a string, got {_type(conv)}")
    if is_blank(conv):
        raise DataError(f"{loc}: empty conversation")  # only whitespace or invisible characters
    return conv


def validate_row(row: Any, n: int, *, label: str, split: str, registry: DomainRegistry = DEFAULT_REGISTRY,
                 template: Any = "mood") -> tuple[str, str, str, int]:
    """Check one parsed row; return ``(id, conversation, domain, malign)`` or raise DataError."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where(label, n)}: expected an object with columns {', '.join(COLUMNS)}, got {_type(row)}")
    for key in row:
        if key not in COLUMNS and key not in OPTIONAL_COLUMNS:
            raise DataError(
                f"{where(label, n, key)}: unexpected column (allowed: {', '.join(COLUMNS + OPTIONAL_COLUMNS)})"
            )
    values: dict[str, str] = {}
    for key in ("id", "domain"):
        loc = where(label, n, key)
        if key not in row:
            raise DataError(f"{loc}: missing column")
        if not isinstance(row[key], str):
            raise DataError(f"{loc}: expected a string, got {_type(row[key])}")
        if not row[key].strip():
            raise DataError(f"{loc}: empty string")
        values[key] = row[key]
    domain = values["domain"]
    loc = where(label, n, "domain")
    if domain not in registry.known:
        check_domain_name(domain, loc)  # a path-like name is said to be one, not just unknown
        raise DataError(f"{loc}: unknown domain {domain!r} (declare it in a domains YAML, --domains)")
    if split == "train" and not registry.is_id(domain):
        raise DataError(
            f"{loc}: domain {domain!r} is not an ID domain; the train split may hold only "
            f"ID domains ({', '.join(registry.id)})"
        )
    if "malign" in row:
        malign = _label_value(row["malign"], where(label, n, "malign"))
        if "safe" in row and _label_value(row["safe"], where(label, n, "safe")) == malign:
            raise DataError(f"{where(label, n, 'safe')}: contradicts 'malign' (safe must equal 1 - malign)")
    elif "safe" in row:
        malign = 1 - _label_value(row["safe"], where(label, n, "safe"))
    else:
        raise DataError(f"{where(label, n, 'malign')}: missing column (and no 'safe' column)")
    return values["id"], _conversation(row, label, n, template), domain, malign


def validate_records(records: Iterable[Record], *, label: str, split: str,
                     registry: DomainRegistry = DEFAULT_REGISTRY, template: Any = "mood") -> tuple[dict, list[int]]:
    """Validate parsed rows; return the column dict and each kept row's number."""
    from tqdm.auto import tqdm

    cols: dict[str, list] = {c: [] for c in COLUMNS}
    numbers: list[int] = []
    first_row: dict[str, int] = {}
    for n, row in tqdm(records, desc=f"validate {split}", unit=" rows", disable=None, leave=False):
        rid, conv, domain, malign = validate_row(row, n, label=label, split=split, registry=registry, template=template)
        if rid in first_row:
            raise DataError(f"{where(label, n, 'id')}: duplicate id {rid!r} (first at row {first_row[rid]})")
        first_row[rid] = n
        for key, value in zip(COLUMNS, (rid, conv, domain, malign)):
            cols[key].append(value)
        numbers.append(n)
    if not numbers:
        raise DataError(f"{label}: split '{split}' is empty (no rows)")
    return cols, numbers


# --------------------------------------------------------------------------- datasets

def _features():
    from datasets import Features, Value

    return Features({"id": Value("string"), "conversation": Value("string"),
                     "domain": Value("string"), "malign": Value("int64")})


def _to_dataset(cols: dict, *, label: str, split: str):
    from datasets import Dataset, DatasetInfo

    features = _features()
    info = DatasetInfo(description=json.dumps({"source": label, "split": split}), features=features)
    return Dataset.from_dict(cols, features=features, info=info)


def _resolve_registry(registry: DomainRegistry | str | os.PathLike | None) -> DomainRegistry:
    if registry is None:
        return DEFAULT_REGISTRY
    if isinstance(registry, DomainRegistry):
        return registry
    return load_registry(registry)


def _resolve_template(template: Any) -> Any:
    """``"mood"`` (built-in), a tokenizer object, or a tokenizer path / ``embedded:`` name."""
    if template is None or template == "mood":
        return "mood"
    if isinstance(template, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from .embedded import model_path

        try:
            return AutoTokenizer.from_pretrained(str(model_path(str(template))), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{template}: cannot load a tokenizer for its chat template ({_first_line(exc)})") from None
    return template


def _load_records(records: Iterable[Record], *, label: str, split: str, registry: DomainRegistry, template: Any):
    cols, numbers = validate_records(records, label=label, split=split, registry=registry, template=template)
    return _to_dataset(cols, label=label, split=split), numbers


def load_split_file(path: str | Path, split: str | None = None, *, registry: DomainRegistry | str | None = None,
                    template: Any = "mood"):
    """Load and validate one local file as ``split`` (default: from the file name, else test)."""
    split = split or infer_split(path) or "test"
    _check_split_names((split,))
    ds, _ = _load_records(read_records(path), label=str(path), split=split,
                          registry=_resolve_registry(registry), template=_resolve_template(template))
    return ds


def _check_split_names(splits: Sequence[str]) -> None:
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"split {s!r}: unknown split (expected one of {', '.join(SPLITS)})")


def split_files(folder: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """The ``train.*`` / ``test.*`` file of each split in ``folder`` (exactly one each)."""
    folder = Path(folder)
    out = {}
    for split in splits:
        names = {f"{split}{suffix}" for suffix in SUFFIXES}
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() in names)
        if not found:
            raise DataError(f"{folder}: no {split} file (expected one of {', '.join(sorted(names))})")
        if len(found) > 1:
            raise DataError(f"{folder}: several {split} files ({', '.join(p.name for p in found)}); keep one")
        out[split] = found[0]
    return out


def has_local_test_split(source: str | os.PathLike | None) -> bool:
    """True when ``source`` is the embedded benchmark or a local folder with one ``test.*`` file."""
    from .embedded import benchmark_dir

    folder = benchmark_dir() if source is None or str(source) == "embedded" else Path(source)
    if not folder.is_dir():
        return False
    names = {f"test{suffix}" for suffix in SUFFIXES}
    return sum(1 for p in folder.iterdir() if p.is_file() and p.name.lower() in names) == 1


def _near_local(source: str) -> list[str]:
    """Entries of the local folder ``source`` points into whose names are close to its last
    component (a mistyped folder: ``my-data/mood-tset`` next to ``my-data/mood-test``)."""
    import difflib

    path = Path(source).expanduser()
    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return []
    return [str(parent / n) if str(parent) != "." else n
            for n in difflib.get_close_matches(path.name, names, n=3, cutoff=0.8)]


def _looks_like_local(source: str) -> bool:
    """A missing path the user surely meant as a local file or folder, not a hub id: absolute,
    ``.``/``~``, a data-file suffix, more than one ``/`` or a ``\\``, or a path that exists in part
    (its folder exists here, or a local entry has a close name)."""
    if os.path.isabs(source) or source.startswith((".", "~")):
        return True
    if any(source.lower().endswith(s) for s in SUFFIXES):
        return True
    if source.count("/") > 1 or "\\" in source:  # hub ids are "owner/name"
        return True
    parent = Path(source).expanduser().parent
    return (str(parent) != "." and parent.is_dir()) or bool(_near_local(source))


def _not_found(source: str) -> str:
    near = _near_local(source)
    return f"{source}: file not found" + (f" (no such local file or folder; did you mean {', '.join(near)}?)"
                                          if near else "")


def check_source(source: str | os.PathLike | None) -> None:
    """A one-line DataError at once when ``source`` names a local path that does not exist:
    called before any model or adapter is looked at (a mistyped data file is reported as such,
    not as a missing adapter), and never retried as a hub id."""
    if source is None or str(source) == "embedded" or Path(source).exists():
        return
    if _looks_like_local(str(source)):
        raise DataError(_not_found(str(source)))


# --------------------------------------------------------------------------- leakage

def normalize_conversation(text: str) -> str:
    """Lower-case, whitespace collapsed to single spaces: what leakage compares."""
    return " ".join(text.lower().split())


def conversation_hash(text: str) -> str:
    return hashlib.sha1(normalize_conversation(text).encode("utf-8")).hexdigest()


def leakage_report(train, test, *, max_examples: int = 5) -> dict:
    """Test rows whose (normalised) conversation also appears in train.

    ``train``/``test`` are datasets (or mappings) with ``id``, ``conversation`` and ``domain``.
    Returns ``{"n_test_rows", "n_train_rows", "by_domain": {test domain: rows},
    "examples": [{"test_index", "test_id", "train_index", "train_id"}, ...]}``.
    """
    first_train: dict[str, int] = {}
    leaked_train_hashes: set[str] = set()
    train_hashes = [conversation_hash(c) for c in train["conversation"]]
    for i, h in enumerate(train_hashes):
        first_train.setdefault(h, i)
    train_ids, test_ids = list(train["id"]), list(test["id"])
    by_domain: Counter = Counter()
    examples = []
    n_test = 0
    for j, (conv, domain) in enumerate(zip(test["conversation"], test["domain"])):
        h = conversation_hash(conv)
        if h in first_train:
            n_test += 1
            by_domain[domain] += 1
            leaked_train_hashes.add(h)
            if len(examples) < max_examples:
                i = first_train[h]
                examples.append({"test_index": j, "test_id": test_ids[j], "train_index": i, "train_id": train_ids[i]})
    n_train = sum(1 for h in train_hashes if h in leaked_train_hashes)
    return {"n_test_rows": n_test, "n_train_rows": n_train, "by_domain": dict(sorted(by_domain.items())),
            "examples": examples}


def _leakage_message(report: dict, labels: Mapping[str, str], numbers: Mapping[str, list[int]]) -> str:
    ex = report["examples"][0]
    counts = ", ".join(f"{d}={c}" for d, c in report["by_domain"].items())
    return (
        f"{where(labels['test'], numbers['test'][ex['test_index']], 'conversation')}: same conversation as "
        f"{labels['train']} row {numbers['train'][ex['train_index']]} (id {ex['train_id']!r}); "
        f"{report['n_test_rows']} test rows leak from train (by domain: {counts})"
    )


# --------------------------------------------------------------------------- entry point

def cap_groups(ds, max_unsafe: int | None = None, max_safe: int | None = None, seed: int = 0):
    """At most ``max_unsafe`` rows of every (domain, malign=1) group and ``max_safe`` of every
    (domain, malign=0) group, chosen with a seeded permutation, original order kept. For quick
    runs (the demo); ``None`` keeps the group whole."""
    import numpy as np

    caps = {1: max_unsafe, 0: max_safe}
    for cap in caps.values():
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise DataError(f"test row cap: expected a positive integer, got {cap!r}")
    if max_unsafe is None and max_safe is None:
        return ds
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (dom, mal) in enumerate(zip(ds["domain"], ds["malign"])):
        groups.setdefault((dom, int(mal)), []).append(i)
    keep: list[int] = []
    for key in sorted(groups):
        idx, cap = groups[key], caps[key[1]]
        keep += idx if cap is None or len(idx) <= cap else [idx[j] for j in rng.permutation(len(idx))[:cap]]
    return ds if len(keep) == len(ds) else ds.select(sorted(keep))


def load_splits(source: str | os.PathLike | None = None, *, splits: Sequence[str] = SPLITS,
                registry: DomainRegistry | str | os.PathLike | None = None, allow_leakage: bool = False,
                template: Any = "mood") -> Splits:
    """Load, validate and leakage-check MOOD splits; see the module docstring and docs/data.md.

    ``source``: ``None``/``"embedded"`` (the embedded benchmark), a folder with ``train.*`` /
    ``test.*``, a single file (then ``splits`` must name exactly one split), or anything else
    that is not an existing local path: a hub id for ``datasets.load_dataset``.
    """
    from .embedded import benchmark_dir

    splits = tuple(splits)
    _check_split_names(splits)
    if not splits:
        raise DataError("splits: no split requested")
    reg = _resolve_registry(registry)
    tmpl = _resolve_template(template)

    sources: dict[str, tuple[str, Iterable[Record]]] = {}
    if source is None or str(source) == "embedded":
        folder = benchmark_dir()
        if not folder.is_dir():
            raise DataError(f"embedded: benchmark not found at {folder} (build it with `moodguard data build`)")
        for split, path in split_files(folder, splits).items():
            sources[split] = (str(path), read_records(path))
    elif Path(source).is_dir():
        for split, path in split_files(source, splits).items():
            sources[split] = (str(path), read_records(path))
    elif Path(source).is_file():
        if len(splits) != 1:
            raise DataError(f"{source}: a single file holds one split; name it (splits=('test',), --split test) "
                            "or give a folder with train.* and test.* files")
        sources[splits[0]] = (str(source), read_records(source))
    elif Path(source).exists():  # a FIFO, socket or device: say what it is, never block reading it
        from .readers import regular_file

        regular_file(Path(source), DataError)
    elif _looks_like_local(str(source)):
        raise DataError(_not_found(str(source)))
    else:
        for split in splits:
            sources[split] = (f"{source}[{split}]", read_hub_records(str(source), split))

    out = Splits()
    numbers: dict[str, list[int]] = {}
    labels = {split: label for split, (label, _) in sources.items()}
    for split, (label, records) in sources.items():
        out[split], numbers[split] = _load_records(records, label=label, split=split, registry=reg, template=tmpl)

    if "train" in out and "test" in out:
        report = leakage_report(out["train"], out["test"])
        out.leakage = report
        out["test"].info.description = json.dumps({**json.loads(out["test"].info.description), "leakage": report})
        if report["n_test_rows"]:
            message = _leakage_message(report, labels, numbers)
            if not allow_leakage:
                raise DataError(f"{message}; pass --allow-leakage (allow_leakage=True) to load anyway")
            warnings.warn(message, LeakageWarning, stacklevel=2)
    return out
