"""The bad-input suite (tests/bad_inputs/cases.yaml): every case through the real CLI.

Each error case must: exit 2, print exactly ONE stderr line ``moodguard <cmd>: error: ...``
naming file / row / field (the case's substrings), show no traceback, and leave no partial
output (the working folder, the fitted run folder and the bundle are unchanged). A few cases
also run in a subprocess (``python -m moodguard.cli``) to prove no traceback reaches the user.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from moodguard.cli import main as moodguard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


HERE = Path(__file__).resolve().parent / "bad_inputs"
REPO = HERE.parents[1]
CASES_DOC = yaml.safe_load((HERE / "cases.yaml").read_text(encoding="utf-8"))
CASES = [dict(case, group=group) for group, cases in CASES_DOC.items() for case in cases]
PROGRESS = re.compile(r"\d+%\|")
SUBPROCESS_CASES = [c for c in CASES if c.get("subprocess")]


def test_suite_size_and_coverage():
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 80
    assert min(len(CASES_DOC[g]) for g in ("data", "recipes", "bundles")) >= 6  # every area well covered
    assert len(SUBPROCESS_CASES) >= 3


# ----------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (hidden temporaries included) with its size and mtime."""
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def tamper(folder: Path, spec: dict) -> None:
    """Apply one bundle tampering; ``wrong_dim`` / ``edit_json`` then rewrite the manifest so
    that only the content check can catch them."""
    from eval.run.bundle import write_manifest

    op, target = spec["op"], folder / spec["file"]
    if op == "add_file":  # a file the manifest does not list (or a replaced manifest)
        target.write_text(expand(spec.get("content", "{}")))
        return
    if op == "manifest_empty":  # a manifest that lists nothing (so would check nothing)
        target.write_text(json.dumps({"format": 1, "files": {}}))
        return
    if op == "delete":
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return
    if op == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        return
    if op == "wrong_dim":  # a valid Mahalanobis fit, but of 5-dim features
        from eval.engine.detectors.mahalanobis import MahalanobisDetector

        x = np.random.default_rng(0).normal(size=(40, 5))
        MahalanobisDetector.fit(x).save(target.parent, target.name)
    elif op == "edit_json":  # dotted keys in ``set`` reach into nested objects
        doc = json.loads(target.read_text())
        for key, value in spec.get("set", {}).items():
            *parents, last = key.split(".")
            node = doc
            for part in parents:
                node = node[part]
            node[last] = value
        doc.pop(spec.get("drop", ""), None)
        target.write_text(json.dumps(doc))
    elif op == "write_bytes":  # replace a file's content (then re-manifest: only the content check can catch it)
        target.write_bytes(expand(spec.get("bytes", "")).encode())
    else:  # pragma: no cover
        raise ValueError(op)
    write_manifest(folder)


