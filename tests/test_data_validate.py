"""Every data validation error, with its exact one-line message."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from mood_data.errors import DataError
from mood_data.load import load_split_file, load_splits

OK = {"id": "a", "conversation": "<start_of_turn>user\nhi<end_of_turn>\n", "domain": "hh-rlhf-helpful", "malign": 0}
ALLOWED = "id, conversation, domain, malign, source, meta, messages, safe"


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _error(path: Path, split: str = "test", **kw) -> str:
    with pytest.raises(DataError) as exc:
        load_split_file(path, split, **kw)
    message = str(exc.value)
    assert "\n" not in message
    return message


def _row(**changes) -> dict:
    row = dict(OK, id="b")
    for key, value in changes.items():
        if value is _DROP:
            row.pop(key)
        else:
            row[key] = value
    return row


_DROP = object()

# (second row's changes, field, problem)
ROW_CASES = [
    (dict(domain=_DROP), "domain", "missing column"),
    (dict(id=_DROP), "id", "missing column"),
    (dict(malign=_DROP), "malign", "missing column (and no 'safe' column)"),
    (dict(conversation=_DROP), "conversation", "missing column (and no 'messages' column to render)"),
    (dict(id=7), "id", "expected a string, got int"),
    (dict(conversation=None), "conversation", "expected a string, got null"),
    (dict(conversation=["x"]), "conversation", "expected a string, got list"),
    (dict(domain=3), "domain", "expected a string, got int"),
    (dict(malign="yes"), "malign", "expected 0/1 or bool, got 'yes'"),
    (dict(malign=2), "malign", "expected 0/1 or bool, got 2"),
    (dict(malign=1.0), "malign", "expected 0/1 or bool, got 1.0"),
    (dict(malign="1"), "malign", "expected 0/1 or bool, got '1'"),
    (dict(conversation=" \n\t "), "conversation", "empty conversation"),
    (dict(id=""), "id", "empty string"),
    (dict(domain="foo"), "domain", "unknown domain 'foo' (declare it in a domains YAML, --domains)"),
    (dict(label=1), "label", f"unexpected column (allowed: {ALLOWED})"),
    (dict(safe=0), "safe", "contradicts 'malign' (safe must equal 1 - malign)"),
    (dict(conversation=_DROP, messages="hi"), "messages", "expected a list of {role, content} objects, got str"),
    (dict(conversation=_DROP, messages=[]), "messages", "empty list of messages"),
    (dict(conversation=_DROP, messages=[{"role": "bot", "content": "x"}]), "messages",
     "message 1: unknown role 'bot' (expected one of system, user, assistant, tool)"),
    (dict(conversation=_DROP, messages=[{"role": "user", "content": 5}]), "messages",
     "message 1: 'content' must be a string, got int"),
]


@pytest.mark.parametrize("changes,field,problem", ROW_CASES, ids=[c[2][:30] for c in ROW_CASES])
def test_row_errors_exact_message(tmp_path, changes, field, problem):
    path = _jsonl(tmp_path / "test.jsonl", [OK, _row(**changes)])
    assert _error(path) == f"{path}: row 2: field '{field}': {problem}"


def test_duplicate_id_names_both_rows(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", [OK, _row(id="c"), _row(id="a")])
    assert _error(path) == f"{path}: row 3: field 'id': duplicate id 'a' (first at row 1)"


def test_row_number_is_the_line_number_with_blank_lines(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", [OK, "", "   ", _row(malign="no")])
    assert _error(path) == f"{path}: row 4: field 'malign': expected 0/1 or bool, got 'no'"


def test_malformed_json_line(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", [OK, _row(), '{"id": "x"'])
    assert _error(path) == f"{path}: row 3: malformed JSON line (Expecting ',' delimiter at column 11)"


def test_row_not_an_object(tmp_path):
    path = _jsonl(tmp_path / "test.jsonl", [OK, "[1, 2]"])
    assert _error(path) == f"{path}: row 2: expected an object with columns id, conversation, domain, malign, got list"


def test_non_utf8_bytes_name_row_and_field(tmp_path):
    path = tmp_path / "test.jsonl"
    bad = json.dumps(_row()).encode().replace(b"hi", b"h\xffi")
    path.write_bytes(json.dumps(OK).encode() + b"\n" + bad + b"\n")
    assert _error(path) == f"{path}: row 2: field 'conversation': not valid UTF-8 (byte 0xff)"


def test_non_utf8_bytes_in_a_broken_line_name_the_offset(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_bytes(json.dumps(OK).encode() + b"\n" + b'{"id": "\xfe\n')
    assert _error(path) == f"{path}: row 2: not valid UTF-8 (byte 0xfe at offset 8)"


def test_non_utf8_in_csv_names_field(tmp_path):
    path = tmp_path / "test.csv"
    path.write_bytes(b"id,conversation,domain,malign\na,ok,hh-rlhf-helpful,0\nb,bad\xe9,hh-rlhf-helpful,1\n")
    assert _error(path) == f"{path}: row 2: field 'conversation': not valid UTF-8"


def test_non_utf8_in_json_names_the_line(tmp_path):
    path = tmp_path / "test.json"
    path.write_bytes(b'[\n{"id": "a"},\n{"id": "\xff"}\n]')
    assert _error(path) == f"{path}: line 3: not valid UTF-8 (byte 0xff)"


@pytest.mark.parametrize("name,content", [("test.jsonl", b""), ("test.jsonl", b"\n  \n"), ("test.json", b" "),
                                          ("test.csv", b""), ("test.parquet", b"")])
def test_empty_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert _error(path) == f"{path}: empty file (no rows)"


def test_empty_gz_file(tmp_path):
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wb"):
        pass
    assert _error(path) == f"{path}: empty file (no rows)"


@pytest.mark.parametrize("name,content", [("test.json", b"[]"), ("test.csv", b"id,conversation,domain,malign\n")])
def test_empty_split(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert _error(path, "train") == f"{path}: split 'train' is empty (no rows)"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    assert _error(path) == f"{path}: file not found"
    with pytest.raises(DataError, match=r"^data/x\.parquet: file not found$"):
        load_splits("data/x.parquet", splits=("test",))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("x")
    assert _error(path) == f"{path}: unsupported file type (expected .jsonl, .jsonl.gz, .json, .json.gz, .parquet, .csv, .csv.gz)"


def test_extra_column_in_csv_names_file_and_column(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("id,conversation,domain,malign,score\na,hi,hh-rlhf-helpful,0,0.3\n")
    assert _error(path) == f"{path}: row 1: field 'score': unexpected column (allowed: {ALLOWED})"


@pytest.mark.parametrize("domain", ["scheming", "jailbroken", "swahili"])
def test_train_split_refuses_ood_and_opt_in_domains(tmp_path, domain):
    path = _jsonl(tmp_path / "train.jsonl", [OK, _row(domain=domain)])
    assert _error(path, "train") == (
        f"{path}: row 2: field 'domain': domain '{domain}' is not an ID domain; the train split may hold only "
        "ID domains (hh-rlhf-helpful, hh-rlhf-harmless, function-calling)"
    )
    assert len(load_split_file(path, "test")) == 2  # the same rows are a fine test split


def test_split_inferred_from_file_name(tmp_path):
    path = _jsonl(tmp_path / "train_v2.jsonl", [OK, _row(domain="scheming")])
    with pytest.raises(DataError, match="is not an ID domain"):
        load_split_file(path)
    other = _jsonl(tmp_path / "rows.jsonl", [OK, _row(domain="scheming")])
    assert load_split_file(other)["domain"][1] == "scheming"  # default: test


def test_long_conversation_is_fine(tmp_path):
    long = "word " * 60_000
    path = tmp_path / "test.csv"
    path.write_text(f"id,conversation,domain,malign\na,{long},hh-rlhf-helpful,1\n")
    ds = load_split_file(path)
    assert len(ds["conversation"][0]) == len(long)
