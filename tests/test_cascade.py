"""Cascade monitors (docs/cascade.md): routing, the band fit (ID rows only, within the budget),
the cascade run folder, the cascade bundle scored for real (stage 2 only on escalated rows), the
cross-backbone path and the cost-recall chart."""
from __future__ import annotations

import itertools
import re
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mood_data.domains import ID_DOMAINS, OOD_DOMAINS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- numbers only
def synthetic(seed: int, n: int = 120, ood: int = 0):
    """Two stages' scores of ``n`` ID rows (stage 2 separates better) and ``ood`` OOD rows."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n + ood) < 0.35).astype(int)
    y[n:] = 1
    s1 = np.round(rng.normal(size=n + ood) + 1.0 * y, 1)  # ties, like a coarse guard
    s2 = rng.normal(size=n + ood) + 2.0 * y
    domains = [ID_DOMAINS[i % len(ID_DOMAINS)] for i in range(n)]
    domains += [OOD_DOMAINS[i % len(OOD_DOMAINS)] for i in range(ood)]
    return s1, s2, y, domains


def exact_auroc(safe, unsafe) -> float:
    greater = (unsafe[:, None] > safe[None, :]).sum() + 0.5 * (unsafe[:, None] == safe[None, :]).sum()
    return float(greater) / (safe.size * unsafe.size)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_is_the_best_band_within_the_budget(seed):
    """The exact sweep returns what a brute force over every band of every pair of cuts returns:
    the highest ID recall at the FPR, then ID AUROC, then the lower cost; within the budget."""
    from eval.engine.cascade import Budget, CascadeRule, fit_rule, route
    from eval.engine.metrics import tpr_at_fpr

    s1, s2, y, dom = synthetic(seed)
    costs, fpr, budget = [1.0, 2.0], 0.05, 0.3
    fit = fit_rule([s1, s2], y, dom, costs, Budget(max_escalation_rate=budget), fpr=fpr)
    v = np.unique(s1)
    cuts = np.r_[-np.inf, (v[1:] + v[:-1]) / 2, np.inf]
    bands = [None] + [(None if np.isneginf(cuts[a]) else cuts[a], None if np.isposinf(cuts[b]) else cuts[b])
                      for a, b in itertools.combinations(range(cuts.size), 2)]
    best = None
    for i, band in enumerate(bands):
        r = route(CascadeRule((band,), fit.rule.norms), [s1, s2])
        esc = r.reached[1].mean()
        if esc > budget + 1e-12 or (band is not None and esc == 0):
            continue
        safe, unsafe = r.score[y == 0], r.score[y == 1]
        key = (-tpr_at_fpr(safe, unsafe, fpr), -exact_auroc(safe, unsafe), costs[0] + costs[1] * esc, i)
        best = min(best, key) if best else key
    assert fit.rule.bands[0] == bands[best[3]]
    assert fit.report["id_recall"] == pytest.approx(-best[0])
    assert fit.report["escalation_rate"] <= budget
    assert fit.report["cost_per_conversation"] == pytest.approx(best[2])
    assert fit.report["within_budget"] is True


def test_cost_budget_is_respected_and_stage_one_alone_when_nothing_fits():
    from eval.engine.cascade import Budget, fit_rule

    s1, s2, y, dom = synthetic(3)
    fit = fit_rule([s1, s2], y, dom, [1.0, 2.0], Budget(max_cost_per_conversation=1.5), fpr=0.05)
    assert fit.report["cost_per_conversation"] <= 1.5 and fit.report["escalation_rate"] <= 0.25
    assert fit.report["escalation_rate"] > 0  # the budget buys some escalation, and it is used
    low = fit_rule([s1, s2], y, dom, [1.0, 2.0], Budget(max_cost_per_conversation=0.5), fpr=0.05)
    assert low.rule.bands == (None,) and low.report["within_budget"] is False  # stage 1 alone costs more


def test_fitted_bands_use_id_rows_only():
    """Changing every OOD row (scores and labels) leaves the bands equal; changing one ID row
    does not (so the comparison can fail)."""
    from eval.engine.cascade import Budget, fit_rule

    s1, s2, y, dom = synthetic(4, ood=60)
    args = dict(fpr=0.05)
    fit = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3), **args)
    ood = np.array([d in OOD_DOMAINS for d in dom])
    t1, t2, ty = s1.copy(), s2.copy(), y.copy()
    t1[ood], t2[ood], ty[ood] = 50.0, -50.0, 0
    again = fit_rule([t1, t2], ty, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3), **args)
    assert again.rule == fit.rule and again.report["n_dropped_not_id"] == 60
    assert again.report["n_rows"] == fit.report["n_rows"] == 120
    moved = np.where(~ood, s1 + 3.0 * y, s1)  # ID rows do count: a better stage 1 moves the band
    other = fit_rule([moved, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3), **args)
    assert other.rule.bands != fit.rule.bands


def test_threshold_on_the_cascade_score_is_the_cascade_decision():
    """At the (1 - FPR) quantile of the ID-safe cascade scores: stage 1 flags its 'high' rows,
    clears its 'low' rows, the escalated rows are flagged by stage 2's score; the ID-safe rows
    flagged are the FPR's share."""
    from eval.engine.cascade import Budget, fit_rule, route
    from eval.engine.metrics import threshold_at_fpr

    s1, s2, y, dom = synthetic(5, n=400)
    fit = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.4), fpr=0.05)
    r = route(fit.rule, [s1, s2])
    lo, hi = fit.rule.bands[0]
    lo = -np.inf if lo is None else lo
    hi = np.inf if hi is None else hi
    assert np.array_equal(r.reached[1], (s1 >= lo) & (s1 <= hi))
    assert np.array_equal(r.stage, np.where(r.reached[1], 2, 1))
    thr = threshold_at_fpr(r.score[y == 0], 0.05)
    flagged = r.score > thr
    assert 1 <= thr < 2  # in the escalated rows' tier: stage 2 decides there
    mu, sd = fit.rule.norms[1]
    t2 = mu + sd * np.tan((thr - 1 - 0.5) * np.pi)  # the stage-2 score of the threshold
    expect = (s1 > hi) | (r.reached[1] & (s2 > t2))
    assert np.array_equal(flagged, expect)
    n_safe = int((y == 0).sum())
    assert flagged[y == 0].sum() == n_safe - 1 - int(np.floor(0.95 * (n_safe - 1)))


