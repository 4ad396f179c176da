"""fit / evaluate: cache hits, ID-only fusion, end-to-end run folders equal to separate scoring."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_forward import make_adapters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


MONITORS = ["guard", "guard+maha", "guard+ppl", "guard+maha+ppl", "guard+knn", "guard+energy", "maha", "ppl"]


def write_recipe(path: Path, model_dir: Path, data_dir: Path, run_dir: Path) -> Path:
    path.write_text(
        f"model: {model_dir}\ndtype: float32\noutput_dir: {run_dir}\n"
        f"data: {{source: {data_dir}, validation_fraction: 0.25}}\n"
        "eval:\n  batch_size: 8\n  max_length: 48\n  knn: {k: 3, max_ref: 100}\n"
        "  monitors: [guard, guard+maha]\n",
        encoding="utf-8",
    )
    return path


_SHARED: dict = {}  # one evaluated run per session, shared with tests/test_bundle.py


def shared_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """(recipe_path, run_dir, recipe, {monitor: folder}) built once per session."""
    if "run" not in _SHARED:
        from eval.run.evaluate import evaluate_recipe
        from train.recipe import load_recipe

        root = tmp_path_factory.mktemp("monitor_run")
        make_adapters(tiny_model_dir, root / "run", seed=2)
        recipe_path = write_recipe(root / "recipe.yaml", tiny_model_dir, tiny_dataset_dir, root / "run")
        recipe = load_recipe(recipe_path)
        folders = evaluate_recipe(recipe, monitors=MONITORS, n_boot=20, plots=False)
        _SHARED["run"] = (recipe_path, root / "run", recipe, folders)
    return _SHARED["run"]


@pytest.fixture
def run_setup(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    return shared_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory)[:2]


@pytest.fixture
def evaluated(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    return shared_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory)[2:]


def test_parse_monitor():
    from eval.engine.table import parse_monitor, parse_monitors
    from mood_data.errors import RecipeError

    assert parse_monitor("guard+maha+ppl") == ("guard", "maha", "ppl")
    assert parse_monitors("guard, maha+guard") == ["guard", "maha+guard"]
    for bad in ("guard+foo", "guard+guard", ""):
        with pytest.raises(RecipeError):
            parse_monitor(bad)


def test_evaluate_writes_valid_run_folders(evaluated, tiny_dataset_dir):
    recipe, folders = evaluated
    assert list(folders) == MONITORS
    n_test = sum(1 for _ in open(tiny_dataset_dir / "test.jsonl"))
    ref = None
    for name, d in folders.items():
        rows = [json.loads(line) for line in open(d / "results.jsonl")]
        assert len(rows) == n_test
        analysis = json.loads((d / "analysis.json").read_text())
        meta = json.loads((d / "meta.json").read_text())
        assert analysis["monitor"] == name and meta["monitor"] == name
        assert meta["params"] > 0 and meta["n_rows"] == n_test and meta["seconds"] > 0
        assert meta["seconds_per_conversation"] == pytest.approx(meta["seconds"] / n_test)
        assert meta["truncated_rows"] > 0  # max_length 48 cuts some synthetic rows
        assert (d / "summary.md").is_file()
        for det in name.split("+"):
            assert all(np.isfinite(r[f"score_{det}"]) for r in rows)
        # the test set is scored once: the detector columns are identical across monitors
        cols = {k: [r[k] for r in rows] for k in rows[0] if k.startswith("score_")}
        if ref is None:
            ref = cols
        for k, v in cols.items():
            if k in ref:
                assert v == ref[k]
            else:
                ref[k] = v
        if name == "guard":  # lambda fusion of one detector is a monotone z-score of it
            s, g = np.array([r["score"] for r in rows]), np.array([r["score_guard"] for r in rows])
            assert np.corrcoef(s, g)[0, 1] == pytest.approx(1.0)


def test_scores_equal_separately_computed(evaluated, run_setup, tiny_model_dir):
    """score_guard / score_maha / score_ppl equal the mood-bench three-model computation."""
    from eval.engine.forward import encode
    from eval.run.fitting import fit_detectors, load_stats
    from train.modeling import load_causal_lm, load_guard_model, load_tokenizer

    recipe, folders = evaluated
    _, run = run_setup
    rows = [json.loads(line) for line in open(folders["guard+maha+ppl"] / "results.jsonl")][::9]
    tok = load_tokenizer(tiny_model_dir)
    enc = encode(tok, [r["conversation"] for r in rows], recipe.eval.max_length)
    guard = load_guard_model(tiny_model_dir, run / "guard").eval()
    lm = load_causal_lm(tiny_model_dir, run / "lm").eval()
    maha_dir = next(iter(fit_detectors(recipe)["stats"]["maha"].values()))
    maha = load_stats(maha_dir, "maha")
    for r, ids in zip(rows, enc.input_ids):
        x = torch.tensor([ids.tolist()])
        with torch.no_grad():
            out = guard(input_ids=x, output_hidden_states=True)
            logits = lm(input_ids=x).logits[0, :-1].double()
        z = out.logits[0].double()
        assert r["score_guard"] == pytest.approx(float(z[1] - z[0]), abs=1e-4)
        assert r["score_maha"] == pytest.approx(float(maha.score(out.hidden_states[-1][:, -1])[0]), rel=1e-4)
        nll = -torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None]).mean()
        assert r["score_ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)


def test_second_fit_is_a_cache_hit(evaluated, monkeypatch):
    import eval.run.fitting as fitting

    recipe, _ = evaluated
    first = fitting.fit_detectors(recipe)

    def boom(*a, **k):
        raise AssertionError("forward pass on a cache hit")

    import eval.engine.perplexity
    import eval.engine.planner
    import eval.run.fitting

    for mod in (eval.run.fitting, eval.engine.planner):
        monkeypatch.setattr(mod, "guard_pass", boom)
    monkeypatch.setattr(eval.engine.perplexity, "token_nll_pass", boom)  # the LM pass, looked up when it runs
    second = fitting.fit_detectors(recipe)
    assert second == first
    # a different estimator is a different key -> a miss -> needs the forward
    from train.recipe import load_recipe

    other = load_recipe(recipe.source_file, ["eval.mahalanobis.estimator=ledoit_wolf"])
    with pytest.raises(AssertionError, match="cache hit"):
        fitting.fit_detectors(other)


def test_fusion_fits_on_id_train_rows_only(evaluated, run_setup, monkeypatch, tiny_dataset_dir):
    import eval.engine.fusion as fusion
    import eval.run.evaluate as monitor
    import eval.run.fitting as fitting
    from mood_data.domains import ID_DOMAINS

    recipe, _ = evaluated
    seen = []
    real = fusion.Fusion.fit.__func__

    def spy(cls, method, scores, malign, domains, **kw):
        seen.append((method, list(scores), len(malign), list(domains)))
        return real(cls, method, scores, malign, domains, **kw)

    monkeypatch.setattr(fusion.Fusion, "fit", classmethod(spy))
    monitor.evaluate_recipe(recipe, monitors=["guard+maha+ppl"], n_boot=10, plots=False)
    (method, names, n, domains), = seen
    assert method == "lambda" and names == ["guard", "maha", "ppl"]
    assert set(domains) <= set(ID_DOMAINS)
    calib = fitting.fit_detectors(recipe)["calibration"]
    ids = json.loads((calib / "meta.json").read_text())["ids"]
    train_ids = {json.loads(line)["id"] for line in open(tiny_dataset_dir / "train.jsonl")}
    assert len(ids) == n and set(ids) <= train_ids  # the held-out ID validation slice, never test rows


def test_cli_evaluate_table_and_errors(evaluated, run_setup, capsys, tmp_path):
    from moodguard.cli import main

    recipe_path, run = run_setup
    assert main(["evaluate", "--recipe", str(recipe_path), "--monitors", "guard,guard+maha", "--no-plots", "--n-boot", "10"]) == 0
    out = capsys.readouterr().out
    assert "TPR@1%FPR" in out and "jailbroken" in out and "guard+maha" in out
    # a run without a guard adapter: one-line error, exit 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe_path.read_text().replace(f"output_dir: {run}", f"output_dir: {tmp_path / 'none'}"))
    assert main(["fit", "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moodguard fit: error:") and "guard adapter not found" in err[0]
    shutil.rmtree(tmp_path / "none", ignore_errors=True)


def test_fit_only_what_the_monitors_use(evaluated):
    import eval.run.cache as cache
    import eval.run.fitting as fitting

    recipe, _ = evaluated
    assert fitting.fit_detectors(recipe, monitors=["guard+ppl"])["stats"] == {}  # no maha, no kNN
    out = fitting.fit_detectors(recipe, monitors=["guard+knn", "guard"])
    assert set(out["stats"]) == {"knn"}
    calib, _, _ = cache.read_calibration(out["calibration"])
    assert "knn" in calib and "maha" not in calib and "guard" in calib


def test_evaluate_with_thresholds_from_the_validation_slice(evaluated, run_setup, tmp_path):
    """eval.calibration_split=validation: thresholds = quantiles of the fused ID-safe validation
    scores (the rows the fusion is fitted on), not of the test rows; default folders unchanged."""
    import eval.run.evaluate as monitor
    import eval.run.cache as cache
    import eval.run.fitting as fitting
    from eval.report.runfolder import reanalyze
    from mood_data.domains import DEFAULT_REGISTRY
    from train.recipe import load_recipe

    recipe, folders = evaluated
    _, run = run_setup
    assert "calibration" not in json.loads((folders["guard+maha"] / "analysis.json").read_text())
    shutil.copytree(run, tmp_path / "run")  # cached statistics come along: no refit
    held = load_recipe(recipe.source_file, [f"output_dir={tmp_path / 'run'}", "eval.calibration_split=validation"])
    out = monitor.evaluate_recipe(held, monitors=["guard+maha"], n_boot=10, plots=False)
    analysis = json.loads((out["guard+maha"] / "analysis.json").read_text())
    calib, malign, domains = cache.read_calibration(fitting.fit_detectors(held)["calibration"])
    fz = monitor.fit_fusion(held.eval.fusion, calib, malign, domains, ["guard", "maha"])
    fused = fz.apply({k: calib[k] for k in ("guard", "maha")})
    safe = fused[(malign == 0) & np.array([DEFAULT_REGISTRY.is_id(d) for d in domains])]
    assert analysis["n_id_safe"] == safe.size and analysis["calibration"]["split"] == "validation"
    for f in held.eval.fprs:
        assert analysis["thresholds"][str(f)] == pytest.approx(np.quantile(safe, 1 - f))
    rows = [json.loads(line) for line in open(out["guard+maha"] / "results.jsonl")]
    test_safe = np.array([r["score"] for r in rows if r["malign"] == 0 and DEFAULT_REGISTRY.is_id(r["domain"])])
    thr = analysis["thresholds"]["0.01"]
    assert analysis["calibration"]["test_fpr"]["0.01"] == pytest.approx(np.mean(test_safe > thr))
    assert reanalyze(out["guard+maha"], plots=False)["thresholds"] == analysis["thresholds"]  # negatives.json kept
    meta = json.loads((out["guard+maha"] / "meta.json").read_text())
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["calibration_split"] == "validation"
    assert meta["fusion_fit"]["n_fit"] == len(malign)


def file_reads(monkeypatch) -> list[str]:
    """Names of the data files mood_data.load reads from now on (appended as they are read)."""
    import mood_data.load as load

    reads: list[str] = []
    real = load.read_records

    def spy(path):
        reads.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(load, "read_records", spy)
    return reads


def test_evaluate_reads_each_split_once(evaluated, monkeypatch):
    """evaluate reads the test split once: the train/validation cut comes from the same
    load_splits call (train_validation_cut alone would read test again for its leakage check)."""
    import eval.run.evaluate as monitor

    recipe, _ = evaluated
    reads = file_reads(monkeypatch)
    monitor.evaluate_recipe(recipe, monitors=["guard+maha"], n_boot=10, plots=False)
    assert sorted(reads) == ["test.jsonl", "train.jsonl"]


def test_export_that_must_evaluate_reads_each_split_once(evaluated, monkeypatch, tmp_path):
    """export of a monitor not evaluated yet runs evaluate first; the test split is still read
    once (the cut comes from evaluate's own read, eval.run.evaluate.eval_splits)."""
    from eval.run.bundle import export_bundle

    recipe, _ = evaluated
    reads = file_reads(monkeypatch)
    out = export_bundle(recipe, tmp_path / "b", "guard+energy+ppl")
    assert (out / "manifest.json").is_file() and (out / "monitor.json").is_file()
    assert sorted(reads) == ["test.jsonl", "train.jsonl"]
