"""Slurm job text without Slurm: recipes/launch.slurm and `sweep --emit slurm` training jobs
parse (bash -n), ask for the recipe's nodes, launch accelerate once per node with the machine
rank and main address from the Slurm environment, and on USR1 (time limit near) request a
checkpoint, wait for the step, requeue the job and skip the stage's --mark-done. The USR1 path
runs for real below with stub srun/scontrol/moodguard commands on PATH."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moodguard import sweep_emit, sweep_file, sweep_plan
from mood_data.errors import RecipeError
from train import slurm
from train.recipe import load_recipe
from train.recipe_files import RECIPES_DIR, REPO_ROOT

MULTI_NODE = f"""
name: mn
recipes:
  - path: {RECIPES_DIR}/tiny/s.yaml
    overrides: {{accelerate.config: zero3, accelerate.num_processes: 16, accelerate.num_machines: 2,
                guard.global_batch_size: 128, lm.global_batch_size: 128, judge.global_batch_size: 128}}
monitors: [guard]
"""


def emitted(tmp_path) -> dict[str, str]:
    (tmp_path / "sweep.yaml").write_text(MULTI_NODE)
    sweep, out = sweep_file.load_sweep(tmp_path / "sweep.yaml"), tmp_path / "out"
    submit = sweep_emit.emit_slurm(sweep, sweep_plan.plan_sweep(sweep, out), out)
    files = {p.name: p.read_text() for p in submit.parent.glob("*.sbatch")}
    for p in [submit, *submit.parent.glob("*.sbatch")]:
        subprocess.run(["bash", "-n", str(p)], check=True)
    return files


def test_sweep_emits_multi_node_training_jobs(tmp_path):
    files = emitted(tmp_path)
    guard = files["00-tiny-s-train-guard.sbatch"]
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120"):
        assert line in guard.splitlines(), line
    srun = next(ln for ln in guard.splitlines() if ln.startswith("srun "))
    for flag in ("--config_file accelerate_configs/zero3.yaml", "--num_machines 2", '--machine_rank "$SLURM_NODEID"',
                 "--num_processes 16", '--main_process_ip "$MAIN_IP"', "--main_process_port 29500",
                 "--rdzv_backend c10d", "-m train.guard", "--resume", "accelerate.num_machines=2"):
        assert flag in srun, flag
    assert 'MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in guard  # head: SIGPIPE + pipefail
    # fit / evaluate stay single-node jobs without the requeue wrapper
    fit = files["02-tiny-s-fit.sbatch"]
    assert "#SBATCH --nodes=1" in fit and "--requeue" not in fit and "srun" not in fit


def test_num_machines_validated(tmp_path):
    r = RECIPES_DIR / "tiny" / "s.yaml"
    ok = ["accelerate.config=ddp", "accelerate.num_processes=2", "accelerate.num_machines=2"]
    assert load_recipe(r, ok).accelerate.num_machines == 2
    with pytest.raises(RecipeError, match=r"key 'accelerate.num_machines': accelerate.num_processes 3 is not a multiple"):
        load_recipe(r, ["accelerate.config=ddp", "accelerate.num_processes=3", "accelerate.num_machines=2",
                        "guard.per_device_batch_size=1", "lm.per_device_batch_size=1", "guard.global_batch_size=3",
                        "lm.global_batch_size=3"])
    with pytest.raises(RecipeError, match=r"key 'accelerate.num_machines': a multi-node job needs accelerate.config"):
        load_recipe(r, ["accelerate.num_processes=2", "accelerate.num_machines=2"])
    with pytest.raises(RecipeError, match=r"key 'accelerate.num_machines': must be >= 1"):
        load_recipe(r, ["accelerate.num_machines=0"])


def test_launch_slurm_text():
    text = (REPO_ROOT / "recipes" / "launch.slurm").read_text()
    subprocess.run(["bash", "-n", str(REPO_ROOT / "recipes" / "launch.slurm")], check=True)
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "trap on_usr1 USR1"):
        assert line in text.splitlines(), line
    for flag in ("--num_machines ${SLURM_NNODES}", "--machine_rank \\${SLURM_NODEID}", "--main_process_ip ${MAIN_IP}",
                 "--resume", "accelerate.num_machines=${SLURM_NNODES}"):
        assert flag in text, flag
    # the trap / wait / requeue lines are the ones train.slurm writes for sweeps (one behaviour)
    shared = [ln.strip() for ln in slurm.requeue_wrapped("CMD") if "CMD" not in ln and "MAIN_IP" not in ln]
    body = [ln.strip() for ln in text.splitlines()]
    for ln in shared:
        assert ln in body, ln


STUBS = {
    # srun: record the command, then behave like a training step that checkpoints and stops
    # (exit 75) once the stop file appears, or finishes (exit 0) after ~20 s
    "srun": '#!/bin/bash\necho "$*" > "$STUB_LOG/srun"\nfor i in $(seq 200); do\n'
            '  if [ -f "$MOODGUARD_STOP_FILE" ]; then echo stopped > "$STUB_LOG/step"; exit 75; fi\n'
            '  sleep 0.1\ndone\nexit 0\n',
    "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo node-a; echo node-b; else echo "$*" >> "$STUB_LOG/scontrol"; fi\n',
    "moodguard": '#!/bin/bash\nif [ "$1" = sweep ]; then echo "$*" >> "$STUB_LOG/mark"; exit 0; fi\n'
                 'echo "accelerate: {config: zero3}"\n',
}


def run_with_usr1(tmp_path, script: Path, *args: str) -> Path:
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STUB_LOG=str(log),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="node-[a-b]", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="8",
               SLURM_SUBMIT_DIR=str(tmp_path))
    proc = subprocess.Popen(["bash", str(script), *args], env=env, cwd=REPO_ROOT)
    try:
        deadline = time.time() + 30
        while not (log / "srun").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (log / "step").read_text().strip() == "stopped"  # the step saw the stop request
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / ".moodguard-stop-4242").exists()
    return log


def test_launch_slurm_usr1_checkpoints_and_requeues(tmp_path):
    log = run_with_usr1(tmp_path, REPO_ROOT / "recipes" / "launch.slurm", "recipes/tiny/s.yaml", "guard", "guard.max_steps=9")
    cmd = (log / "srun").read_text()
    assert "--main_process_ip node-a" in cmd and "--num_processes 16" in cmd and "guard.max_steps=9" in cmd


def test_emitted_sweep_job_usr1_requeues_without_marking_done(tmp_path):
    emitted(tmp_path)
    job = tmp_path / "out" / "slurm" / "00-tiny-s-train-guard.sbatch"
    log = run_with_usr1(tmp_path, job)
    assert "--num_machines 2" in (log / "srun").read_text()
    assert not (log / "mark").exists()  # a requeued stage is not done
