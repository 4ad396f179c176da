"""A sweep's plan as commands: the shell script that runs it by hand, or Slurm job scripts chained
with ``afterok`` dependencies (training stages under ``accelerate launch`` on every node with
the checkpoint-and-requeue wrapper of :mod:`train.slurm`)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Mapping

from mood_data import atomic

from .sweep_file import Sweep
from .sweep_plan import Stage


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


__all__ = ["emit_shell", "emit_slurm", "stage_command"]
