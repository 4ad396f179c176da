"""Scaling sweeps: run train-guard -> train-lm -> fit -> evaluate for a list of recipes.

Every stage is keyed by a hash of its resolved recipe, its monitors and its upstream stage
keys. ``<sweep>/state.json`` records finished stage keys (written atomically); a finished
stage is skipped, an interrupted one (marked ``running`` or ``failed``, never ``done``) has
its partial output removed and restarts. The same plan can be emitted as slurm job scripts
chained with ``afterok`` dependencies, or as a list of shell commands. See docs/sweeps.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


from mood_data import atomic
from mood_data.errors import RecipeError
from mood_data.readers import read_json, read_yaml
from train.detector_table import parse_monitors
from train.recipe_schema import EvalSection

STAGES: tuple[str, ...] = ("train-guard", "train-lm", "fit", "evaluate")
# train-judge (judge SFT LoRA) is planned only for recipes with judge.enabled: true
ALL_STAGES: tuple[str, ...] = ("train-guard", "train-lm", "train-judge", "fit", "evaluate")
DEFAULT_MONITORS: tuple[str, ...] = tuple(EvalSection().monitors)  # the recipe default, one place
STATE_FILE = "state.json"
_SWEEP_KEYS = {"base", "name", "recipes", "monitors", "overrides", "chart", "slurm", "wandb", "description"}
_ENTRY_KEYS = {"path", "name", "overrides", "seeds"}


# --------------------------------------------------------------------------- sweep file
@dataclass(frozen=True)
class SweepEntry:
    """One run of the sweep: a recipe file, its overrides (``k=v``) and an optional seed."""

    recipe: Path
    overrides: tuple[str, ...] = ()
    name: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    entries: tuple[SweepEntry, ...]
    monitors: tuple[str, ...] = DEFAULT_MONITORS
    overrides: tuple[str, ...] = ()
    chart_fpr: float = 0.01
    slurm: Mapping[str, Any] = field(default_factory=dict)
    wandb: bool = False


def _override_strings(value: Any, where: str) -> tuple[str, ...]:
    """A mapping ``{dotted.key: value}`` or a list of ``"k=v"`` strings -> ``("k=v", ...)``."""
    if value is None:
        return ()
    if isinstance(value, list):
        if not all(isinstance(v, str) and "=" in v for v in value):
            raise RecipeError(f"{where}: expected a list of 'key=value' strings or a mapping")
        return tuple(value)
    if isinstance(value, dict):
        return tuple(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())
    raise RecipeError(f"{where}: expected a mapping of dotted keys to values, got {type(value).__name__}")


def resolve_recipe_path(text: str, sweep_file: Path) -> Path:
    """Absolute paths as given; relative ones against the cwd, then the repo root, then the sweep file."""
    from train.recipe_files import REPO_ROOT

    p = Path(text)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), REPO_ROOT, sweep_file.parent):
        if (base / p).is_file():
            return (base / p).resolve()
    return (REPO_ROOT / p).resolve()


def _sweep_doc(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The sweep mapping with its ``base:`` chain applied: a sweep inherits every key of its
    base (a path relative to itself) except ``name``; its own keys replace the base's, and
    ``overrides`` are concatenated (base first, so the sweep's own win)."""
    doc = read_yaml(path, RecipeError, what="sweep file")
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: expected a mapping with keys {sorted(_SWEEP_KEYS)}")
    for key in doc:
        if key not in _SWEEP_KEYS:
            raise RecipeError(f"{path}: key '{key}': unknown key (allowed: {', '.join(sorted(_SWEEP_KEYS))})")
    base = doc.pop("base", None)
    if base is None:
        return doc
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{path}: key 'base': expected a path to another sweep file")
    bpath = path.parent / base
    if not bpath.is_file():
        raise RecipeError(f"{path}: key 'base': base file not found: {base}")
    if bpath.resolve() in seen + (path.resolve(),):
        raise RecipeError(f"{path}: key 'base': inheritance cycle through {base}")
    parent = _sweep_doc(bpath, seen + (path.resolve(),))
    parent.pop("name", None)
    merged = {**parent, **doc}
    if "overrides" in parent and "overrides" in doc:
        merged["overrides"] = list(_override_strings(parent["overrides"], f"{bpath}: key 'overrides'")
                                   + _override_strings(doc["overrides"], f"{path}: key 'overrides'"))
    # recipe paths in the base stay relative to the base file
    if "recipes" in parent and "recipes" not in doc:
        merged["recipes"] = [_rebase_entry(item, bpath) for item in parent["recipes"]]
    return merged


