from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from moodguard import sweep_emit, sweep_file, sweep_plan, sweep_run
from mood_data.errors import RecipeError
from train.recipe_files import RECIPES_DIR

SWEEP_YAML = f"""
name: t
recipes:
  - path: {RECIPES_DIR}/tiny/s.yaml
  - path: {RECIPES_DIR}/tiny/m.yaml
    overrides: {{guard.max_steps: 3}}
monitors: [guard, guard+maha]
overrides:
  data.max_train_rows: 10
"""


def _sweep(tmp_path, text=SWEEP_YAML):
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return sweep_file.load_sweep(p)


class Killed(Exception):
    pass


@pytest.fixture
def fake_stages(monkeypatch):
    """Stage functions that write a marker into the stage's outputs; fit of tiny-m fails once."""
    calls, fail = _Calls(), {"tiny-m/fit": 1}

    def fake(stage, recipe, monitors):
        assert Path(recipe.output_dir) == stage.run_dir
        for out in stage.outputs():
            assert not (out / "partial").exists(), f"{stage.id}: partial output not removed"
        calls.append(stage.id)
        first = stage.outputs()[0]
        first.mkdir(parents=True, exist_ok=True)
        if fail.get(stage.id):
            fail[stage.id] -= 1
            (first / "partial").write_text("half")
            raise Killed(stage.id)  # killed mid-stage
        for out in stage.outputs():
            out.mkdir(parents=True, exist_ok=True)
            (out / "done").write_text(stage.key)

    for name in sweep_plan.STAGES:
        monkeypatch.setitem(sweep_run.STAGE_FUNCTIONS, name, fake)
    calls.fail = fail
    return calls


class _Calls(list):
    pass


def test_resume_skips_finished_and_restarts_interrupted(tmp_path, fake_stages):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    stages = sweep_plan.plan_sweep(sweep, out)
    assert [s.id for s in stages] == [f"{r}/{s}" for r in ("tiny-s", "tiny-m") for s in sweep_plan.STAGES]
    with pytest.raises(Killed):
        sweep_run.run_stages(stages, out, progress=lambda m: None)
    assert fake_stages == [s.id for s in stages[:7]]
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["tiny-m/fit"]["status"] == "failed" and state["tiny-m/train-lm"]["status"] == "done"
    assert (out / "tiny-m" / "stats" / "partial").exists()

    fake_stages.clear()
    res = sweep_run.run_stages(sweep_plan.plan_sweep(sweep, out), out, progress=lambda m: None)
    assert res.ran == ["tiny-m/fit", "tiny-m/evaluate"] == fake_stages
    assert len(res.skipped) == 6
    assert not (out / "tiny-m" / "stats" / "partial").exists()
    assert (out / "tiny-m" / "eval" / "guard+maha" / "done").is_file()

    fake_stages.clear()
    res = sweep_run.run_stages(sweep_plan.plan_sweep(sweep, out), out, progress=lambda m: None)
    assert res.ran == [] and fake_stages == [] and len(res.skipped) == 8


def test_changed_recipe_changes_keys_downstream(tmp_path, fake_stages):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    a = {s.id: s.key for s in sweep_plan.plan_sweep(sweep, out)}
    b = {s.id: s.key for s in sweep_plan.plan_sweep(_sweep(tmp_path, SWEEP_YAML.replace("max_steps: 3", "max_steps: 4")), out)}
    assert a["tiny-s/train-guard"] == b["tiny-s/train-guard"]
    for st in sweep_plan.STAGES:  # the recipe hash covers the whole resolved recipe; fit/evaluate follow upstream
        assert a[f"tiny-m/{st}"] != b[f"tiny-m/{st}"]
    # output_dir is not part of the key: a moved sweep keeps its keys
    assert a == {s.id: s.key for s in sweep_plan.plan_sweep(sweep, tmp_path / "elsewhere")}


