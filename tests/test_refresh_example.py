"""The worked example of docs/refresh.md, run as written (the ``refresh-example`` block): a monitor
trained on the embedded ID domains (tiny-s), refreshed with a new domain made from half of the
``function-calling-missing`` rows (the other half held out), then a refresh with mislabelled
rows. What the issue's done-when asks, asserted on what is measured:

* drift: the new domain's Mahalanobis median against the calibration's 99th percentile (on tiny-s
  the incident is NOT flagged: its rows look like ID function-calling rows to the deployed
  monitor; the doc says so and gives the figures);
* recall on the held-out half rises by at least 0.3 at 1 % FPR and the gate promotes (exit 0);
* the mislabelled refresh is held back (exit 3), the deployed bundle is never written;
* ``moodguard lineage`` prints the two-bundle chain.
"""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from moodguard.cli import main as moodguard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "refresh.md"


def example_commands() -> list[tuple[list[str], int]]:
    """The block's commands and the exit status each comment names (``# exit 3``; default 0)."""
    m = re.search(r"<!-- refresh-example -->\s*```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert m, "docs/refresh.md: the refresh-example block is missing"
    out = []
    for line in m.group(1).splitlines():
        cmd, _, comment = line.partition("#")
        if not cmd.strip():
            continue
        code = re.search(r"exit (\d+)", comment)
        out.append((shlex.split(cmd), int(code.group(1)) if code else 0))
    return out


def run(argv: list[str]) -> int:
    if argv[0] == "moodguard":
        return moodguard(argv[1:])
    assert argv[:2] == ["python", "benchmarks/refresh_example.py"], argv
    sys.path.insert(0, str(REPO))
    from benchmarks.refresh_example import main

    return main(argv[2:])


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_worked_example_runs_as_documented(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = example_commands()
    assert [c[0][:2] for c in commands][:2] == [["python", "benchmarks/refresh_example.py"], ["moodguard", "train"]]
    deployed = None
    for argv, expected in commands:
        if argv[:2] == ["moodguard", "refresh"] and deployed is None:
            deployed = digest(tmp_path / "ex" / "v1")
        assert run(argv) == expected, argv
    ex = tmp_path / "ex"
    assert digest(ex / "v1") == deployed  # both refreshes read the deployed bundle, neither wrote it

    # drift, before any training: the figure the doc quotes
    drift = json.loads((ex / "r1" / "drift.json").read_text())
    maha = drift["domains"]["tool-missing"]["detectors"]["maha"]
    assert drift["domains"]["tool-missing"]["rows"] == 198 and drift["domains"]["tool-missing"]["new_domain"]
    assert maha["drift"] == (maha["new"]["p50"] > maha["calibration"]["p99"])
    assert not maha["drift"]  # measured on tiny-s: the incident lies inside the ID function-calling traffic

    # the refresh: recall on the held-out half at 1 % FPR rises by >= 0.3, the gate promotes
    g1 = json.loads((ex / "r1" / "gate.json").read_text())
    new = next(c for c in g1["checks"] if c["group"] == "tool-missing")
    assert g1["decision"] == "promoted" and g1["fpr"] == 0.01
    assert g1["groups"]["tool-missing"] == 99  # the held-out half
    assert new["new"] - new["old"] >= 0.3 and new["ci"][0] > 0
    idc = next(c for c in g1["checks"] if c["group"] == "id")
    assert idc["delta"] >= -0.05 and all(c["passed"] for c in g1["checks"])
    assert (ex / "r1" / "bundle" / "manifest.json").is_file()

    # the mislabelled refresh is held back: no bundle, the reason in one line
    g2 = json.loads((ex / "r2" / "gate.json").read_text())
    assert g2["decision"] == "held back" and "\n" not in g2["reason"] and not (ex / "r2" / "bundle").exists()
    assert any(not c["passed"] for c in g2["checks"])

    # the lineage of the promoted bundle: the deployed bundle, then this one
    out = capsys.readouterr().out
    sha = hashlib.sha256((ex / "v1" / "manifest.json").read_bytes()).hexdigest()
    assert f"1. {sha[:16]}  export  guard+maha" in out and "<- this bundle" in out
    assert "(verified: same sha256)" in out

    # the doc's figures are the ones measured here (3 decimals; the example is seeded and runs on one thread)
    doc = DOC.read_text(encoding="utf-8")
    for value in (new["old"], new["new"], idc["old"], idc["new"]):
        assert f"{value:.3f}" in doc, value
    assert f"{maha['new']['p50']:.1f}" in doc and f"{maha['calibration']['p99']:.1f}" in doc
