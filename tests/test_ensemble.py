"""Guard ensembles: min / mean / disagreement on hand-made member scores, and 3 tiny guards
(guard.seeds=[0,1,2]) trained and evaluated end to end on one loaded base."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from test_train_guard import write_tiny_recipe

from eval.engine.detectors.ensemble import (EnsembleDisagreement, EnsembleMean, EnsembleMin, ensemble_disagreement,
                                            ensemble_mean, ensemble_min, sigmoid)
from eval.run.ensemble import member_dirs
from mood_data.errors import BundleError, RecipeError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L3 = math.log(3.0)  # sigmoid(ln 3) = 0.75

MEMBERS = np.array([[L3, -L3, 0.0],    # probs .75 .25 .5
                    [1.0, 1.0, 1.0],   # unanimous
                    [2.0, -1.0, 0.5],
                    [-3.0, -2.0, -4.0]])


def test_hand_computed_values():
    assert ensemble_mean(MEMBERS).tolist() == pytest.approx([0.0, 1.0, 0.5, -3.0])
    assert ensemble_min(MEMBERS).tolist() == pytest.approx([-L3, 1.0, -1.0, -4.0])
    d = ensemble_disagreement(MEMBERS)
    # row 0: probs .75 .25 .5 -> mean .5, var (.0625 + .0625 + 0) / 3 = 1/24
    assert d[0] == pytest.approx(math.sqrt(1 / 24), abs=1e-12)
    assert d[1] == 0.0
    p = [1 / (1 + math.exp(-v)) for v in MEMBERS[2]]
    m = sum(p) / 3
    assert d[2] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in p) / 3), abs=1e-12)
    assert sigmoid(np.array([-800.0, 0.0, 800.0])).tolist() == [0.0, 0.5, 1.0]  # no overflow
    assert all(cls().score(MEMBERS).dtype == np.float64 for cls in (EnsembleMean, EnsembleMin, EnsembleDisagreement))


def test_min_flags_only_when_every_member_flags():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    for t in (-0.5, 0.0, 0.7):
        assert np.array_equal(ensemble_min(x) > t, (x > t).all(axis=1))


def test_member_dirs_errors(tmp_path):
    with pytest.raises(BundleError, match="guard-seed1"):
        (tmp_path / "guard-seed0").mkdir()
        (tmp_path / "guard-seed0" / "adapter_config.json").write_text("{}")
        member_dirs(tmp_path, [0, 1])
    with pytest.raises(BundleError, match="1 seed"):
        member_dirs(tmp_path, [0])


def test_monitor_names_parse():
    from eval.engine.table import parse_monitor
    from moodguard.cli_common import load_checked_recipe as load_recipe  # monitor names are checked at load
    from train.recipe_files import RECIPES_DIR

    assert parse_monitor("guard+ensemble-disagreement") == ("guard", "ensemble-disagreement")
    r = load_recipe(RECIPES_DIR / "tiny" / "s.yaml",
                    ['eval.monitors=["ensemble-min", "guard+ensemble-disagreement", "guard+judge-uncertainty"]'])
    assert r.eval.monitors[1] == "guard+ensemble-disagreement"
    with pytest.raises(RecipeError, match="ensemble-max"):
        load_recipe(RECIPES_DIR / "tiny" / "s.yaml", ['eval.monitors=["ensemble-max"]'])


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    from eval.run.evaluate import evaluate_recipe
    from moodguard.cli import main as moodguard
    from train.recipe import load_recipe

    root = tmp_path_factory.mktemp("ensemble_run")
    path = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run",
                             guard__seeds=[0, 1, 2], guard__max_steps=2, guard__save_steps=2,
                             eval={"batch_size": 16, "max_length": 64, "knn": {"k": 3, "max_ref": 100}})
    assert moodguard(["train", "guard", "--recipe", str(path)]) == 0
    recipe = load_recipe(path)
    monitors = ["guard", "ensemble-mean", "ensemble-min", "ensemble-disagreement", "guard+ensemble-disagreement"]
    folders = evaluate_recipe(recipe, monitors=monitors, n_boot=10, plots=False)
    return root / "run", recipe, folders


def test_three_guards_train_and_evaluate(ensemble_run, tiny_model_dir):
    from train.modeling import load_guard_model, load_tokenizer

    run, recipe, folders = ensemble_run
    assert not (run / "guard").exists()
    members = [run / f"guard-seed{s}" for s in (0, 1, 2)]
    heads = []
    for m in members:
        assert json.loads((m / "metrics.json").read_text())["seed"] == int(m.name[-1])
        from safetensors.torch import load_file

        heads.append(next(v for k, v in load_file(str(m / "adapter_model.safetensors")).items() if k.endswith("score.weight")))
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])  # seeds differ

    rows = [json.loads(line) for line in open(folders["guard+ensemble-disagreement"] / "results.jsonl")]
    meta = json.loads((folders["ensemble-mean"] / "meta.json").read_text())
    assert set(meta["detector_seconds"]) == {"guard", "ensemble"}
    # an ensemble-only monitor costs its own pass; guard+ensemble adds the guard pass
    assert meta["seconds"] == pytest.approx(meta["detector_seconds"]["ensemble"])
    both = json.loads((folders["guard+ensemble-disagreement"] / "meta.json").read_text())["seconds"]
    assert both == pytest.approx(sum(meta["detector_seconds"].values()))
    # reference: each member loaded the mood-bench way, on every 10th test row
    tok = load_tokenizer(tiny_model_dir)
    sub = rows[::10]
    ref = np.zeros((len(sub), 3))
    for j, m in enumerate(members):
        model = load_guard_model(tiny_model_dir, m).eval()
        for i, r in enumerate(sub):
            ids = tok(r["conversation"])["input_ids"][-recipe.eval.max_length:]
            with torch.no_grad():
                z = model(input_ids=torch.tensor([ids])).logits[0].double()
            ref[i, j] = float(z[1] - z[0])
    # the 'guard' detector of an ensemble run is the first member
    assert [r["score_guard"] for r in sub] == pytest.approx(ref[:, 0].tolist(), abs=1e-4)
    assert [r["score_ensemble-disagreement"] for r in sub] == pytest.approx(ensemble_disagreement(ref).tolist(), abs=1e-5)
    for name, fn in (("ensemble-mean", ensemble_mean), ("ensemble-min", ensemble_min)):
        got = [json.loads(line)[f"score_{name}"] for line in open(folders[name] / "results.jsonl")][::10]
        assert got == pytest.approx(fn(ref).tolist(), abs=1e-4)
    analysis = json.loads((folders["ensemble-disagreement"] / "analysis.json").read_text())
    assert analysis["monitor"] == "ensemble-disagreement" and "jailbroken" in analysis["groups"]


def test_members_share_one_base(ensemble_run):
    """Members are extra adapters on the one loaded base; the ID-validation scores are cached."""
    from eval.run.backbone import load_run
    from eval.run.context import resolve
    from eval.run.ensemble import member_adapters

    run, recipe, _ = ensemble_run
    model = resolve(recipe).model
    loaded = load_run(model)
    names = member_adapters(loaded, member_dirs(model.run_root, model.guard_seeds))
    assert names == ["guard", "guard-seed1", "guard-seed2"]
    assert set(loaded.backbone.model.peft_config) >= {"guard", "guard-seed1", "guard-seed2"}
    n_base = sum(1 for mod in loaded.backbone.model.modules() if type(mod).__name__.endswith("ForCausalLM"))
    assert n_base == 1
    assert len(list((run / "stats").glob("calibration-ensemble-*"))) == 1


def test_ensemble_bundle_scores_like_evaluate(ensemble_run, tmp_path):
    """`moodguard export` of an ensemble monitor: the other members travel in the bundle and
    the loaded bundle reproduces evaluate's fused and per-detector scores."""
    from eval.run.bundle import Monitor, export_bundle

    run, recipe, folders = ensemble_run
    out = export_bundle(recipe, tmp_path / "b", "guard+ensemble-disagreement")
    spec = json.loads((out / "monitor.json").read_text())
    assert spec["ensemble"]["members"] == ["guard", "guard-seed1", "guard-seed2"]  # seed 0 is the anchor
    assert sorted(p.name for p in (out / "members").iterdir()) == ["guard-seed1", "guard-seed2"]
    rows = [json.loads(line) for line in open(folders["guard+ensemble-disagreement"] / "results.jsonl")][::9]
    got = Monitor.load(out).score([r["conversation"] for r in rows])
    # the bundle scores these rows in other batches (other left-padding widths) than evaluate did:
    # float32 logits agree to ~1e-5 relative, not bit for bit
    for r, g in zip(rows, got):
        assert g["score"] == pytest.approx(r["score"], rel=1e-5, abs=1e-5)
        assert g["detectors"]["ensemble-disagreement"] == pytest.approx(r["score_ensemble-disagreement"], abs=1e-6)
        assert g["detectors"]["guard"] == pytest.approx(r["score_guard"], rel=1e-5, abs=1e-5)
