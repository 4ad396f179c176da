"""Validating parsed rows: the MOOD schema (``id``, ``conversation`` or ``messages``, ``domain``,
``malign`` or ``safe``), known domains, the ID-only train split and unique ids; every problem a
one-line :class:`~mood_data.errors.DataError` ``<file>: row <n>: field '<field>': <problem>``."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from .domains import DEFAULT_REGISTRY, DomainRegistry, check_domain_name
from .errors import DataError, where
from .records import Record, first_line, type_name
from .render import ROLES, has_text, is_blank, render

COLUMNS: tuple[str, ...] = ("id", "conversation", "domain", "malign")
OPTIONAL_COLUMNS: tuple[str, ...] = ("source", "meta", "messages", "safe")


def _label_value(value: Any, loc: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise DataError(f"{loc}: expected 0/1 or bool, got {value!r}")


def _check_messages(messages: Any, loc: str) -> list:
    if not isinstance(messages, list):
        raise DataError(f"{loc}: expected a list of {{role, content}} objects, got {type_name(messages)}")
    if not messages:
        raise DataError(f"{loc}: empty list of messages")
    for i, msg in enumerate(messages, 1):
        if not isinstance(msg, Mapping):
            raise DataError(f"{loc}: message {i}: expected an object, got {type_name(msg)}")
        if msg.get("role") not in ROLES:
            raise DataError(f"{loc}: message {i}: unknown role {msg.get('role')!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(msg.get("content"), (str, list, type(None))):
            raise DataError(f"{loc}: message {i}: 'content' must be a string, got {type_name(msg.get('content'))}")
        if not isinstance(msg.get("tool_calls"), (list, type(None))):
            raise DataError(f"{loc}: message {i}: 'tool_calls' must be a list, got {type_name(msg.get('tool_calls'))}")
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
            raise DataError(f"{loc}: cannot render ({first_line(exc)})") from None
        if is_blank(conv):
            raise DataError(f"{loc}: renders to an empty conversation")
        return conv
    loc = where(label, n, "conversation")
    if "conversation" not in row:
        raise DataError(f"{loc}: missing column (and no 'messages' column to render)")
    if not isinstance(conv, str):
        raise DataError(f"{loc}: expected a string, got {type_name(conv)}")
    if is_blank(conv):
        raise DataError(f"{loc}: empty conversation")  # only whitespace or invisible characters
    return conv


def validate_row(row: Any, n: int, *, label: str, split: str, registry: DomainRegistry = DEFAULT_REGISTRY,
                 template: Any = "mood") -> tuple[str, str, str, int]:
    """Check one parsed row; return ``(id, conversation, domain, malign)`` or raise DataError."""
    if not isinstance(row, Mapping):
        raise DataError(f"{where(label, n)}: expected an object with columns {', '.join(COLUMNS)}, got {type_name(row)}")
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
            raise DataError(f"{loc}: expected a string, got {type_name(row[key])}")
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


__all__ = ["COLUMNS", "OPTIONAL_COLUMNS", "validate_records", "validate_row"]