def test_recall_grows_with_the_budget_and_the_ends_are_the_single_monitors():
    """The measured trade-off is monotone: the fitted ID recall never falls as the budget grows;
    budget 0 ranks every row as stage 1 does, a full budget reaches at least stage 2's recall."""
    from eval.engine.cascade import Budget, fit_rule, route
    from eval.engine.metrics import tpr_at_fpr

    s1, s2, y, dom = synthetic(6, n=300)
    recalls = []
    for b in (0.0, 0.1, 0.2, 0.3, 0.5, 1.0):
        fit = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=b), fpr=0.05)
        recalls.append(fit.report["id_recall"])
        assert fit.report["escalation_rate"] <= b + 1e-12
        if b == 0.0:
            r = route(fit.rule, [s1, s2])
            assert np.array_equal(np.argsort(r.score, kind="stable"), np.argsort(s1, kind="stable"))
    assert recalls == sorted(recalls)
    assert recalls[-1] >= tpr_at_fpr(s2[y == 0], s2[y == 1], 0.05) - 1e-12
    assert recalls[0] == pytest.approx(tpr_at_fpr(s1[y == 0], s1[y == 1], 0.05))


def test_three_stages_and_the_grid_search():
    from eval.engine.cascade import Budget, fit_rule, route

    s1, s2, y, dom = synthetic(7, n=200)
    s3 = s2 + np.random.default_rng(1).normal(size=s2.size) * 0.3 + y
    fit = fit_rule([s1, s2, s3], y, dom, [1.0, 1.0, 3.0], Budget(max_escalation_rate=0.5), fpr=0.05)
    r = route(fit.rule, [s1, s2, s3])
    assert len(fit.rule.bands) == 2 and fit.report["escalation_rate"] <= 0.5
    assert fit.report["cost_per_conversation"] == pytest.approx(1 + r.reached[1].mean() + 3 * r.reached[2].mean())
    # tiers: low at stage 1 < low at stage 2 < stage 3 < high at stage 2 < high at stage 1
    for stage, tier_lo, tier_hi in ((1, 0, 1), (3, 2, 3)):
        sel = r.stage == stage
        assert np.all((r.score[sel] >= tier_lo) | (r.score[sel] >= 4)) and np.all(r.score[sel] < 5)
    grid = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3), fpr=0.05, search="grid",
                    grid_size=8)
    exact = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3), fpr=0.05)
    assert grid.report["candidates_last_stage_swept"] < exact.report["candidates_last_stage_swept"]
    assert grid.report["id_recall"] <= exact.report["id_recall"] + 1e-12


def test_rule_round_trip_and_bad_values(tmp_path):
    from eval.engine.cascade import CascadeRule
    from mood_data.errors import BundleError

    rule = CascadeRule(((None, 1.5), None), ((0.0, 1.0), (1.0, 2.0), (0.5, 0.5)))
    path = tmp_path / "cascade.json"
    assert CascadeRule.from_dict(path, json.loads(json.dumps(rule.to_dict())), 3) == rule
    bad = rule.to_dict()
    bad["norms"][1]["sigma"] = -1
    with pytest.raises(BundleError, match=r"cascade.json: field 'rule.norms\[1\].sigma': must be > 0"):
        CascadeRule.from_dict(path, bad, 3)
    bad = rule.to_dict()
    bad["bands"][0] = {"lo": 2.0, "hi": 1.0}
    with pytest.raises(BundleError, match=r"field 'rule.bands\[0\]': lo 2.0 > hi 1.0"):
        CascadeRule.from_dict(path, bad, 3)
    with pytest.raises(BundleError, match=r"field 'rule.norms': expected 2 entries \(one per stage\)"):
        CascadeRule.from_dict(path, rule.to_dict(), 2)


