"""SIGKILL during fit / evaluate / score / a sweep, then rerun: outputs equal an uninterrupted run.

The kill point is deterministic: ``MOODGUARD_TEST_KILL_AFTER=N`` (mood_data/atomic.py, inert by
default) makes the process SIGKILL itself right after its N-th atomic commit, or with
``N:before`` once the N-th temporary is complete but not yet renamed. (Training's own
SIGKILL + ``--resume`` equality is tests/test_train_distributed.py.)

After each kill: no visible partial output (only hidden ``.<name>.*.tmp`` temporaries may be
left), then the rerun's visible files equal the reference run's (JSON/JSONL numbers within
1e-6, safetensors within 1e-6, timings and paths ignored) and every ``results.jsonl`` holds
each test id exactly once.
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from mood_data.atomic import KILL_ENV
from moodguard.cli import main as moodguard
from test_forward import make_adapters
from test_monitor import write_recipe
from test_train_distributed import env as subprocess_env
from test_train_guard import write_tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


VOLATILE = {"seconds", "detector_seconds", "seconds_per_conversation", "latency_s", "time", "versions", "train_runtime",
            "train_samples_per_second", "train_steps_per_second", "eval_runtime", "eval_samples_per_second",
            "eval_steps_per_second", "resumed_from"}


# ----------------------------------------------------------------------------- helpers
def killed(argv: list[str], at: str, cwd: Path) -> None:
    """Run ``moodguard argv`` in a subprocess that SIGKILLs itself at commit ``at``."""
    env = {**subprocess_env(), KILL_ENV: at, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moodguard.cli", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {at}: rc={proc.returncode}\n{proc.stderr[-2000:]}"


def visible(root: Path) -> list[str]:
    """Output files a reader can see (no path component starting with '.')."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))


def hidden_leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if any(part.startswith(".") for part in p.relative_to(root).parts))


