from __future__ import annotations

import csv
import json
import math

import pytest

from eval.report.scaling import find_eval_folders, make_chart, params_to_match, recall_points
from test_sweep_fixtures import MONITORS, SIZES, make_sweep


# ------------------------------------------------------------------ interpolation
def test_params_to_match_monotone_log_linear():
    params, recalls = [1e6, 1e7, 1e8], [0.1, 0.3, 0.5]
    # halfway between 0.3 and 0.5 -> halfway between 7 and 8 in log10
    assert params_to_match(params, recalls, 0.4) == pytest.approx(10**7.5)
    # a quarter of the way in the first segment
    assert params_to_match(params, recalls, 0.15) == pytest.approx(10**6.25)
    # exactly on a sweep point
    assert params_to_match(params, recalls, 0.3) == pytest.approx(1e7)


def test_params_to_match_already_reached_and_not_reached():
    assert params_to_match([1e6, 1e7], [0.4, 0.6], 0.35) == 1e6
    assert params_to_match([1e6, 1e7, 1e8], [0.1, 0.3, 0.5], 0.51) is None
    assert params_to_match([], [], 0.1) is None


def test_params_to_match_non_monotone_first_crossing():
    params, recalls = [1, 10, 100, 1000], [0.1, 0.5, 0.2, 0.6]
    # 0.3 is crossed first on 1 -> 10 (again on 100 -> 1000: ignored)
    assert params_to_match(params, recalls, 0.3) == pytest.approx(10**0.5)
    # 0.55 is reached only on 100 -> 1000: t = (0.55 - 0.2) / 0.4 = 0.875
    assert params_to_match(params, recalls, 0.55) == pytest.approx(10 ** (2 + 0.875))
    # order of the input does not matter
    assert params_to_match(params[::-1], recalls[::-1], 0.55) == pytest.approx(10**2.875)


# ------------------------------------------------------------------ chart table
@pytest.fixture(scope="module")
def charted(tmp_path_factory):
    sweep = make_sweep(tmp_path_factory.mktemp("chart") / "sweep")
    return sweep, make_chart(sweep, fpr=0.01)


def test_chart_table_equals_analysis_json(charted):
    sweep, out = charted
    for ext in ("png", "svg", "csv", "md"):
        assert (sweep / "chart" / f"recall_vs_params.{ext}").stat().st_size > 0
    assert out.files["svg"].read_text().lstrip().startswith("<?xml")

    with open(out.files["csv"]) as fh:
        rows = list(csv.DictReader(fh))
    # 3 sizes x 4 monitors x (7 OOD + id + overall)
    assert len(rows) == 3 * 4 * 9
    for row in rows:
        analysis = json.loads((sweep / row["run"] / "eval" / row["monitor"] / "analysis.json").read_text())
        meta = json.loads((sweep / row["run"] / "eval" / row["monitor"] / "meta.json").read_text())
        group = analysis["overall"] if row["group"] == "overall" else analysis["groups"][row["group"]]
        assert float(row["tpr"]) == group["tpr"]["0.01"]
        assert [float(row["tpr_lo"]), float(row["tpr_hi"])] == group["tpr_ci"]["0.01"]
        assert int(row["params"]) == meta["params"] == SIZES[row["run"]]
    md = out.files["md"].read_text()
    assert "| jailbroken | guard+maha | tiny-m | 10,000,000 |" in md


def test_chart_match_guard_alone(charted):
    sweep, out = charted
    m = out.match
    # overall TPR@1% = 0.10 + 0.2*size + 0.1*monitor; the best combined monitor at the
    # smallest size is guard+maha+ppl at 0.40; guard alone: 0.10, 0.30, 0.50 at 1e6, 1e7, 1e8
    assert m.reference_monitor == "guard+maha+ppl"
    assert m.reference_params == 1_000_000
    assert m.target == pytest.approx(0.40)
    assert m.params_needed == pytest.approx(10**7.5, rel=1e-4)
    assert m.ratio == pytest.approx(10**1.5, rel=1e-4)
    assert "x31.6 larger" in m.sentence()
    assert "x31.6 larger" in out.files["md"].read_text()


def test_chart_other_fpr_and_missing(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    pts = recall_points(find_eval_folders(sweep), fpr=0.02)
    g = [p for p in pts if p.run == "tiny-s" and p.monitor == "guard" and p.group == "jailbroken"][0]
    assert g.tpr == pytest.approx(0.05 + 0.03 + 0.04)  # domain index 3, 2 * 0.02
    from mood_data.errors import MoodguardError

    with pytest.raises(MoodguardError, match="TPR at FPR 0.5"):
        make_chart(sweep, fpr=0.5)
    with pytest.raises(MoodguardError, match="no eval"):
        (tmp_path / "empty").mkdir()
        make_chart(tmp_path / "empty")
    assert sorted({p.monitor for p in pts}) == sorted(MONITORS)
    assert not math.isnan(g.auroc)


def test_leftover_temporaries_of_a_killed_run_are_not_read(tmp_path):
    """A killed evaluate leaves a hidden `.<monitor>.*.tmp` folder (atomic_dir); chart,
    report and compare must not count it as a run folder."""
    import shutil

    sweep = make_sweep(tmp_path / "sweep")
    before = [(f.run, f.monitor) for f in find_eval_folders(sweep)]
    src = next((sweep).rglob("eval/guard"))
    shutil.copytree(src, src.parent / ".guard+new.x1y2.tmp")
    (src.parent / ".guard+new.x1y2.tmp" / "meta.json").write_text('{"monitor": "guard+new", "params": 5}')
    assert [(f.run, f.monitor) for f in find_eval_folders(sweep)] == before
