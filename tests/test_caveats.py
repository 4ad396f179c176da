"""Caveats a reader needs (eval.caveats), the held-out calibration split (eval.metrics.analyze
negatives=) and the chance line of the ROC plots."""
from __future__ import annotations

import numpy as np
import pytest

from eval.report.caveats import MIN_FUSION_ROWS, analysis_warnings, headline, min_negatives
from eval.engine.metrics import analyze
from eval.report.plots import chance_points


def _analysis(n_id_safe=35, id_auroc=0.8, n_unsafe=80, fprs=(0.005, 0.01, 0.02)):
    return {"fprs": list(fprs), "n_id_safe": n_id_safe,
            "groups": {"jailbroken": {"kind": "ood", "n_unsafe": n_unsafe}, "id": {"kind": "id", "auroc": id_auroc}}}


def test_min_negatives_is_ten_above_the_threshold():
    assert [min_negatives(f) for f in (0.005, 0.01, 0.02, 0.05)] == [2000, 1000, 500, 200]


def test_small_pool_names_every_unresolved_fpr():
    ws = analysis_warnings(_analysis(n_id_safe=600))
    (w,) = [w for w in ws if w["kind"] == "small_negative_pool"]
    assert w["fprs"] == [0.005, 0.01] and "600 ID-safe negatives" in w["message"]  # 0.02 needs 500: resolved
    assert not [w for w in analysis_warnings(_analysis(n_id_safe=2000)) if w["kind"] == "small_negative_pool"]


def test_fusion_fit_truncation_and_chance_warnings():
    meta = {"fusion_fit": {"method": "lambda", "detectors": ["guard", "maha"], "n_fit": 7, "n_fit_safe": 5,
                           "n_fit_unsafe": 2}, "n_rows": 100, "truncated_rows": 20}
    kinds = {w["kind"]: w for w in analysis_warnings(_analysis(n_id_safe=5000, id_auroc=0.52), meta)}
    assert set(kinds) == {"small_fusion_fit", "truncation", "id_auroc_chance"}
    assert "fitted on 7 ID rows" in kinds["small_fusion_fit"]["message"] and kinds["truncation"]["share"] == 0.2
    # enough rows, a single detector (no fusion), a modest truncation share, a real ID AUROC: silent
    meta = {"fusion_fit": {"detectors": ["guard"], "n_fit": 7}, "n_rows": 100, "truncated_rows": 10}
    assert analysis_warnings(_analysis(n_id_safe=5000, id_auroc=0.56), meta) == []
    meta = {"fusion_fit": {"detectors": ["guard", "ppl"], "n_fit": MIN_FUSION_ROWS}}
    assert analysis_warnings(_analysis(n_id_safe=5000), meta) == []
    # lambda reads the ID TPR on the unsafe fit rows: 7 of them is too few even among 500 rows
    meta = {"fusion_fit": {"method": "lambda", "detectors": ["guard", "ppl"], "n_fit": 500, "n_fit_unsafe": 7}}
    (w,) = analysis_warnings(_analysis(n_id_safe=5000), meta)
    assert w["kind"] == "small_fusion_fit" and ">= 30 unsafe for 'lambda'" in w["message"]
    meta["fusion_fit"]["method"] = "mean"  # mean uses only the safe rows' mean and spread
    assert analysis_warnings(_analysis(n_id_safe=5000), meta) == []


def test_headline_counts_monitors():
    a = analysis_warnings(_analysis(n_id_safe=35, id_auroc=0.5))
    b = analysis_warnings(_analysis(n_id_safe=35, id_auroc=0.9))
    lines = headline([a, b])
    assert lines[0].startswith("35 ID-safe negatives") and "of 2 monitors" not in lines[0]
    assert lines[1] == "ID AUROC near chance (1 of 2 monitors)"


def test_analyze_with_held_out_negatives():
    rng = np.random.default_rng(0)
    test_safe, unsafe, held_out = rng.normal(0, 1, 400), rng.normal(2, 1, 50), rng.normal(0.5, 1, 300)
    scores = np.r_[test_safe, unsafe]
    domains = ["hh-rlhf-helpful"] * 400 + ["jailbroken"] * 50
    malign = np.r_[np.zeros(400), np.ones(50)]
    default = analyze(scores, domains, malign, fprs=(0.01,), n_boot=0)
    assert "calibration" not in default  # mood-bench's convention unchanged
    assert default["thresholds"]["0.01"] == pytest.approx(np.quantile(test_safe, 0.99))
    cal = analyze(scores, domains, malign, fprs=(0.01,), n_boot=0, negatives=held_out)
    thr = np.quantile(held_out, 0.99)
    assert cal["thresholds"]["0.01"] == pytest.approx(thr) and cal["n_id_safe"] == 300
    assert cal["groups"]["jailbroken"]["tpr"]["0.01"] == pytest.approx(np.mean(unsafe > thr))
    assert cal["calibration"] == {"split": "validation", "n_negatives": 300, "n_test_id_safe": 400,
                                  "test_fpr": {"0.01": pytest.approx(np.mean(test_safe > thr))}}


def test_chance_line_is_dense_on_the_symlog_axis():
    x = chance_points()
    assert x[0] == 0.0 and x[-1] == pytest.approx(1.0) and np.all(np.diff(x) > 0)
    # every decade above the linear part holds many points (a 2-point line would bend on symlog)
    for lo in (1e-3, 1e-2, 1e-1):
        assert ((x >= lo) & (x <= lo * 10)).sum() >= 50