def added_fields(obj, prefix: str = "") -> dict[str, object]:
    """Every recipe key declared with ``setting(added=...)``, dotted, with its default."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(added_fields(value, f"{prefix}{f.name}."))
        elif f.metadata.get("added"):
            out[prefix + f.name] = f.default
    return out


def test_keys_added_later_leave_stage_keys_alone_at_their_default(tmp_path):
    """A key added with a behaviour-keeping default (``setting(added=...)``) is not in the stage
    keys while it holds that default, so a sweep folder written before it existed resumes; set to
    anything else it changes the keys of the run it is set on, like any key."""
    from train.recipe import load_recipe

    recipe = load_recipe(RECIPES_DIR / "tiny" / "s.yaml")
    added = added_fields(recipe)
    assert {"data.validation_groups", "guard.eval_on_start", "lm.eval_on_start", "judge.eval_on_start"} <= set(added)
    full, ident = recipe.to_dict(), recipe.identity()
    for dotted in added:
        *parents, leaf = dotted.split(".")
        f, i = full, ident
        for part in parents:
            f, i = f[part], i[part]
        assert leaf in f and leaf not in i, dotted
    base = {s.id: s.key for s in sweep_plan.plan_sweep(_sweep(tmp_path), tmp_path / "out")}
    moved = _sweep(tmp_path, SWEEP_YAML.replace("max_steps: 3}", "max_steps: 3, data.validation_groups: prompt}"))
    keys = {s.id: s.key for s in sweep_plan.plan_sweep(moved, tmp_path / "out")}
    assert all(keys[k] == base[k] for k in base if k.startswith("tiny-s/"))
    assert all(keys[k] != base[k] for k in base if k.startswith("tiny-m/"))


def test_the_published_real_model_sweep_still_resumes():
    """The stage keys of the real-model sweep as recorded when it ran (benchmarks/data/embedded_real_sweep/
    state.json, code of commit 85b66ff, before data.validation_groups and <kind>.eval_on_start existed)
    equal today's plan of the same sweep file: resuming that folder reruns nothing. A change to a
    shipped recipe of that sweep fails here: rerun the sweep (its figures are published) and
    commit its new state.json."""
    record = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "embedded_real_sweep" / "state.json"
    recorded = {k: v["key"] for k, v in json.loads(record.read_text())["stages"].items()}
    sweep = sweep_file.load_sweep(RECIPES_DIR / "sweeps" / "embedded-real.yaml")
    planned = {s.id: s.key for s in sweep_plan.plan_sweep(sweep, "/nonexistent/sweep")}
    assert len(planned) == 24 and planned == recorded


def test_only_and_mark_done(tmp_path, fake_stages):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    stages = sweep_plan.select(sweep_plan.plan_sweep(sweep, out), only="train-guard", runs=["tiny-s"])
    assert [s.id for s in stages] == ["tiny-s/train-guard"]
    sweep_run.run_stages(stages, out, mark_only=True, progress=lambda m: None)
    assert fake_stages == []
    fake_stages.fail.clear()
    res = sweep_run.run_stages(sweep_plan.plan_sweep(sweep, out), out, progress=lambda m: None)
    assert "tiny-s/train-guard" in res.skipped and len(res.ran) == 7
    with pytest.raises(RecipeError, match="--only 'nope'"):
        sweep_plan.select(stages, only="nope")


def test_seeds_and_bad_files(tmp_path):
    s = _sweep(tmp_path, f"recipes:\n  - path: {RECIPES_DIR}/tiny/s.yaml\n    seeds: [1, 2]\n")
    runs = sorted({st.run for st in sweep_plan.plan_sweep(s, tmp_path / "o")})
    assert runs == ["tiny-s-seed1", "tiny-s-seed2"]
    with pytest.raises(RecipeError, match=r"key 'recipes\[0\]'.seeds"):
        _sweep(tmp_path, f"recipes:\n  - path: {RECIPES_DIR}/tiny/s.yaml\n    seeds: x\n")
    with pytest.raises(RecipeError, match="key 'bogus': unknown key"):
        _sweep(tmp_path, "bogus: 1\nrecipes: [a.yaml]\n")


def test_emit_slurm_valid_bash_and_dependencies(tmp_path):
    text = SWEEP_YAML.replace(
        "overrides: {guard.max_steps: 3}",
        "overrides: {accelerate.config: ddp, accelerate.num_processes: 2}")
    sweep, out = _sweep(tmp_path, text), tmp_path / "out"
    stages = sweep_plan.plan_sweep(sweep, out)
    submit = sweep_emit.emit_slurm(sweep, stages, out)
    files = sorted(submit.parent.glob("*.sbatch"))
    assert len(files) == 9
    for f in [submit, *files]:
        subprocess.run(["bash", "-n", str(f)], check=True)
    for f in files:
        assert f.read_text().startswith("#!/bin/bash\n#SBATCH --job-name=")
    m_guard = (submit.parent / "04-tiny-m-train-guard.sbatch").read_text()
    assert ("python -m accelerate.commands.launch --config_file accelerate_configs/ddp.yaml --num_machines 1 "
            '--machine_rank "$SLURM_NODEID" --num_processes 2') in m_guard
    assert "-m train.guard --recipe" in m_guard and " --resume " in m_guard
    assert "#SBATCH --gpus-per-node=2" in m_guard and "#SBATCH --nodes=1" in m_guard and "#SBATCH --requeue" in m_guard
    assert "moodguard fit --recipe" in (submit.parent / "02-tiny-s-fit.sbatch").read_text()
    assert "python -m train.lm --recipe" in (submit.parent / "01-tiny-s-train-lm.sbatch").read_text()

    # dependencies: submission order and afterok on exactly the upstream jobs
    jobs = {}
    for line in submit.read_text().splitlines():
        m = re.match(r"(JID_\w+)=\$\(sbatch --parsable(?: --dependency=afterok:(\S+))? (\S+)\)", line)
        if m:
            deps = re.findall(r"\$(JID_\w+)", m.group(2) or "")
            assert all(d in jobs for d in deps), f"{m.group(1)} depends on a job not yet submitted"
            jobs[m.group(1)] = (deps, m.group(3))
    for run in ("tiny_s", "tiny_m"):
        assert jobs[f"JID_{run}_train_guard"][0] == []
        assert jobs[f"JID_{run}_fit"][0] == [f"JID_{run}_train_guard", f"JID_{run}_train_lm"]
        assert jobs[f"JID_{run}_evaluate"][0] == [f"JID_{run}_fit"]
    assert jobs["JID_chart"][0] == ["JID_tiny_s_evaluate", "JID_tiny_m_evaluate"]
    assert "moodguard report" in (submit.parent / "99-chart-report.sbatch").read_text()


def test_emit_shell_order(tmp_path):
    sweep, out = _sweep(tmp_path), tmp_path / "out"
    text = sweep_emit.emit_shell(sweep, sweep_plan.plan_sweep(sweep, out), out)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    cmds = [l for l in text.splitlines() if l and not l.startswith("#") and "--mark-done" not in l][1:]
    assert [c.split()[1] if c.startswith("python") else c.split()[1] for c in cmds][:4] == ["-m", "-m", "fit", "evaluate"]
    assert cmds[-2].startswith("moodguard chart") and cmds[-1].startswith("moodguard report")


def test_base_sweep_inheritance(tmp_path):
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "s.yaml").write_text((RECIPES_DIR / "tiny" / "s.yaml").read_text()
                                                .replace("base: _family.yaml", f"base: {RECIPES_DIR}/tiny/_family.yaml"))
    (tmp_path / "parent" / "base.yaml").write_text(
        "name: parent\nrecipes: [s.yaml]\nmonitors: [guard, guard+ppl]\n"
        "overrides: {data.max_train_rows: 10, guard.max_steps: 3}\nchart: {fpr: 0.02}\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: parent/base.yaml\nmonitors: [guard]\noverrides: ['guard.max_steps=5']\n")
    s = sweep_file.load_sweep(child)
    assert s.name == "child"  # the name is never inherited (it names the output folder)
    assert [e.recipe for e in s.entries] == [(tmp_path / "parent" / "s.yaml").resolve()]  # relative to the base
    assert s.monitors == ("guard",) and s.chart_fpr == 0.02
    assert s.overrides == ("data.max_train_rows=10", "guard.max_steps=3", "guard.max_steps=5")  # own ones last
    from train.recipe import load_recipe

    (train,) = [st for st in sweep_plan.plan_sweep(s, tmp_path / "out") if st.stage == "train-guard"]
    assert load_recipe(train.recipe_path, train.overrides).guard.max_steps == 5

    (tmp_path / "a.yaml").write_text("base: b.yaml\nrecipes: [x.yaml]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(RecipeError, match=r"b\.yaml: key 'base': inheritance cycle through a\.yaml"):
        sweep_file.load_sweep(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match=r"c\.yaml: key 'base': base file not found: nowhere\.yaml"):
        sweep_file.load_sweep(tmp_path / "c.yaml")


def test_shipped_detector_sweep_extends_the_demo():
    demo = sweep_file.load_sweep(RECIPES_DIR / "sweeps" / "embedded.yaml")
    det = sweep_file.load_sweep(RECIPES_DIR / "sweeps" / "embedded-detectors.yaml")
    assert det.name == "embedded-detectors"
    assert det.overrides[:len(demo.overrides)] == demo.overrides
    assert {"ensemble-disagreement", "judge-uncertainty", "maha", "ppl"} <= set(det.monitors)
    stages = {st.id for st in sweep_plan.plan_sweep(det, Path("/tmp/never-written"))}
    assert stages == {"tiny-s/train-guard", "tiny-s/train-lm", "tiny-s/train-judge", "tiny-s/fit", "tiny-s/evaluate"}
