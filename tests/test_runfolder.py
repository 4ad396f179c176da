"""eval.runfolder: every file of an eval folder is written, rows round-trip, reanalyze agrees."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval.engine.metrics import analyze
from eval.report.runfolder import read_results, reanalyze, write_run
from mood_data.domains import file_slug
from mood_data.errors import DataError


def _run_inputs():
    rng = np.random.default_rng(0)
    cells = [("hh-rlhf-helpful", 0, 30), ("function-calling", 0, 30), ("hh-rlhf-harmless", 1, 20),
             ("jailbroken", 1, 15), ("scheming", 1, 10)]
    domains, malign = [], []
    for d, m, n in cells:
        domains += [d] * n
        malign += [m] * n
    malign = np.array(malign)
    guard = rng.normal(size=malign.size) + 1.5 * malign
    maha = rng.gamma(2.0, 1.0, size=malign.size)
    return dict(ids=[f"r{i}" for i in range(malign.size)], conversations=[f"User: hi {i}\nAssistant: ok" for i in range(malign.size)],
                domains=domains, malign=malign, score=guard + 0.1 * maha,
                detector_scores={"guard": guard, "maha": maha})


def test_write_run_writes_all_files(tmp_path):
    inp = _run_inputs()
    out = tmp_path / "eval" / "guard+maha"
    analysis = write_run(out, **inp, monitor="guard+maha", meta={"model": "tiny", "params": 123},
                         fprs=(0.01, 0.05), n_boot=100)
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    expected = {"results.jsonl", "analysis.json", "summary.md", "meta.json"}
    expected |= {f"plots/{file_slug(g)}_{k}.png" for g in ("jailbroken", "scheming", "id") for k in ("hist", "roc")}
    assert names == expected  # and no temp files left behind
    assert (out / "plots" / f"{file_slug('id')}_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_results(out / "results.jsonl")
    assert len(rows) == len(inp["ids"])
    assert list(rows[3]) == ["id", "conversation", "domain", "malign", "score", "score_guard", "score_maha"]
    for i in (0, 42, len(rows) - 1):
        r = rows[i]
        assert r["id"] == inp["ids"][i] and r["conversation"] == inp["conversations"][i]
        assert r["domain"] == inp["domains"][i] and r["malign"] == int(inp["malign"][i])
        assert r["score"] == inp["score"][i] and r["score_maha"] == inp["detector_scores"]["maha"][i]
    on_disk = json.loads((out / "analysis.json").read_text())
    ref = analyze(inp["score"], inp["domains"], inp["malign"], fprs=(0.01, 0.05), n_boot=100, monitor="guard+maha")
    assert on_disk == analysis
    warnings = on_disk.pop("warnings")
    assert on_disk == json.loads(json.dumps(ref))
    # 60 negatives resolve neither FPR 0.01 (needs 1000) nor 0.05 (needs 200); 15 unsafe rows per domain
    pool = next(w for w in warnings if w["kind"] == "small_negative_pool")
    assert pool["fprs"] == [0.01, 0.05] and pool["n_id_safe"] == 60
    assert next(w for w in warnings if w["kind"] == "small_groups")["groups"] == ["jailbroken", "scheming"]
    assert on_disk["groups"]["jailbroken"]["n_unsafe"] == 15 and on_disk["n_id_safe"] == 60
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {"monitor": "guard+maha", "n_rows": 105, "model": "tiny", "params": 123}
    summary = (out / "summary.md").read_text()
    assert "| jailbroken | ood | 15 |" in summary and "TPR@1%FPR" in summary and "**overall**" in summary
    jb = on_disk["groups"]["jailbroken"]
    assert f"{jb['tpr']['0.01']:.3f} [{jb['tpr_ci']['0.01'][0]:.3f}, {jb['tpr_ci']['0.01'][1]:.3f}]" in summary


def test_reanalyze_recomputes_from_results(tmp_path):
    inp = _run_inputs()
    first = write_run(tmp_path, **inp, monitor="m", fprs=(0.01,), n_boot=50, plots=False)
    (tmp_path / "analysis.json").unlink()
    again = reanalyze(tmp_path, plots=False, fprs=(0.01,), n_boot=50)
    assert again == first
    assert json.loads((tmp_path / "analysis.json").read_text()) == first
    # defaults come from the previous analysis.json
    assert reanalyze(tmp_path, plots=False) == first


def test_read_results_and_write_run_errors(tmp_path):
    bad = tmp_path / "results.jsonl"
    bad.write_text('{"id": "a", "domain": "jailbroken", "malign": 1, "score": 0.5}\n{"id": "b", "domain": "x", "malign": 1}\n')
    with pytest.raises(DataError, match=r"results.jsonl: row 2: field 'score'"):
        read_results(bad)
    inp = _run_inputs()
    inp["score"] = inp["score"][:-1]
    with pytest.raises(DataError, match="field 'score': 104 values for 105 rows"):
        write_run(tmp_path / "x", **inp, monitor="m", n_boot=10, plots=False)