def fill(argv: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace("{" + k + "}", v)
        out.append(expand(a))
    return out


# generated content for ``make`` / ``tamper`` text: too big (or too odd) to keep in the repository
GENERATED = {
    "deep": lambda: "[" * 100_000 + "]" * 100_000,  # 100k nesting levels, JSON and YAML alike
    "digits": lambda: "7" * 5001,  # an integer longer than Python's 4300-digit conversion limit
    "long": lambda: "a" * (65 << 20),  # one 65 MiB string: a line longer than the 64 MiB cap
}


def expand(text: str) -> str:
    for key, make in GENERATED.items():
        if "{" + key + "}" in text:
            text = text.replace("{" + key + "}", make())
    return text


def make_inputs(folder: Path, specs: list[dict]) -> None:
    """Write each generated input file (``text``, or ``lines`` joined with newlines; ``{deep}`` /
    ``{digits}`` / ``{long}`` expanded; a ``.gz`` name is gzipped, ``truncate: true`` cuts the compressed stream in half, ``bytes`` is written
    as it is)."""
    import gzip

    for spec in specs:
        path = folder / spec["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(line + "\n" for line in spec["lines"]) if "lines" in spec else spec.get("text", "")
        data = spec["bytes"].encode("latin-1") if "bytes" in spec else expand(text).encode()
        if path.name.endswith(".gz") and "bytes" not in spec:
            data = gzip.compress(data, compresslevel=1)
            if spec.get("truncate"):
                data = data[: len(data) // 2]
        path.write_bytes(data)


@pytest.fixture
def case_env(request, tmp_path, monkeypatch):
    """Working folder + substitutions for one case (bundle cases get a tampered copy)."""
    case = request.param
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    subs = {"here": str(HERE), "out": str(work / "scored.jsonl"), "inputs": str(tmp_path / "inputs")}
    watched = [work]
    if case.get("make"):
        make_inputs(tmp_path / "inputs", case["make"])
        watched.append(tmp_path / "inputs")
    if "{recipe}" in " ".join(case["argv"]) or "{bundle}" in " ".join(case["argv"]):
        folder, eval_dir, recipe_path = request.getfixturevalue("bundle")
        subs["recipe"] = str(recipe_path)
        watched.append(eval_dir.parents[1])  # the fitted run folder
        copy = tmp_path / "bundle"
        shutil.copytree(folder, copy)
        if case.get("tamper"):
            tamper(copy, case["tamper"])
        subs["bundle"] = str(copy)
        watched.append(copy)
    return case, subs, watched


def message_lines(err: str) -> list[str]:
    """stderr minus progress-bar redraws (tqdm's ``NN%|...|`` lines, e.g. "Loading weights")."""
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]


def check_error_line(err: str, case: dict, command: str) -> None:
    lines = message_lines(err)
    assert len(lines) == 1, f"{case['name']}: expected one stderr line, got {lines}"
    assert "Traceback" not in err
    line = lines[0]
    assert line.startswith(f"moodguard {command}: {case.get('prefix', 'error')}: "), line
    for sub in case["expect"]:
        assert sub in line, f"{case['name']}: {sub!r} not in {line!r}"


# ----------------------------------------------------------------------------- in-process
@pytest.mark.parametrize("case_env", CASES, ids=[c["name"] for c in CASES], indirect=True)
def test_case_in_process(case_env, capsys):
    case, subs, watched = case_env
    before = [snapshot(w) for w in watched]
    code = moodguard(fill(case["argv"], subs))
    out, err = capsys.readouterr()
    command = case["argv"][0]
    if case.get("ok"):  # not an error: exit 0, ONE summary line (stderr for score, stdout for data)
        assert code == 0, err
        lines = message_lines(err) or message_lines(out)
        assert len(lines) == 1 and "Traceback" not in err
        for sub in case["expect"]:
            assert sub in lines[0]
        if "rows" in case:  # each written row holds the case's fields
            rows = [json.loads(x) for x in open(subs["out"])]
            assert len(rows) == len(case["rows"])
            for row, want in zip(rows, case["rows"]):
                assert {k: row.get(k) for k in want} == want, row
        return
    assert code == case.get("exit", 2), err
    check_error_line(err, case, command)
    after = [snapshot(w) for w in watched]
    assert after == before, f"{case['name']}: output written or changed"
    assert not Path(subs["out"]).exists()


# ----------------------------------------------------------------------------- subprocess
@pytest.mark.parametrize("case_env", SUBPROCESS_CASES, ids=[c["name"] for c in SUBPROCESS_CASES], indirect=True)
def test_case_in_subprocess_has_no_traceback(case_env, tmp_path):
    case, subs, watched = case_env
    before = [snapshot(w) for w in watched]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "moodguard.cli", *fill(case["argv"], subs)], cwd=watched[0],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == case.get("exit", 2), proc.stderr[-2000:]
    check_error_line(proc.stderr, case, case["argv"][0])
    assert [snapshot(w) for w in watched] == before
