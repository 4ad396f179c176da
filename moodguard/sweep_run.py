"""Running a sweep: each stage in order, skipped when ``state.json`` says its key is done; an
interrupted stage (``running`` / ``failed``) has its partial output removed and restarts. Then
the chart and the report. See docs/sweeps.md."""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mood_data import atomic

from .sweep_file import Sweep
from .sweep_plan import Stage, is_done, load_recipe, mark, read_state, stage_table


def _run_train(stage: Stage, recipe, monitors) -> None:
    """The stage's adapter, trained as `moodguard train` would (parallel members, accelerate
    launch, or in this process)."""
    from train.launch import run_training

    # resume=True: a stage rerun after a kill continues its checkpoints (train/checkpoints.py
    # refuses them if the recipe changed); without checkpoints it starts at step 0
    rc = run_training(stage.stage.removeprefix("train-"), recipe, stage.recipe_path, stage.overrides, resume=True)
    if rc != 0:
        raise RuntimeError(f"{stage.id}: training exited with {rc}")


def _run_fit(stage: Stage, recipe, monitors) -> None:
    from eval.run.context import resolve
    from eval.run.fitting import run_fit

    run_fit(resolve(recipe))


def _run_evaluate(stage: Stage, recipe, monitors) -> None:
    from eval.run.context import resolve
    from eval.run.evaluate import run_evaluate

    run_evaluate(resolve(recipe, list(monitors)))


# stage name -> function(stage, recipe, monitors); tests monkeypatch these
STAGE_FUNCTIONS: dict[str, Callable] = {
    "train-guard": _run_train, "train-lm": _run_train, "train-judge": _run_train, "fit": _run_fit,
    "evaluate": _run_evaluate,
}


@dataclass
class SweepResult:
    out_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def prepare_out_dir(sweep: Sweep, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / "sweep.yaml"
    if copy.resolve() != sweep.path:
        atomic.write_text(copy, sweep.path.read_text(encoding="utf-8"))


def run_stages(stages: list[Stage], out_dir: str | os.PathLike, load: Callable = load_recipe,
               mark_only: bool = False, progress: Callable[[str], None] = print) -> SweepResult:
    """Run (or skip) each stage in order; state.json is updated atomically around each one."""
    out_dir = Path(out_dir).resolve()
    state = read_state(out_dir)
    result = SweepResult(out_dir)
    recipes: dict[tuple, Any] = {}
    for i, s in enumerate(stages, 1):
        if is_done(state, s):
            result.skipped.append(s.id)
            progress(f"[{i}/{len(stages)}] {s.id}: done (key {s.key}), skipped")
            continue
        if mark_only:
            mark(out_dir, state, s, "done", marked=True)
            result.ran.append(s.id)
            continue
        prev = state["stages"].get(s.id)
        for path in s.outputs():
            if path.exists():  # partial output of an interrupted run, or of an older key
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        progress(f"[{i}/{len(stages)}] {s.id}: {'restarting' if prev else 'running'} (key {s.key})")
        mark(out_dir, state, s, "running")
        t0 = time.perf_counter()
        key = (str(s.recipe_path), tuple(s.overrides))
        if key not in recipes:  # a run's stages share one recipe: loaded and validated once
            recipes[key] = load(s.recipe_path, s.overrides)
        recipe = recipes[key]
        try:
            STAGE_FUNCTIONS[s.stage](s, recipe, s.monitors)
        except BaseException as exc:
            mark(out_dir, state, s, "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        secs = time.perf_counter() - t0
        mark(out_dir, state, s, "done", seconds=round(secs, 3))
        progress(f"[{i}/{len(stages)}] {s.id}: done in {secs:.1f}s")
        result.ran.append(s.id)
        result.seconds[s.id] = secs
    return result



def finish(sweep: Sweep, out_dir: Path, wandb: bool = False, fpr: float | None = None) -> dict[str, Path]:
    """Chart + report (+ wandb) after the stages."""
    from eval.report.report import write_report
    from eval.report.scaling import log_chart_to_wandb, log_to_wandb, make_chart

    from eval.report.cost import make_cost_chart

    chart = make_chart(out_dir, fpr=fpr or sweep.chart_fpr)
    if chart.match is not None:
        print(chart.match.sentence())
    cost = make_cost_chart(out_dir, fpr=fpr or sweep.chart_fpr, out_dir=chart.files["png"].parent, required=False)
    report = write_report(out_dir, fpr=fpr or sweep.chart_fpr)
    if wandb:
        log_chart_to_wandb(chart, f"{sweep.name}-chart")
        log_to_wandb(f"{sweep.name}-stages", {"stages": stage_table(out_dir)}, {})
    return {**{f"chart.{k}": v for k, v in chart.files.items()},
            **{f"cost.{k}": v for k, v in (cost.files.items() if cost else ())}, **report}


__all__ = ["STAGE_FUNCTIONS", "SweepResult", "finish", "prepare_out_dir", "run_stages"]
