from __future__ import annotations

import json

import numpy as np
import pytest

from eval.report.compare import analysis_deltas, compare_roots, format_deltas, recall_deltas, score_set
from eval.engine.metrics import tpr_at_fpr
from test_sweep_fixtures import make_sweep


def _rows(a_scores, b_scores, c_scores):
    """100 ID-safe rows 0.00..0.99; three OOD domains with the given unsafe scores."""
    rows = [{"id": f"s{i}", "domain": "hh-rlhf-helpful", "malign": 0, "score": i / 100} for i in range(100)]
    for dom, scores in (("jailbroken", a_scores), ("scheming", b_scores), ("controlling", c_scores)):
        rows += [{"id": f"{dom}{i}", "domain": dom, "malign": 1, "score": s} for i, s in enumerate(scores)]
    rows.append({"id": "ood-safe", "domain": "scheming", "malign": 0, "score": 5.0})  # not a negative
    return rows


def test_recall_deltas_hand_made():
    # threshold at 1% FPR = quantile(0..0.99, 0.99) = 0.9801; 0.5 is below, 2.0 above
    old = score_set(_rows([0.5] * 5 + [2.0] * 5, [2.0] * 10, [0.5] * 2 + [2.0] * 8))
    new = score_set(_rows([2.0] * 10, [0.5] * 10, [0.5] * 2 + [2.0] * 8))
    d = {x.group: x for x in recall_deltas(old, new, fpr=0.01, n_boot=300, seed=1)}
    assert d["jailbroken"].old == 0.5 and d["jailbroken"].new == 1.0 and d["jailbroken"].delta == 0.5
    assert d["scheming"].delta == -1.0 and d["scheming"].lo == d["scheming"].hi == -1.0
    assert d["scheming"].regressed and not d["jailbroken"].regressed
    assert d["jailbroken"].lo > 0  # improvement: interval above 0
    assert d["controlling"].delta == 0 and d["controlling"].lo == d["controlling"].hi == 0  # paired: identical
    assert not d["controlling"].regressed
    # overall = mean over the OOD domains present: (0.5 - 1.0 + 0) / 3
    assert d["overall"].delta == pytest.approx(-0.5 / 3)
    assert all(x.method == "paired-bootstrap" for x in d.values())
    assert "regressed: :scheming" in format_deltas(list(d.values()), 0.01)
    # the point estimates equal eval.metrics on the raw scores
    assert d["jailbroken"].old == tpr_at_fpr(np.arange(100) / 100, [0.5] * 5 + [2.0] * 5, 0.01)


def test_recall_deltas_unpaired_when_ids_differ():
    old = score_set(_rows([2.0] * 10, [2.0] * 10, [2.0] * 10))
    rows = _rows([2.0] * 12, [2.0] * 10, [0.5] * 10)
    new = score_set(rows)
    d = {x.group: x for x in recall_deltas(old, new, n_boot=50)}
    assert d["controlling"].method == "bootstrap" and d["controlling"].delta == -1.0 and d["controlling"].regressed


def test_analysis_deltas_conservative_interval():
    old = {"groups": {"jailbroken": {"tpr": {"0.01": 0.5}, "tpr_ci": {"0.01": [0.4, 0.6]}}},
           "overall": {"tpr": {"0.01": 0.5}, "tpr_ci": {"0.01": [0.45, 0.55]}}}
    new = {"groups": {"jailbroken": {"tpr": {"0.01": 0.3}, "tpr_ci": {"0.01": [0.2, 0.35]}}},
           "overall": {"tpr": {"0.01": 0.52}, "tpr_ci": {"0.01": [0.47, 0.57]}}}
    d = {x.group: x for x in analysis_deltas(old, new, 0.01)}
    assert d["jailbroken"].delta == pytest.approx(-0.2)
    assert (d["jailbroken"].lo, d["jailbroken"].hi) == pytest.approx((-0.4, -0.05))
    assert d["jailbroken"].regressed and not d["overall"].regressed


def test_compare_sweeps_from_results(tmp_path):
    old = make_sweep(tmp_path / "old")
    new = make_sweep(tmp_path / "new")
    # tiny-s guard on jailbroken: OLD catches every row (TPR 1), NEW none (TPR 0)
    for root, value in ((old, 5.0), (new, -1.0)):
        res = root / "tiny-s" / "eval" / "guard" / "results.jsonl"
        rows = [json.loads(l) for l in res.read_text().splitlines()]
        for r in rows:
            if r["domain"] == "jailbroken":
                r["score"] = value
        res.write_text("".join(json.dumps(r) + "\n" for r in rows))
    deltas = compare_roots(old, new, n_boot=20)
    assert len({d.monitor for d in deltas}) == 12
    reg = [(d.monitor, d.group) for d in deltas if d.regressed]
    assert ("tiny-s/guard", "jailbroken") in reg
    assert reg == [("tiny-s/guard", "jailbroken"), ("tiny-s/guard", "overall")]
    jb = [d for d in deltas if d.regressed][0]
    assert (jb.old, jb.new, jb.delta) == (1.0, 0.0, -1.0)
    assert all(d.delta == 0 for d in deltas if d.monitor != "tiny-s/guard")
