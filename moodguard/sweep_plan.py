"""The plan of a sweep: per run the stages train-guard -> train-lm (-> train-judge) -> fit ->
evaluate, each keyed by a hash of its resolved recipe, its monitors and its upstream keys; and
``<sweep>/state.json``, the finished stage keys (written atomically)."""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mood_data import atomic
from mood_data.errors import RecipeError
from mood_data.readers import read_json

from .sweep_file import Sweep

STAGES: tuple[str, ...] = ("train-guard", "train-lm", "fit", "evaluate")
# train-judge (judge SFT LoRA) is planned only for recipes with judge.enabled: true
ALL_STAGES: tuple[str, ...] = ("train-guard", "train-lm", "train-judge", "fit", "evaluate")
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Stage:
    """One unit of work: ``<run>/<stage>`` with its hash key and the files it produces."""

    run: str
    stage: str
    key: str
    recipe_path: Path
    overrides: tuple[str, ...]
    run_dir: Path
    deps: tuple[str, ...]  # stage ids it needs (``run/stage``)
    monitors: tuple[str, ...]
    accelerate_config: str | None = None
    num_processes: int = 1
    num_machines: int = 1

    @property
    def id(self) -> str:
        return f"{self.run}/{self.stage}"

    def outputs(self) -> list[Path]:
        """The folders this stage writes; removed before an interrupted stage restarts."""
        d = self.run_dir
        if self.stage == "train-guard":
            return [d / "guard", *sorted(d.glob("guard-seed*"))]
        if self.stage == "train-lm":
            return [d / "lm", *sorted(d.glob("lm-seed*"))]
        if self.stage == "train-judge":
            return [d / "judge", *sorted(d.glob("judge-seed*"))]
        if self.stage == "fit":
            return [d / "stats"]
        return [d / "eval" / m for m in self.monitors]


def stage_key(stage: str, recipe: Mapping[str, Any], upstream: Iterable[str], monitors: Iterable[str] = ()) -> str:
    """Hash of everything a stage's output depends on (output_dir excluded so sweeps can move)."""
    resolved = {k: v for k, v in recipe.items() if k not in ("output_dir", "report_to")}
    blob = json.dumps({"stage": stage, "recipe": resolved, "upstream": sorted(upstream),
                       "monitors": list(monitors)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_recipe(path: Path, overrides: Iterable[str]):
    """A run's recipe, checked whole (monitor names included)."""
    from .cli_common import load_checked_recipe

    return load_checked_recipe(path, list(overrides))


def plan_sweep(sweep: Sweep, out_dir: str | os.PathLike, load: Callable = load_recipe) -> list[Stage]:
    """All stages in execution order (per run: train-guard, train-lm, fit, evaluate)."""
    out_dir = Path(out_dir).resolve()
    stages: list[Stage] = []
    seen: set[str] = set()
    for entry in sweep.entries:
        overrides = list(sweep.overrides) + list(entry.overrides)
        if entry.seed is not None:
            overrides += [f"guard.seeds=[{entry.seed}]", f"lm.seeds=[{entry.seed}]"]
        base = load(entry.recipe, overrides)
        run = entry.name or base.name
        if entry.seed is not None:
            run = f"{run}-seed{entry.seed}"
        if run in seen:
            raise RecipeError(f"{sweep.path}: run name '{run}' appears twice; give the recipes distinct 'name's")
        seen.add(run)
        run_dir = out_dir / run
        overrides += [f"output_dir={run_dir}", f"eval.monitors={json.dumps(list(sweep.monitors))}"]
        recipe = load(entry.recipe, overrides)
        rd = recipe.identity()
        acc = rd.get("accelerate") or {}
        keys: dict[str, str] = {}
        wanted = [s for s in ALL_STAGES if not (s == "train-guard" and not rd.get("guard", {}).get("enabled", True))
                  and not (s == "train-judge" and not rd.get("judge", {}).get("enabled", False))
                  and not (s == "train-lm" and not rd.get("lm", {}).get("enabled", True))]
        for name in wanted:
            deps = {"train-guard": [], "train-lm": [], "train-judge": [], "fit": ["train-guard", "train-lm"],
                    "evaluate": ["fit", "train-judge"]}[name]
            deps = [d for d in deps if d in keys]
            monitors = sweep.monitors if name in ("fit", "evaluate") else ()
            keys[name] = stage_key(name, rd, [keys[d] for d in deps], monitors)
            stages.append(Stage(run, name, keys[name], entry.recipe, tuple(overrides), run_dir,
                                tuple(f"{run}/{d}" for d in deps), tuple(sweep.monitors),
                                acc.get("config"), int(acc.get("num_processes") or 1),
                                int(acc.get("num_machines") or 1)))
    return stages


def select(stages: list[Stage], only: str | None = None, runs: Iterable[str] | None = None) -> list[Stage]:
    if only is not None and only not in ALL_STAGES:
        raise RecipeError(f"--only {only!r}: expected one of {', '.join(ALL_STAGES)}")
    runs = set(runs or ())
    known = {s.run for s in stages}
    for r in runs - known:
        raise RecipeError(f"--run {r!r}: not a run of this sweep (runs: {', '.join(sorted(known))})")
    return [s for s in stages if (only is None or s.stage == only) and (not runs or s.run in runs)]


def read_state(out_dir: Path) -> dict:
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return {"stages": {}}
    try:
        state = read_json(path, RecipeError)  # bounded: a deeply nested file is one line too
    except RecipeError as exc:
        raise RecipeError(f"{exc}; delete it to restart the sweep from scratch") from None
    state.setdefault("stages", {})
    return state


def is_done(state: dict, stage: Stage) -> bool:
    rec = state["stages"].get(stage.id) or {}
    return rec.get("status") == "done" and rec.get("key") == stage.key


def mark(out_dir: Path, state: dict, stage: Stage, status: str, **extra) -> None:
    state["stages"][stage.id] = {"key": stage.key, "status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    atomic.write_json(Path(out_dir) / STATE_FILE, state)


def stage_table(out_dir: Path) -> tuple[list[str], list[list]]:
    """state.json as a table (for wandb and the report)."""
    state = read_state(out_dir)
    cols = ["stage", "key", "status", "seconds"]
    return cols, [[k, v.get("key"), v.get("status"), v.get("seconds")] for k, v in state["stages"].items()]


__all__ = ["ALL_STAGES", "STAGES", "STATE_FILE", "Stage", "is_done", "load_recipe", "mark", "plan_sweep", "read_state",
           "select", "stage_key", "stage_table"]
