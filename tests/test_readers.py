"""The shared readers: one-line errors with the exact file, row and byte."""
from __future__ import annotations

import gzip
import json

import pytest

from mood_data.errors import BundleError, DataError, RecipeError
from mood_data.readers import jsonl_rows, read_json, read_yaml


def test_jsonl_rows_numbers_rows_and_skips_blank_lines(tmp_path):
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as fh:
        fh.write('{"x": 1}\n\n{"x": 2}\n')
    assert list(jsonl_rows(p)) == [(1, {"x": 1}), (3, {"x": 2})]


def test_bad_byte_is_reported_on_its_own_row_past_the_first_buffer(tmp_path):
    p = tmp_path / "big.jsonl"
    good = (json.dumps({"t": "a" * 100}) + "\n").encode() * 500  # ~50 kB: several read buffers
    p.write_bytes(good + b'{"t": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        list(jsonl_rows(p))
    assert str(err.value) == f"{p}: row 501: not valid UTF-8 (byte 0xe9 at offset 10)"  # {"t": "caf = 10 bytes


@pytest.mark.parametrize("text, message", [
    ('{"x": 1}\n{"x": \n', "row 2: not valid JSON (Expecting value)"),
    ('[1, 2]\n', "row 1: expected a JSON object"),
])
def test_jsonl_rows_errors(tmp_path, text, message):
    p = tmp_path / "r.jsonl"
    p.write_text(text)
    with pytest.raises(BundleError) as err:
        list(jsonl_rows(p, BundleError))
    assert str(err.value) == f"{p}: {message}"


def test_read_json_and_yaml_errors(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found$"):
        read_json(tmp_path / "nope.json", DataError)
    (tmp_path / "l.json").write_text("[1]")
    assert read_json(tmp_path / "l.json", expect=list) == [1]
    with pytest.raises(BundleError, match=r"l\.json: expected a JSON object, got list$"):
        read_json(tmp_path / "l.json", BundleError)
    (tmp_path / "b.json").write_text('{"a": 1,\n}')
    with pytest.raises(BundleError, match=r"b\.json: not valid JSON \(.* at line 2\)$"):
        read_json(tmp_path / "b.json", BundleError)
    (tmp_path / "y.yaml").write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(RecipeError, match=r"y\.yaml: invalid YAML at line \d+$"):
        read_yaml(tmp_path / "y.yaml", RecipeError)
    with pytest.raises(RecipeError, match=r"z\.yaml: sweep file not found$"):
        read_yaml(tmp_path / "z.yaml", RecipeError, what="sweep file")
    (tmp_path / "t.yaml").write_text("!!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="invalid YAML"):  # safe_load refuses python tags
        read_yaml(tmp_path / "t.yaml", RecipeError)
