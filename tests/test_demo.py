"""`moodguard demo --smoke`: the README's main job, end to end on the tiny models (train -> fit
-> evaluate -> chart -> report), then a second call that resumes and skips every stage."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest

from moodguard.cli import main as moodguard
from mood_data.domains import ID_DOMAINS, OOD_DOMAINS

SIZES = ("tiny-s", "tiny-m", "tiny-l")
MONITORS = ("guard", "guard+maha", "guard+ppl", "guard+maha+ppl")


_LOGS: dict = {}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The smoke demo as a person runs it: its own process, output captured as a log file would."""
    out = tmp_path_factory.mktemp("demo") / "sweep"
    proc = subprocess.run([sys.executable, "-m", "moodguard.cli", "demo", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _LOGS.update(stdout=proc.stdout, stderr=proc.stderr)
    return out


def test_demo_output_is_quiet(demo):
    """No FutureWarning caused by our arguments, no expected-but-alarming loader reports, no
    DeepSpeed CPU notice, no carriage-return progress bars in a log; every stage's duration."""
    err, out = _LOGS["stderr"], _LOGS["stdout"]
    assert "FutureWarning" not in err, err[:2000]
    assert "LOAD REPORT" not in err and "Setting accelerator to CPU" not in err
    assert "\r" not in err and "it/s]" not in err, err[:2000]
    assert len(re.findall(r"^\[\d+/12\] tiny-[sml]/[a-z-]+: done in \d+\.\ds$", out, re.M)) == 12


def test_demo_writes_every_run_chart_and_report(demo, capsys):
    state = json.loads((demo / "state.json").read_text())
    stages = state.get("stages", state)
    assert sorted(stages) == sorted(f"{s}/{k}" for s in SIZES for k in ("train-guard", "train-lm", "fit", "evaluate"))
    assert all(v["status"] == "done" for v in stages.values())
    for size in SIZES:
        assert (demo / size / "guard" / "adapter_model.safetensors").is_file()
        assert (demo / size / "lm" / "adapter_model.safetensors").is_file()
        for monitor in MONITORS:
            folder = demo / size / "eval" / monitor
            rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
            ids = [r["id"] for r in rows]
            assert len(ids) == len(set(ids))
            # the smoke caps: 12 unsafe rows per domain, 60 safe rows per ID domain
            per = {}
            for r in rows:
                per.setdefault((r["domain"], r["malign"]), 0)
                per[(r["domain"], r["malign"])] += 1
            assert all(n == (60 if mal == 0 else 12) for (_, mal), n in per.items())
            assert {d for d, _ in per} == set(OOD_DOMAINS) | set(ID_DOMAINS) | {"swahili"}
            analysis = json.loads((folder / "analysis.json").read_text())
            assert analysis["n_id_safe"] == 3 * 60
            # swahili is reported as its own opt-in group, never part of 'overall'
            assert analysis["groups"]["swahili"]["kind"] == "opt_in"
            assert analysis["overall"]["domains"] == list(OOD_DOMAINS)
            meta = json.loads((folder / "meta.json").read_text())
            assert meta["seconds_per_conversation"] > 0

    # per-monitor cost: the LM forward is on top of the guard forward
    cost = {m: json.loads((demo / "tiny-l" / "eval" / m / "meta.json").read_text())["seconds"] for m in MONITORS}
    assert cost["guard+ppl"] > cost["guard"] and cost["guard+maha"] == cost["guard"]
    with open(demo / "chart" / "recall_vs_params.csv") as fh:
        table = list(csv.DictReader(fh))
    # groups: 7 OOD + swahili (opt-in) + pooled ID + overall
    assert len(table) == len(SIZES) * len(MONITORS) * (len(OOD_DOMAINS) + 3)
    # the MOOD direction, on the smoke run (6 guard steps, 12 unsafe rows per OOD domain): at every
    # size the guard fused with Mahalanobis and perplexity separates the OOD rows from the ID-safe
    # ones better than the guard alone (overall AUROC; seeded run: 0.53 -> 0.63, 0.48 -> 0.63,
    # 0.46 -> 0.71), and over the sizes it recalls more of them at 1% FPR (mean gain 0.06).
    # Recall per domain at this size is one or two rows, so it is not asserted per size.
    auroc = {(r["run"], r["monitor"]): float(r["auroc"]) for r in table if r["group"] == "overall"}
    tpr = {(r["run"], r["monitor"]): float(r["tpr"]) for r in table if r["group"] == "overall"}
    for size in SIZES:
        assert auroc[(size, "guard+maha+ppl")] >= auroc[(size, "guard")] + 0.05, (size, auroc)
    gain = [tpr[(size, "guard+maha+ppl")] - tpr[(size, "guard")] for size in SIZES]
    assert sum(gain) / len(gain) > 0, gain
    params = {r["run"]: int(r["params"]) for r in table}
    assert params["tiny-s"] < params["tiny-m"] < params["tiny-l"]
    assert params["tiny-l"] >= 10 * params["tiny-s"]
    html = (demo / "report.html").read_text()
    assert "data:image/png;base64," in html and "<img src=\"http" not in html
    assert (demo / "report.md").is_file()


def test_demo_second_call_skips_every_stage(demo, capsys):
    before = {p: p.stat().st_mtime_ns for p in demo.glob("*/eval/*/results.jsonl")}
    capsys.readouterr()
    assert moodguard(["demo", "--smoke", "--out", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "ran 0, skipped 12" in out
    assert {p: p.stat().st_mtime_ns for p in demo.glob("*/eval/*/results.jsonl")} == before