# ----------------------------------------------------------------------------- the recipe section
def test_cascade_section_parses_and_stays_out_of_recipes_without_one(tmp_path):
    """A recipe without stages resolves to the same document as before the section existed (sweep
    stage keys and run recipe.yaml files unchanged); a cascade resolves its stages once, this
    run's monitors joining the evaluated ones; bad stages are one line naming the file and key."""
    from eval.run.context import resolve
    from mood_data.errors import RecipeError
    from train.recipe import load_recipe

    assert "cascade" not in load_recipe("recipes/tiny/s.yaml").to_dict()
    other = tmp_path / "m.yaml"
    other.write_text("base: " + str(Path("recipes/tiny/m.yaml").resolve()) + "\noutput_dir: " + str(tmp_path / "m-run")
                     + "\n")
    rec = tmp_path / "s.yaml"
    rec.write_text("base: " + str(Path("recipes/tiny/s.yaml").resolve()) + "\neval: {monitors: [guard]}\n"
                   "cascade:\n  max_escalation_rate: 0.3\n  stages: [{monitor: guard}, {recipe: m.yaml, "
                   "monitor: maha+guard}]\n")
    ctx = resolve(load_recipe(rec))
    assert list(ctx.monitors) == ["guard"]  # stage 2 is the other run's
    s1, s2 = ctx.cascade.stages
    assert (s1.monitor, s1.own, s1.label, list(s1.context.monitors)) == ("guard", True, "guard", ["guard"])
    assert s2.monitor == "maha+guard" and s2.label == "m:maha+guard" and s2.run_root == tmp_path / "m-run"
    assert not s2.own
    assert list(s2.context.monitors) == ["maha+guard"] and s2.context.cascade is None
    same = resolve(load_recipe(rec, ["cascade.stages=[{monitor: guard}, {monitor: guard+maha+ppl}]"]))
    assert list(same.monitors) == ["guard", "guard+maha+ppl"]
    for override, expect in (
            ("cascade.stages=[{monitor: guard}, {monitor: guard+astro}]",
             "s.yaml (override): key 'cascade.stages[1].monitor': unknown monitor 'guard+astro'"),
            ("cascade.stages=[{monitor: guard}, {recipe: nope.yaml, monitor: guard}]",
             "key 'cascade.stages[1].recipe': recipe file"),
            ("cascade.name=guard+maha", "key 'cascade.name': 'guard+maha' is a monitor's name"),
            ("cascade.max_escalation_rate=1.5", "key 'cascade.max_escalation_rate': must be in [0, 1]"),
            ("cascade.stages=[{monitor: guard}]", "key 'cascade.stages': a cascade needs at least two stages")):
        with pytest.raises(RecipeError, match=re.escape(expect)):
            resolve(load_recipe(rec, [override]))


# ----------------------------------------------------------------------------- evaluated runs
_RUNS: dict = {}
SAME = ["cascade.max_escalation_rate=0.4", "cascade.stages=[{monitor: guard}, {monitor: guard+maha+ppl}]"]


def write_run_recipe(path: Path, model_dir: Path, data_dir: Path, run_dir: Path, monitors: str,
                     extra: str = "") -> Path:
    path.write_text(f"model: {model_dir}\ndtype: float32\noutput_dir: {run_dir}\n"
                    f"data: {{source: {data_dir}, validation_fraction: 0.25}}\n"
                    f"eval:\n  batch_size: 8\n  max_length: 48\n  fusion: mean\n  monitors: {monitors}\n{extra}",
                    encoding="utf-8")
    return path


@pytest.fixture
def runs(tiny_model_dir, tiny_dataset_dir, tiny_tokenizer, tmp_path_factory):
    """Two evaluated runs on two random tiny backbones (xs, xxs), once per session: ``{"a": recipe
    path of xs with a guard -> guard+maha+ppl cascade, "b": recipe path of xxs, "folders": ...}``."""
    if not _RUNS:
        from eval.run.evaluate import evaluate_recipe
        from test_forward import make_adapters
        from train.recipe import load_recipe
        from train.tiny import build_random_model

        root = tmp_path_factory.mktemp("cascade_runs")
        make_adapters(tiny_model_dir, root / "run-a", seed=2)
        xxs = build_random_model(root / "xxs", "xxs", tiny_tokenizer, seed=5)
        make_adapters(xxs, root / "run-b", seed=3)
        b = write_run_recipe(root / "b.yaml", xxs, tiny_dataset_dir, root / "run-b", "[guard+maha+ppl]")
        a = write_run_recipe(root / "a.yaml", tiny_model_dir, tiny_dataset_dir, root / "run-a", "[guard]",
                             "cascade:\n  max_escalation_rate: 0.4\n  stages: [{monitor: guard}, "
                             "{monitor: guard+maha+ppl}]\n")
        folders = evaluate_recipe(load_recipe(b), n_boot=20, plots=False)
        folders.update({f"a:{k}": v for k, v in evaluate_recipe(load_recipe(a), n_boot=20, plots=False).items()})
        _RUNS.update(a=a, b=b, root=root, folders=folders)
    return _RUNS