def _norm(obj, roots: tuple[str, ...], tol: float = 1e-6):
    if isinstance(obj, dict):
        return {k: sorted(v) if k == "target_modules" and isinstance(v, list) else _norm(v, roots, tol)
                for k, v in obj.items() if k not in VOLATILE}  # peft saves a set: order varies
    if isinstance(obj, list):
        return [_norm(v, roots, tol) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(r, "<root>")
        return obj
    if isinstance(obj, float):
        return pytest.approx(obj, rel=tol, abs=tol)
    return obj


def assert_same_outputs(ref: Path, run: Path, skip: tuple[str, ...] = (), tol: float = 1e-6) -> None:
    """Visible files of ``run`` == those of ``ref`` (names and contents, see module doc);
    ``skip``: substrings of paths left out of the comparison."""
    def keep(n: str) -> bool:
        return not any(x in n for x in skip)

    names = [n for n in visible(run) if keep(n)]
    assert names == [n for n in visible(ref) if keep(n)]
    roots = (str(ref), str(run))
    for name in names:
        a, b = ref / name, run / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys(), name
            for k in ta:
                np.testing.assert_allclose(ta[k], tb[k], rtol=tol, atol=tol, err_msg=f"{name}:{k}")
        elif name.endswith(".jsonl"):
            ra = [json.loads(x) for x in a.read_text().splitlines()]
            rb = [json.loads(x) for x in b.read_text().splitlines()]
            assert _norm(rb, roots, tol) == _norm(ra, roots, tol), name
        elif name.endswith(".json"):
            assert _norm(json.loads(b.read_text()), roots, tol) == _norm(json.loads(a.read_text()), roots, tol), name
        elif name.endswith((".yaml", ".md", ".csv", ".txt")) and tol <= 1e-6:
            assert b.read_text().replace(str(run), "<root>") == a.read_text().replace(str(ref), "<root>"), name


def assert_each_id_once(run: Path, expected: list[str]) -> None:
    files = sorted(run.rglob("eval/*/results.jsonl"))
    assert files
    for f in files:
        if any(part.startswith(".") for part in f.relative_to(run).parts):
            continue
        ids = [json.loads(x)["id"] for x in f.read_text().splitlines()]
        assert sorted(ids) == sorted(expected), f
        assert len(ids) == len(set(ids)), f


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    return make_adapters(tiny_model_dir, tmp_path_factory.mktemp("interrupt_adapters"), seed=2)


def new_run(tmp: Path, name: str, model_dir: Path, data_dir: Path, adapters) -> tuple[Path, Path]:
    """A run folder with copies of the same adapters and its recipe: ``(recipe, run)``."""
    run = tmp / name / "run"
    for src in adapters:
        shutil.copytree(src, run / src.name)
    return write_recipe(tmp / name / "recipe.yaml", model_dir, data_dir, run), run


def ids_of(data_dir: Path) -> list[str]:
    return [json.loads(x)["id"] for x in (data_dir / "test.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- fit
# commits of `moodguard fit` on this run: 1-3 files of stats/<maha key>/, 4 that folder,
# 5-6 the calibration folder (no kNN folder: no monitor of the recipe uses kNN)
@pytest.mark.parametrize("at", ["2:before", pytest.param("5", marks=pytest.mark.slow)])
def test_fit_killed_then_rerun_equals_uninterrupted(at, tmp_path, tiny_model_dir, tiny_dataset_dir, adapters):
    ref_recipe, ref = new_run(tmp_path, "ref", tiny_model_dir, tiny_dataset_dir, adapters)
    assert moodguard(["fit", "--recipe", str(ref_recipe)]) == 0
    recipe, run = new_run(tmp_path, "run", tiny_model_dir, tiny_dataset_dir, adapters)
    killed(["fit", "--recipe", str(recipe)], at, tmp_path)
    done = [d.name for d in (run / "stats").iterdir() if not d.name.startswith(".")]
    assert len(done) == (0 if at == "2:before" else 1)  # whole stats folders or nothing
    if at.endswith(":before"):
        assert hidden_leftovers(run)  # the finished temporary is hidden, never a visible output
    assert moodguard(["fit", "--recipe", str(recipe)]) == 0
    assert_same_outputs(ref, run)


# ----------------------------------------------------------------------------- evaluate
EVAL = ["--monitors", "guard,guard+maha,guard+ppl", "--n-boot", "20", "--no-plots"]


def test_evaluate_killed_then_rerun_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_dataset_dir, adapters):
    ref_recipe, ref = new_run(tmp_path, "ref", tiny_model_dir, tiny_dataset_dir, adapters)
    assert moodguard(["evaluate", "--recipe", str(ref_recipe), *EVAL]) == 0
    recipe, run = new_run(tmp_path, "run", tiny_model_dir, tiny_dataset_dir, adapters)
    # 6 fit commits (Mahalanobis, calibration; no kNN), then 5 per monitor folder (4 files, then the
    # folder): 13 is inside guard+maha
    killed(["evaluate", "--recipe", str(recipe), *EVAL], "13", tmp_path)
    assert visible(run / "eval") == ["guard/analysis.json", "guard/meta.json", "guard/results.jsonl",
                                     "guard/summary.md", "guard/validation.json"]  # complete monitor folders only
    assert moodguard(["evaluate", "--recipe", str(recipe), *EVAL]) == 0
    assert_same_outputs(ref, run)
    assert_each_id_once(run, ids_of(tiny_dataset_dir))


# ----------------------------------------------------------------------------- score
def test_score_killed_then_rerun_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_dataset_dir, adapters):
    recipe, run = new_run(tmp_path, "b", tiny_model_dir, tiny_dataset_dir, adapters)
    assert moodguard(["evaluate", "--recipe", str(recipe), "--monitors", "guard+maha", "--n-boot", "20", "--no-plots",
                      "eval.max_length=24"]) == 0
    assert moodguard(["export", "--recipe", str(recipe), "--monitor", "guard+maha", "--out",
                      str(tmp_path / "bundle"), "eval.max_length=24"]) == 0
    inp = tiny_dataset_dir / "test.jsonl"
    ref, out = tmp_path / "ref" / "scores.jsonl", tmp_path / "out" / "scores.jsonl"
    assert moodguard(["score", "--monitor", str(tmp_path / "bundle"), str(inp), "--out", str(ref)]) == 0
    killed(["score", "--monitor", str(tmp_path / "bundle"), str(inp), "--out", str(out)], "1:before", tmp_path)
    assert visible(out.parent) == [] and hidden_leftovers(out.parent)  # a finished temporary, never renamed
    assert moodguard(["score", "--monitor", str(tmp_path / "bundle"), str(inp), "--out", str(out)]) == 0
    assert_same_outputs(ref.parent, out.parent)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ids_of(tiny_dataset_dir)  # each id once, input order
    assert sum(r["truncated"] for r in rows) > 0  # max_length 24 cuts some


# ----------------------------------------------------------------------------- sweep
def write_sweep(tmp: Path, name: str, model_dir: Path, data_dir: Path) -> Path:
    recipe = write_tiny_recipe(tmp / f"{name}.yaml", model_dir, data_dir, tmp / "unused",
                               guard__max_steps=2, lm__max_steps=2, eval__max_length=48, eval__batch_size=8)
    doc = {"name": name, "recipes": [{"path": str(recipe), "name": "tiny"}], "monitors": ["guard", "guard+maha"]}
    path = tmp / f"sweep-{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.slow
def test_sweep_killed_then_rerun_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_dataset_dir):
    ref_yaml = write_sweep(tmp_path, "s", tiny_model_dir, tiny_dataset_dir)
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    assert moodguard(["sweep", str(ref_yaml), "--out", str(ref_out)]) == 0
    killed(["sweep", str(ref_yaml), "--out", str(out)], "12", tmp_path)  # inside a stage after training
    state = json.loads((out / "state.json").read_text())
    assert any(v["status"] == "running" for v in state["stages"].values())
    assert moodguard(["sweep", str(ref_yaml), "--out", str(out)]) == 0
    state = json.loads((out / "state.json").read_text())
    assert all(v["status"] == "done" for v in state["stages"].values())
    # training in another process may differ in the last float bits, which changes the adapter
    # hash in the stats cache keys: stats/ and checkpoints/ are left out, renderings too, and
    # adapters / scores compare within 1e-4 (tests/test_train_distributed.py: adapters 1e-5)
    assert_same_outputs(ref_out, out, skip=("/stats/", "/checkpoints/", ".png", ".svg", ".html", "report.md"),
                        tol=1e-4)
    assert_each_id_once(out, ids_of(tiny_dataset_dir))