def _rebase_entry(item: Any, base_file: Path) -> Any:
    """A base sweep's recipe entry with its path resolved against the base file."""
    if isinstance(item, str):
        return str(resolve_recipe_path(item, base_file))
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return {**item, "path": str(resolve_recipe_path(item["path"], base_file))}
    return item


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep YAML (format in docs/sweeps.md); one-line RecipeErrors."""
    path = Path(path)
    doc = _sweep_doc(path)
    recipes = doc.get("recipes")
    if not isinstance(recipes, list) or not recipes:
        raise RecipeError(f"{path}: key 'recipes': expected a non-empty list")
    entries = []
    for i, item in enumerate(recipes):
        where = f"{path}: key 'recipes[{i}]'"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise RecipeError(f"{where}: expected a recipe path or a mapping with 'path'")
        for key in item:
            if key not in _ENTRY_KEYS:
                raise RecipeError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
        recipe = resolve_recipe_path(item["path"], path)
        overrides = _override_strings(item.get("overrides"), f"{where}.overrides")
        seeds = item.get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds):
            raise RecipeError(f"{where}.seeds: expected a non-empty list of integers")
        for seed in seeds or [None]:
            entries.append(SweepEntry(recipe, overrides, item.get("name"), seed))
    monitors = doc.get("monitors", list(DEFAULT_MONITORS))
    if not isinstance(monitors, list) or not monitors or not all(isinstance(m, str) and m for m in monitors):
        raise RecipeError(f"{path}: key 'monitors': expected a non-empty list of monitor names")
    try:
        monitors = parse_monitors(monitors)  # the detector table's one parser
    except RecipeError as err:
        raise RecipeError(f"{path}: key 'monitors': {err}") from None
    chart = doc.get("chart") or {}
    fpr = chart.get("fpr", 0.01) if isinstance(chart, dict) else None
    if not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise RecipeError(f"{path}: key 'chart.fpr': expected a number in (0, 1)")
    slurm = doc.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise RecipeError(f"{path}: key 'slurm': expected a mapping of sbatch options")
    return Sweep(
        name=str(doc.get("name") or path.stem), path=path.resolve(), entries=tuple(entries),
        monitors=tuple(monitors), overrides=_override_strings(doc.get("overrides"), f"{path}: key 'overrides'"),
        chart_fpr=float(fpr), slurm=slurm, wandb=bool(doc.get("wandb", False)),
    )


# --------------------------------------------------------------------------- the plan
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


def _load_recipe(path: Path, overrides: Iterable[str]):
    from train.recipe import load_recipe

    return load_recipe(path, list(overrides))


def plan_sweep(sweep: Sweep, out_dir: str | os.PathLike, load: Callable = _load_recipe) -> list[Stage]:
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
        rd = recipe.to_dict()
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


# --------------------------------------------------------------------------- state
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


def _mark(out_dir: Path, state: dict, stage: Stage, status: str, **extra) -> None:
    state["stages"][stage.id] = {"key": stage.key, "status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    atomic.write_json(Path(out_dir) / STATE_FILE, state)


# --------------------------------------------------------------------------- commands
def _py_module(stage: str) -> str:
    return {"train-guard": "train.guard", "train-lm": "train.lm", "train-judge": "train.judge"}[stage]


def stage_command(stage: Stage) -> list[str]:
    """The command line that runs one stage outside this process (slurm / shell emission)."""
    ov = list(stage.overrides)
    if stage.stage in ("train-guard", "train-lm", "train-judge"):
        # --resume: a rerun (requeued job, rerun sweep) continues its own checkpoints (none: step 0)
        tail = ["-m", _py_module(stage.stage), "--recipe", str(stage.recipe_path), "--resume", *ov]
        if stage.accelerate_config:
            return ["accelerate", "launch", "--config_file", f"accelerate_configs/{stage.accelerate_config}.yaml",
                    "--num_processes", str(stage.num_processes), *tail]
        return ["python", *tail]
    return ["moodguard", stage.stage, "--recipe", str(stage.recipe_path), *ov]


def _sweep_command(sweep: Sweep, out_dir: Path, *extra: str) -> list[str]:
    return ["moodguard", "sweep", str(sweep.path), "--out", str(out_dir), *extra]


def _q(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def emit_shell(sweep: Sweep, stages: list[Stage], out_dir: Path) -> str:
    """The commands, in order, that run the sweep by hand (then chart + report)."""
    out_dir = Path(out_dir).resolve()
    lines = ["#!/usr/bin/env bash", f"# sweep {sweep.name}: {len(stages)} stages", "set -euo pipefail"]
    for s in stages:
        lines.append(f"# {s.id} (key {s.key})")
        lines.append(_q(stage_command(s)))
        lines.append(_q(_sweep_command(sweep, out_dir, "--only", s.stage, "--run", s.run, "--mark-done")))
    lines.append(_q(["moodguard", "chart", str(out_dir), "--fpr", str(sweep.chart_fpr)]))
    lines.append(_q(["moodguard", "report", str(out_dir)]))
    return "\n".join(lines) + "\n"


def _jid(stage_id: str) -> str:
    return "JID_" + re.sub(r"[^A-Za-z0-9_]", "_", stage_id)


def _sbatch_header(job: str, log_dir: Path, gpus: int, options: Mapping[str, Any],
                   train: Stage | None = None) -> list[str]:
    """``#SBATCH`` lines; a training stage with an accelerate config gets its nodes, GPUs per
    node and requeue-on-preemption lines from ``train.slurm``."""
    from train.slurm import sbatch_train_lines

    lines = ["#!/bin/bash", f"#SBATCH --job-name={job}", f"#SBATCH --output={log_dir}/%x-%j.out"]
    if train is not None:
        lines += sbatch_train_lines(train.num_machines, train.num_processes)
    else:
        lines += ["#SBATCH --nodes=1", "#SBATCH --ntasks=1"]
        if gpus:
            lines.append(f"#SBATCH --gpus-per-node={gpus}")
    for k, v in options.items():
        lines.append(f"#SBATCH --{k}={v}")
    return lines


def _launched_train(stage: Stage) -> bool:
    return stage.stage.startswith("train") and bool(stage.accelerate_config)


def _train_job_lines(stage: Stage) -> list[str]:
    """A training stage under Slurm: ``accelerate launch`` on every node through srun, with
    ``--resume`` and the USR1 checkpoint-and-requeue wrapper (``train.slurm``)."""
    from train.slurm import accelerate_srun_command, requeue_wrapped

    argv = ["--recipe", str(stage.recipe_path), "--resume", *stage.overrides]
    srun = accelerate_srun_command(f"accelerate_configs/{stage.accelerate_config}.yaml", _py_module(stage.stage),
                                   argv, stage.num_machines, stage.num_processes)
    return requeue_wrapped(srun)


def emit_slurm(sweep: Sweep, stages: list[Stage], out_dir: Path, workdir: Path | None = None) -> Path:
    """Write ``<sweep>/slurm/NN-<run>-<stage>.sbatch`` + ``submit.sh``; returns submit.sh."""
    from train.recipe_files import REPO_ROOT

    out_dir = Path(out_dir).resolve()
    slurm_dir = out_dir / "slurm"
    log_dir = slurm_dir / "logs"
    workdir = Path(workdir or REPO_ROOT)
    options = {k: v for k, v in sweep.slurm.items() if k != "gpus"}
    gpus_default = int(sweep.slurm.get("gpus", 1))
    submit = ["#!/bin/bash", f"# submit sweep {sweep.name}: {len(stages)} stage jobs + chart/report",
              "set -euo pipefail", 'cd "$(dirname "$0")"', f"mkdir -p {shlex.quote(str(log_dir))}"]
    for i, s in enumerate(stages):
        fname = f"{i:02d}-{s.run}-{s.stage}.sbatch"
        launched = _launched_train(s)
        body = _sbatch_header(f"{sweep.name}-{s.run}-{s.stage}", log_dir, gpus_default, options,
                              train=s if launched else None) + [
            "set -euo pipefail", f"cd {shlex.quote(str(workdir))}",
            f"# stage key {s.key}", *(_train_job_lines(s) if launched else [_q(stage_command(s))]),
            _q(_sweep_command(sweep, out_dir, "--only", s.stage, "--run", s.run, "--mark-done")), ""]
        atomic.write_text(slurm_dir / fname, "\n".join(body))
        dep = ":".join(f"${_jid(d)}" for d in s.deps)
        flag = f" --dependency=afterok:{dep}" if dep else ""
        submit.append(f"{_jid(s.id)}=$(sbatch --parsable{flag} {shlex.quote(fname)})")
    finals = [s for s in stages if s.stage == "evaluate"] or stages
    final = _sbatch_header(f"{sweep.name}-chart-report", log_dir, 0, options) + [
        "set -euo pipefail", f"cd {shlex.quote(str(workdir))}",
        _q(["moodguard", "chart", str(out_dir), "--fpr", str(sweep.chart_fpr)]),
        _q(["moodguard", "report", str(out_dir)]), ""]
    atomic.write_text(slurm_dir / "99-chart-report.sbatch", "\n".join(final))
    submit.append(f"JID_chart=$(sbatch --parsable --dependency=afterok:{':'.join('$' + _jid(s.id) for s in finals)} "
                  "99-chart-report.sbatch)")
    submit.append('echo "submitted; chart/report job $JID_chart"')
    path = atomic.write_text(slurm_dir / "submit.sh", "\n".join(submit) + "\n")
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- running
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
    from eval.monitor import fit_detectors

    fit_detectors(recipe)


def _run_evaluate(stage: Stage, recipe, monitors) -> None:
    from eval.monitor import evaluate_recipe

    evaluate_recipe(recipe, monitors=list(monitors))


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


def select(stages: list[Stage], only: str | None = None, runs: Iterable[str] | None = None) -> list[Stage]:
    if only is not None and only not in ALL_STAGES:
        raise RecipeError(f"--only {only!r}: expected one of {', '.join(ALL_STAGES)}")
    runs = set(runs or ())
    known = {s.run for s in stages}
    for r in runs - known:
        raise RecipeError(f"--run {r!r}: not a run of this sweep (runs: {', '.join(sorted(known))})")
    return [s for s in stages if (only is None or s.stage == only) and (not runs or s.run in runs)]


def prepare_out_dir(sweep: Sweep, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    copy = out_dir / "sweep.yaml"
    if copy.resolve() != sweep.path:
        atomic.write_text(copy, sweep.path.read_text(encoding="utf-8"))


def run_stages(stages: list[Stage], out_dir: str | os.PathLike, load: Callable = _load_recipe,
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
            _mark(out_dir, state, s, "done", marked=True)
            result.ran.append(s.id)
            continue
        prev = state["stages"].get(s.id)
        for path in s.outputs():
            if path.exists():  # partial output of an interrupted run, or of an older key
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        progress(f"[{i}/{len(stages)}] {s.id}: {'restarting' if prev else 'running'} (key {s.key})")
        _mark(out_dir, state, s, "running")
        t0 = time.perf_counter()
        key = (str(s.recipe_path), tuple(s.overrides))
        if key not in recipes:  # a run's stages share one recipe: loaded and validated once
            recipes[key] = load(s.recipe_path, s.overrides)
        recipe = recipes[key]
        try:
            STAGE_FUNCTIONS[s.stage](s, recipe, s.monitors)
        except BaseException as exc:
            _mark(out_dir, state, s, "failed", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        secs = time.perf_counter() - t0
        _mark(out_dir, state, s, "done", seconds=round(secs, 3))
        progress(f"[{i}/{len(stages)}] {s.id}: done in {secs:.1f}s")
        result.ran.append(s.id)
        result.seconds[s.id] = secs
    return result


def stage_table(out_dir: Path) -> tuple[list[str], list[list]]:
    """state.json as a table (for wandb and the report)."""
    state = read_state(out_dir)
    cols = ["stage", "key", "status", "seconds"]
    return cols, [[k, v.get("key"), v.get("status"), v.get("seconds")] for k, v in state["stages"].items()]


def finish(sweep: Sweep, out_dir: Path, wandb: bool = False, fpr: float | None = None) -> dict[str, Path]:
    """Chart + report (+ wandb) after the stages."""
    from eval.report import write_report
    from eval.scaling import log_chart_to_wandb, log_to_wandb, make_chart

    chart = make_chart(out_dir, fpr=fpr or sweep.chart_fpr)
    if chart.match is not None:
        print(chart.match.sentence())
    report = write_report(out_dir, fpr=fpr or sweep.chart_fpr)
    if wandb:
        log_chart_to_wandb(chart, f"{sweep.name}-chart")
        log_to_wandb(f"{sweep.name}-stages", {"stages": stage_table(out_dir)}, {})
    return {**{f"chart.{k}": v for k, v in chart.files.items()}, **report}