def results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in open(folder / "results.jsonl", encoding="utf-8")]


def test_evaluate_writes_the_cascade_run_folder(runs, tiny_dataset_dir):
    from eval.engine.cascade import CascadeRule, route
    from eval.engine.metrics import threshold_at_fpr
    from eval.report.runfolder import reanalyze

    folder = runs["folders"]["a:cascade"]
    guard, full = results(runs["folders"]["a:guard"]), results(runs["folders"]["a:guard+maha+ppl"])
    rows = results(folder)
    n_test = sum(1 for _ in open(tiny_dataset_dir / "test.jsonl"))
    assert len(rows) == n_test and [r["id"] for r in rows] == [r["id"] for r in guard]
    doc = json.loads((folder / "cascade.json").read_text())
    rule = CascadeRule.from_dict(folder / "cascade.json", doc["rule"], 2)
    routed = route(rule, [np.array([r["score"] for r in guard]), np.array([r["score"] for r in full])])
    assert [r["score"] for r in rows] == pytest.approx(routed.score.tolist(), abs=0, rel=0)
    assert [r["stage"] for r in rows] == routed.stage.tolist()
    escalated = [r["stage"] == 2 for r in rows]
    assert 0 < sum(escalated) < n_test
    for r, g, f, esc in zip(rows, guard, full, escalated):
        assert r["score_stage1"] == g["score"]
        assert r["score_stage2"] == (f["score"] if esc else None)  # stage 2 ran only on escalated rows
    # the thresholds: the (1 - FPR) quantile of the ID-safe rows' cascade scores, like every monitor
    analysis = json.loads((folder / "analysis.json").read_text())
    safe = [r["score"] for r in rows if r["domain"] in ID_DOMAINS and r["malign"] == 0]
    assert analysis["thresholds"]["0.01"] == pytest.approx(threshold_at_fpr(safe, 0.01))
    assert analysis["monitor"] == "cascade"
    assert doc["test"]["overall"] == analysis["overall"]["tpr"]
    assert doc["test"]["recall"]["id"] == analysis["groups"]["id"]["tpr"]
    before = analysis["overall"]
    assert reanalyze(folder, plots=False)["overall"] == before  # mood-bench compatible: from results.jsonl alone
    # the measured costs: stage 1 pays the guard pass, stage 2 only the LM pass (same backbone)
    meta_full = json.loads((runs["folders"]["a:guard+maha+ppl"] / "meta.json").read_text())
    per = {k: v / meta_full["n_rows"] for k, v in meta_full["detector_seconds"].items()}
    assert [s["marginal_seconds_per_conversation"] for s in doc["stages"]] == pytest.approx([per["guard"], per["ppl"]])
    esc = doc["test"]["escalation_rate"][0]
    assert esc == pytest.approx(np.mean(escalated))
    assert doc["test"]["cost_per_conversation"] == pytest.approx(per["guard"] + esc * per["ppl"])
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["seconds_per_conversation"] == pytest.approx(doc["test"]["cost_per_conversation"])
    assert doc["fit"]["escalation_rate"] <= 0.4 and doc["stages"][1]["seconds_per_conversation"] == pytest.approx(
        meta_full["seconds_per_conversation"])
    # the fit read the stages' ID validation scores, which every eval folder now records
    val = json.loads((runs["folders"]["a:guard"] / "validation.json").read_text())
    assert doc["fit"]["n_rows"] == len(val["ids"]) and set(val["domains"]) <= set(ID_DOMAINS)
    assert set(doc["test"]["escalation_rate_by_group"]) >= {"id_safe", "id", *OOD_DOMAINS}


def test_changing_every_ood_row_leaves_the_bands_equal(runs, tmp_path):
    """Stage folders copied, every OOD test row's scores replaced: the fitted rule is the same
    (the OOD rows are never seen by the fit), while the cascade's OOD recall moves."""
    from eval.run.cascade import evaluate_cascade
    from eval.run.context import resolve
    from train.recipe import load_recipe

    copy = tmp_path / "run"
    shutil.copytree(runs["root"] / "run-a" / "eval", copy / "eval")
    rng = np.random.default_rng(0)
    for name in ("guard", "guard+maha+ppl"):
        path = copy / "eval" / name / "results.jsonl"
        rows = results(path.parent)
        for r in rows:
            if r["domain"] in OOD_DOMAINS:
                r["score"] = float(rng.normal() * 5)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = resolve(load_recipe(runs["a"], [f"output_dir={copy}"]))
    folder = evaluate_cascade(ctx, n_boot=0, plots=False)
    old = json.loads((runs["folders"]["a:cascade"] / "cascade.json").read_text())
    new = json.loads((folder / "cascade.json").read_text())
    assert new["rule"] == old["rule"] and new["fit"] == old["fit"]
    assert new["test"]["recall"] != old["test"]["recall"]  # the edit reached the evaluation


