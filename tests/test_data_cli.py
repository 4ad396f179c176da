"""`moodguard data validate|stats|build` and the pure statistics behind `stats`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import make_rows, write_jsonl

import mood_data.embedded as embedded
from moodguard.cli import main
from mood_data.stats import ALL, StatRow, compute_stats, length_summary, token_lengths

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "moodguard.cli", "data", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


# ------------------------------------------------------------------ subprocess (real exit codes)

def test_subprocess_validate_ok(tiny_dataset_dir):
    res = _cli("validate", str(tiny_dataset_dir))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == (f"OK {tiny_dataset_dir}: train 72 rows (3 domains, 36 malign), "
                                  "test 104 rows (10 domains, 80 malign); leakage: 0 test rows")


def test_subprocess_validate_bad_row_exits_2_without_traceback(tmp_path):
    rows = make_rows(1, split="train")
    rows[2]["malign"] = "yes"
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    res = _cli("validate", str(path))
    assert res.returncode == 2
    assert res.stderr.strip() == f"moodguard data: error: {path}: row 3: field 'malign': expected 0/1 or bool, got 'yes'"
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_subprocess_missing_file_exits_2(tmp_path):
    res = _cli("validate", "missing/test.jsonl", cwd=tmp_path)
    assert (res.returncode, res.stderr.strip()) == (2, "moodguard data: error: missing/test.jsonl: file not found")


# ------------------------------------------------------------------ in-process

def test_validate_single_file_split_from_name_or_flag(tiny_dataset_dir, capsys):
    test_file = tiny_dataset_dir / "test.jsonl"
    assert main(["data", "validate", str(test_file)]) == 0
    assert capsys.readouterr().out.strip() == f"OK {test_file}: test 104 rows (10 domains, 80 malign)"
    # the test file read as train breaks the restricted-train rule
    assert main(["data", "validate", str(test_file), "--split", "train"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moodguard data: error: {test_file}: row 49: field 'domain': domain 'controlling' is not an ID domain")


def test_validate_folder_one_split(tiny_dataset_dir, capsys):
    assert main(["data", "validate", str(tiny_dataset_dir), "--split", "train"]) == 0
    assert capsys.readouterr().out.strip() == f"OK {tiny_dataset_dir}: train 72 rows (3 domains, 36 malign)"


def test_validate_leakage_flag(tmp_path, capsys):
    train = make_rows(2, split="train")
    test = make_rows(1, split="test")
    test[0]["conversation"] = train[0]["conversation"]
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    assert main(["data", "validate", str(tmp_path)]) == 2
    assert "1 test rows leak from train (by domain: hh-rlhf-helpful=1)" in capsys.readouterr().err
    assert main(["data", "validate", str(tmp_path), "--allow-leakage"]) == 0
    assert capsys.readouterr().out.strip().endswith("; leakage: 1 test rows (hh-rlhf-helpful=1)")


def test_validate_domains_yaml(tmp_path, capsys):
    (tmp_path / "domains.yaml").write_text("id: [my-support-chats]\n")
    path = write_jsonl(tmp_path / "train.jsonl", [{"id": "1", "conversation": "x", "domain": "my-support-chats", "malign": 1}])
    assert main(["data", "validate", str(path)]) == 2
    assert main(["data", "validate", str(path), "--domains", str(tmp_path / "domains.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith("train 1 rows (1 domains, 1 malign)")
    assert main(["data", "validate", str(path), "--domains", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"moodguard data: error: {tmp_path / 'nope.yaml'}: domains file not found"


def test_build_is_delegated_lazily(monkeypatch, tmp_path):
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--out", required=True)
        parser.add_argument("--limit", type=int, default=0)

    def run(args):
        seen.update(vars(args))
        return 0

    fake = types.ModuleType("mood_data.build.cli")
    fake.add_arguments, fake.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "mood_data.build.cli", fake)
    assert main(["data", "build", "--out", str(tmp_path), "--limit", "3"]) == 0
    assert seen == {"out": str(tmp_path), "limit": 3}


# ------------------------------------------------------------------ stats

class WordTokenizer:
    """Whitespace 'tokenizer': token counts are word counts."""

    def __call__(self, texts, add_special_tokens=False, truncation=False, verbose=False):
        assert add_special_tokens is False and truncation is False
        return {"input_ids": [t.split() for t in texts]}


def test_length_summary_is_numpy_linear_percentiles():
    assert length_summary([1, 2, 3, 4]) == (2.5, 3.7, 4)  # 50%: between 2 and 3; 90%: 3 + 0.7
    assert length_summary([10]) == (10.0, 10.0, 10)


def test_compute_stats_hand_computed():
    data = {"conversation": ["a", "bb b", "ccc", "dddd d d", "e e e e e"],
            "domain": ["hh-rlhf-helpful"] * 4 + ["scheming"],
            "malign": [0, 1, 1, 1, 1]}
    rows = compute_stats({"test": data}, tokenizer=WordTokenizer())
    # chars [1, 4, 3, 8] -> sorted [1, 3, 4, 8]: p90 at index 2.7 = 4 + 0.7 * 4 = 6.8
    expected = [
        StatRow("test", "hh-rlhf-helpful", "id", 4, 0.75, 3.5, 6.8, 8, 1.5, 2.7, 3),
        StatRow("test", "scheming", "ood", 1, 1.0, 9.0, 9.0, 9, 5.0, 5.0, 5),
        StatRow("test", ALL, "all", 5, 0.8, 4.0, 8.6, 9, 2.0, 4.2, 5),
    ]
    assert [(r.split, r.domain, r.kind) for r in rows] == [(e.split, e.domain, e.kind) for e in expected]
    numbers = lambda r: [r.rows, r.malign_rate, r.chars_p50, r.chars_p90, r.chars_max, r.tokens_p50, r.tokens_p90, r.tokens_max]  # noqa: E731
    assert [numbers(r) for r in rows] == [pytest.approx(numbers(e), rel=1e-12) for e in expected]
    no_tokens = compute_stats({"test": data})
    assert [r.tokens_p50 for r in no_tokens] == [None] * 3 and no_tokens[0].chars_p90 == pytest.approx(6.8)


def test_token_lengths_match_the_tokenizer(tiny_tokenizer):
    texts = [r["conversation"] for r in make_rows(1, split="test")]
    expected = [len(tiny_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    assert token_lengths(texts, tiny_tokenizer, batch_size=4).tolist() == expected
    assert token_lengths(texts, tiny_tokenizer).dtype == np.int64


def test_stats_command_prints_an_aligned_table(tiny_dataset_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(embedded, "models_dir", lambda: tmp_path / "no-models")  # chars only by default
    assert main(["data", "stats", str(tiny_dataset_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["split", "domain", "kind", "rows", "malign", "chars_p50", "chars_p90", "chars_max"]
    assert len(lines) == 1 + 4 + 11
    assert lines[4].split()[:5] == ["train", ALL, "all", "72", "0.500"]
    assert lines[-1].split()[:5] == ["test", ALL, "all", "104", "0.769"]
    end = lines[0].index("chars_max") + len("chars_max")
    assert all(len(line) == end for line in lines)  # right-aligned numbers end in the same column


def test_stats_with_tokenizer_and_default_embedded(tiny_dataset_dir, tiny_tokenizer, capsys, monkeypatch, tmp_path):
    tiny_tokenizer.save_pretrained(tmp_path / "models" / "tiny-s")
    monkeypatch.setattr(embedded, "models_dir", lambda: tmp_path / "models")
    monkeypatch.setattr(embedded, "benchmark_dir", lambda: tiny_dataset_dir)
    assert main(["data", "stats", "--split", "train"]) == 0  # default source and tokenizer: embedded
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].split()[-3:] == ["tokens_p50", "tokens_p90", "tokens_max"]
    train = [json.loads(line) for line in (tiny_dataset_dir / "train.jsonl").read_text().splitlines()]
    n_tokens = [len(tiny_tokenizer(r["conversation"], add_special_tokens=False)["input_ids"]) for r in train]
    assert out[-1].split()[-1] == str(max(n_tokens))
    assert main(["data", "stats", str(tiny_dataset_dir), "--tokenizer", "none"]) == 0
    assert "tokens_p50" not in capsys.readouterr().out