def cross(runs, run: str = "") -> list[str]:
    """Overrides: stage 2 = run b's guard+maha+ppl (a path on the command line: from the cwd)."""
    return ["cascade.name=cross", "cascade.max_escalation_rate=0.4",
            f"cascade.stages=[{{monitor: guard}}, {{recipe: {runs['b']}{run}, monitor: guard+maha+ppl}}]"]


def cross_context(runs, extra=()):
    from eval.run.context import resolve
    from train.recipe import load_recipe

    return resolve(load_recipe(runs["a"], [*cross(runs), *extra]))


def test_cross_backbone_cascade_pays_every_pass_of_the_other_run(runs):
    """tiny guard -> another backbone's guard+maha+ppl: stage 2 costs its whole monitor (guard
    pass + LM pass of ITS run), the rows are joined on their ids."""
    from eval.run.cascade import evaluate_cascade

    folder = evaluate_cascade(cross_context(runs), n_boot=0, plots=False)
    doc = json.loads((folder / "cascade.json").read_text())
    meta_b = json.loads((runs["folders"]["guard+maha+ppl"] / "meta.json").read_text())
    meta_a = json.loads((runs["folders"]["a:guard"] / "meta.json").read_text())
    assert [s["label"] for s in doc["stages"]] == ["guard", "b:guard+maha+ppl"]
    assert doc["stages"][1]["run"] == str(runs["root"] / "run-b")
    assert doc["stages"][1]["marginal_seconds_per_conversation"] == pytest.approx(meta_b["seconds_per_conversation"])
    assert doc["stages"][0]["marginal_seconds_per_conversation"] == pytest.approx(
        meta_a["detector_seconds"]["guard"] / meta_a["n_rows"])
    b = {r["id"]: r["score"] for r in results(runs["folders"]["guard+maha+ppl"])}
    rows = results(folder)
    assert all(r["score_stage2"] == (b[r["id"]] if r["stage"] == 2 else None) for r in rows)
    assert doc["stages"][0]["params"] != doc["stages"][1]["params"]  # two backbones


def test_a_stage_that_was_not_evaluated_is_one_line(runs, tmp_path, capsys):
    from moodguard.cli import main

    empty = tmp_path / "empty-run"
    (empty / "guard").mkdir(parents=True)
    rc = main(["evaluate", "--recipe", str(runs["a"]), "--no-plots", "--n-boot", "0", *cross(runs, f", run: {empty}")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"moodguard evaluate: error: {empty}/eval/guard+maha+ppl: stage 2 (b:guard+maha+ppl) has "
                             "not been evaluated: run `moodguard evaluate")


# ----------------------------------------------------------------------------- the cascade bundle
def count_rows(backbone) -> dict[str, int]:
    """Wrap a loaded backbone's two forwards: rows through the guard forward and the LM forward."""
    counts = {"guard": 0, "lm": 0}
    guard, lm = backbone.guard_forward, backbone.lm_hidden

    def guard_forward(input_ids, *a, **k):
        counts["guard"] += int(input_ids.shape[0])
        return guard(input_ids, *a, **k)

    def lm_hidden(input_ids, *a, **k):
        counts["lm"] += int(input_ids.shape[0])
        return lm(input_ids, *a, **k)

    backbone.guard_forward, backbone.lm_hidden = guard_forward, lm_hidden
    return counts


@pytest.fixture
def cascade_bundle(runs):
    from eval.run.cascade_bundle import export_cascade
    from eval.run.context import resolve
    from train.recipe import load_recipe

    if "bundle" not in runs:
        runs["bundle"] = export_cascade(resolve(load_recipe(runs["a"])), runs["root"] / "bundle")
    return runs["bundle"]


def test_score_runs_stage_two_only_on_escalated_rows(runs, cascade_bundle):
    """guard -> guard+maha+ppl on one backbone: the base is loaded once, the guard forward runs on
    every row (its pooled features give maha too), the LM forward on the escalated rows only;
    the scores and stages equal the offline evaluation of the same cascade on the same rows."""
    from eval.run.cascade_bundle import Cascade, load_bundle

    rows = results(runs["folders"]["a:cascade"])
    cas = load_bundle(cascade_bundle)
    assert isinstance(cas, Cascade) and [s.label for s in cas.stages] == ["guard", "guard+maha+ppl"]
    assert cas.stages[0].scorer is cas.stages[1].scorer  # one model for both stages
    counts = count_rows(cas.stages[1].scorer.loaded.backbone)
    out = cas.score([r["conversation"] for r in rows])
    escalated = sum(r["stage"] == 2 for r in rows)
    assert 0 < escalated < len(rows)
    assert counts == {"guard": len(rows), "lm": escalated}  # stage 2's forward count = escalated rows
    assert cas.rows_scored == [len(rows), escalated]
    for r, o in zip(rows, out):
        assert o["stage"] == r["stage"]
        assert o["score"] == pytest.approx(r["score"], rel=1e-6, abs=1e-6)
        assert o["stage_scores"]["guard"] == pytest.approx(r["score_stage1"], rel=1e-6, abs=1e-6)
        if r["stage"] == 2:
            assert o["stage_scores"]["guard+maha+ppl"] == pytest.approx(r["score_stage2"], rel=1e-6, abs=1e-6)
            assert set(o["detectors"]["guard+maha+ppl"]) == {"guard", "maha", "ppl"}
        else:
            assert o["stage_scores"]["guard+maha+ppl"] is None and "guard+maha+ppl" not in o["detectors"]
        assert o["flags"] == {k: o["score"] > t for k, t in cas.thresholds.items()}
    analysis = json.loads((runs["folders"]["a:cascade"] / "analysis.json").read_text())
    assert cas.thresholds == analysis["thresholds"]


def test_cli_scores_a_cascade_bundle(runs, cascade_bundle, tmp_path, capsys):
    from moodguard.cli import main

    rows = results(runs["folders"]["a:cascade"])[:40]
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": r["id"], "conversation": r["conversation"]}) + "\n" for r in rows)
                   + json.dumps({"id": "blank", "conversation": "  "}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", "--monitor", str(cascade_bundle), str(inp), "--out", str(out), "--chunk-size", "16"]) == 0
    got = [json.loads(line) for line in open(out)]
    assert [g["id"] for g in got] == [r["id"] for r in rows] + ["blank"]
    assert [g["stage"] for g in got[:-1]] == [r["stage"] for r in rows]
    assert got[-1]["score"] is None and all(got[-1]["flags"].values()) and got[-1]["unscorable"]
    err = capsys.readouterr().err
    assert f"stage 1 scored {len(rows)} rows; stage 2 scored {sum(r['stage'] == 2 for r in rows)} rows" in err


def test_cross_backbone_bundle_runs_the_other_backbone_on_escalated_rows_only(runs, tmp_path):
    from eval.run.cascade import evaluate_cascade
    from eval.run.cascade_bundle import export_cascade, load_bundle

    ctx = cross_context(runs)
    folder = evaluate_cascade(ctx, n_boot=0, plots=False)
    cas = load_bundle(export_cascade(ctx, tmp_path / "cross"))
    first, second = (s.scorer.loaded.backbone for s in cas.stages)
    assert first is not second
    c1, c2 = count_rows(first), count_rows(second)
    rows = results(folder)
    out = cas.score([r["conversation"] for r in rows])
    escalated = sum(r["stage"] == 2 for r in rows)
    assert c1 == {"guard": len(rows), "lm": 0}
    assert c2 == {"guard": escalated, "lm": escalated}  # the second backbone: both its passes, escalated rows only
    assert [o["stage"] for o in out] == [r["stage"] for r in rows]
    assert [o["score"] for o in out] == pytest.approx([r["score"] for r in rows], rel=1e-6, abs=1e-6)


def test_an_edited_cascade_bundle_is_one_line(runs, cascade_bundle, tmp_path, capsys):
    """A rule edited (manifest rewritten so only the value check can catch it) or a stage file
    tampered: one line naming the file and field, exit 2, nothing written."""
    from eval.run.bundle import write_manifest
    from moodguard.cli import main

    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"conversation": results(runs["folders"]["a:cascade"])[0]["conversation"]}) + "\n")
    for edit, expect in (
            (lambda doc: doc["rule"]["norms"][1].update(sigma=0),
             "cascade.json: field 'rule.norms[1].sigma': must be > 0"),
            (lambda doc: doc["rule"].update(bands=[]), "cascade.json: field 'rule.bands': expected 1 entries"),
            (lambda doc: doc["stages"][1].update(folder="../x"), "cascade.json: field 'stages[1].folder': expected "
                                                                 "'stages/2'")):
        copy = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(cascade_bundle, copy)
        doc = json.loads((copy / "cascade.json").read_text())
        edit(doc)
        (copy / "cascade.json").write_text(json.dumps(doc))
        write_manifest(copy)
        out = tmp_path / "out.jsonl"
        assert main(["score", "--monitor", str(copy), str(inp), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moodguard score: error: ") and expect in err[0], err
        assert not out.exists()
    copy = tmp_path / "tampered"
    shutil.copytree(cascade_bundle, copy)
    (copy / "stages" / "2" / "fusion.json").write_text("{}")
    assert main(["score", "--monitor", str(copy), str(inp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages/2/fusion.json: sha256 does not match manifest.json" in err[0]


# ----------------------------------------------------------------------------- the cost-recall view
def test_cost_recall_view_has_every_monitor_and_cascade_per_backbone(runs, tmp_path, capsys):
    """The chart command writes the cost view next to the scaling chart: one point per eval folder
    at its measured seconds per conversation, the cross-backbone cascade's panel also showing the
    other backbone's stage monitor."""
    import csv

    from eval.run.cascade import evaluate_cascade
    from moodguard.cli import main

    evaluate_cascade(cross_context(runs), n_boot=0, plots=False)
    assert main(["chart", str(runs["root"]), "--fpr", "0.01"]) == 0
    assert "cost_vs_recall.png" in capsys.readouterr().out
    rows = list(csv.DictReader(open(runs["root"] / "chart" / "cost_vs_recall.csv")))
    by = {(r["panel"], r["run"], r["monitor"]): r for r in rows}
    assert {("run-a", "run-a", m) for m in ("guard", "guard+maha+ppl", "cascade", "cross")} <= set(by)
    assert ("run-a", "run-b", "guard+maha+ppl") in by and ("run-b", "run-b", "guard+maha+ppl") in by
    for (panel, run, monitor), r in by.items():
        folder = runs["root"] / run / "eval" / monitor
        meta = json.loads((folder / "meta.json").read_text())
        analysis = json.loads((folder / "analysis.json").read_text())
        assert float(r["seconds_per_conversation"]) == pytest.approx(meta["seconds_per_conversation"])
        assert float(r["tpr"]) == pytest.approx(analysis["overall"]["tpr"]["0.01"])
        assert r["kind"] == ("cascade" if monitor in ("cascade", "cross") else "monitor")
    cascade = by[("run-a", "run-a", "cascade")]
    assert float(cascade["escalation_rate"]) == json.loads(
        (runs["folders"]["a:cascade"] / "cascade.json").read_text())["test"]["escalation_rate"][0]
    md = (runs["root"] / "chart" / "cost_vs_recall.md").read_text()
    assert "| run-a | cascade (guard > guard+maha+ppl," in md and "| run-a | run-b:guard+maha+ppl |" in md


def test_fill_budget_spends_the_budget():
    """Without fill a narrower band wins when it has the same ID recall; with fill only the bands
    escalating the most the budget allows compete."""
    from eval.engine.cascade import Budget, fit_rule

    s1, s2, y, dom = synthetic(8, n=200)
    s2 = s1 + 0.01 * np.random.default_rng(2).normal(size=s1.size)  # stage 2 adds nothing: no band needed
    lean = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3), fpr=0.05)
    full = fit_rule([s1, s2], y, dom, [1.0, 1.0], Budget(max_escalation_rate=0.3, fill=True), fpr=0.05)
    assert lean.report["escalation_rate"] < 0.25
    assert full.report["escalation_rate"] == pytest.approx(0.3) and full.report["budget"]["fill"] is True



def test_stages_join_on_ids_validation_rows_in_common_test_rows_all(runs, tmp_path):
    """Runs cut with other data settings: the fit uses the ID validation rows every stage scored;
    a stage that scored other test rows is one line naming its folder."""
    from eval.run.cascade import evaluate_cascade
    from eval.run.context import resolve
    from mood_data.errors import DataError
    from train.recipe import load_recipe

    copy = tmp_path / "run"
    shutil.copytree(runs["root"] / "run-a" / "eval", copy / "eval")
    path = copy / "eval" / "guard+maha+ppl" / "validation.json"
    val = json.loads(path.read_text())
    keep = len(val["ids"]) - 5
    path.write_text(json.dumps({k: (v[:keep] if isinstance(v, list) else v) for k, v in val.items()}))
    ctx = resolve(load_recipe(runs["a"], [f"output_dir={copy}"]))
    doc = json.loads((evaluate_cascade(ctx, n_boot=0, plots=False) / "cascade.json").read_text())
    assert doc["fit"]["n_rows"] == keep and doc["fit"]["validation_rows_per_stage"] == [len(val["ids"]), keep]
    res = copy / "eval" / "guard+maha+ppl" / "results.jsonl"
    res.write_text("".join(res.read_text().splitlines(keepends=True)[:-1]))
    with pytest.raises(DataError, match=r"guard\+maha\+ppl: stage 2 \(guard\+maha\+ppl\) scored other test rows than "
                                        r"stage 1 .*\(1 missing, 0 extra\)"):
        evaluate_cascade(ctx, n_boot=0, plots=False)


def test_cost_view_finds_another_runs_stage_after_the_folder_moved(runs, tmp_path):
    from eval.report.cost import cost_points
    from eval.report.scaling import find_eval_folders
    from eval.run.cascade import evaluate_cascade

    evaluate_cascade(cross_context(runs), n_boot=0, plots=False)
    for run in ("run-a", "run-b"):
        shutil.copytree(runs["root"] / run / "eval", tmp_path / "moved" / run / "eval")
    doc_path = tmp_path / "moved" / "run-a" / "eval" / "cross" / "cascade.json"
    doc = json.loads(doc_path.read_text())
    doc["stages"][1]["eval_folder"] = "/nonexistent/run-b/eval/guard+maha+ppl"  # where it was evaluated
    doc_path.write_text(json.dumps(doc))
    points = cost_points(find_eval_folders(tmp_path / "moved"))
    assert any(p.panel == "run-a" and p.run == "run-b" for p in points)


def test_the_measured_frontier_is_a_monotone_trade_off(runs):
    """benchmarks/cascade_frontier.py on evaluated runs: the fitted ID recall never falls as the
    escalation budget grows, each cascade stays within its budget, and the ends are the single
    monitors (budget 0: the guard's cost and recall; a filled 100 % budget: the full monitor's
    recall at the guard pass plus the LM pass)."""
    from benchmarks.cascade_frontier import frontier, single

    run = runs["root"] / "run-a"
    if not (run / "recipe.yaml").is_file():  # what training writes; these runs' adapters were made directly
        shutil.copy2(runs["a"], run / "recipe.yaml")
    budgets = [0.0, 0.1, 0.2, 0.4, 1.0]
    rows = frontier(run, ["guard", "guard+maha+ppl"], budgets, None, 0)
    fill = frontier(run, ["guard", "guard+maha+ppl"], budgets, None, 0, fill=True)
    guard, full = single(run / "eval" / "guard"), single(run / "eval" / "guard+maha+ppl")
    for r in (*rows, *fill):
        assert r["fit_escalation"] <= r["budget"] + 1e-12
    fitted = [r["fit_id_recall"] for r in rows]
    assert fitted == sorted(fitted)
    assert rows[0]["cost"] == pytest.approx(guard["cost"]) and rows[0]["overall"] == guard["overall"]
    assert fill[-1]["test_escalation"] == 1.0 and fill[-1]["cost"] == pytest.approx(full["cost"])
    assert fill[-1]["overall"] == full["overall"]
    costs = [r["cost"] for r in fill]
    assert costs == sorted(costs)  # spending more budget costs more


def test_export_refuses_a_missing_or_stale_cascade(runs, tmp_path, capsys):
    from moodguard.cli import main

    cases = (("the recipe has no cascade (cascade.stages is empty)", ["cascade.stages=[]"]),
             ("field 'budget': evaluated with", ["cascade.max_escalation_rate=0.25"]),
             ("the cascade 'other' has not been evaluated", ["cascade.name=other"]))
    for expect, overrides in cases:
        out = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        assert main(["export", "--recipe", str(runs["a"]), "--cascade", "--out", str(out), *overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moodguard export: error: ") and expect in err[0], err
        assert not out.exists()


def test_base_override_is_refused_for_stages_on_several_bases(runs, tmp_path):
    from eval.run.cascade import evaluate_cascade
    from eval.run.cascade_bundle import export_cascade, load_bundle
    from mood_data.errors import BundleError

    ctx = cross_context(runs)
    evaluate_cascade(ctx, n_boot=0, plots=False)
    bundle = export_cascade(ctx, tmp_path / "cross")
    with pytest.raises(BundleError, match="--base: the cascade's stages use 2 base models"):
        load_bundle(bundle, base="/nonexistent")


def test_a_cascade_fitted_on_few_id_safe_rows_says_so(runs):
    """The fixture's validation slice has 9 ID-safe rows: the FPR-1% band fit rests on them, and
    the cascade's analysis warns (small_cascade_fit), like a fusion fitted on few rows."""
    analysis = json.loads((runs["folders"]["a:cascade"] / "analysis.json").read_text())
    warning = next(w for w in analysis["warnings"] if w["kind"] == "small_cascade_fit")
    assert warning["n_id_safe"] == 9 and "FPR 0.01 needs >= 1000" in warning["message"]
    assert "small_cascade_fit" not in {w["kind"] for w in json.loads(
        (runs["folders"]["a:guard"] / "analysis.json").read_text())["warnings"]}


def test_recipes_show_explain_lists_each_stage(capsys):
    """--explain prints one row per stage field (it crashed on the list of sections)."""
    from moodguard.cli import main

    assert main(["recipes", "show", "recipes/tiny/m.yaml", "cascade.stages=[{monitor: guard}, {monitor: guard+ppl}]",
                 "cascade.max_escalation_rate=0.3", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "cascade.stages[1].monitor: guard+ppl    # recipes/tiny/m.yaml (override)" in out
    assert "cascade.max_cost_per_conversation: null    # default" in out
