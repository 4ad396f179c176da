"""Slurm job text for training (pure string builders; no Slurm needed to build or test them).

One place for what ``recipes/launch.slurm`` does by hand and what ``sweep --emit slurm`` writes
for its training stages:

- preemption / time limit: ``#SBATCH --requeue`` and ``--signal=B:USR1@<s>``; the batch shell
  traps USR1, creates ``$MOODGUARD_STOP_FILE``, training checkpoints at the next step and stops
  (``train.distributed``: exit 75), then the script requeues the job; every start passes
  ``--resume``, which continues from the newest complete checkpoint (or starts fresh).
  A preemption that kills the job outright (SIGTERM/SIGKILL, ``PreemptMode=REQUEUE``) is
  requeued by Slurm itself and resumes from the last ``save_steps`` checkpoint.
- several nodes (recipe key ``accelerate.num_machines``): one task per node, each running
  ``accelerate launch --num_machines N --machine_rank $SLURM_NODEID --main_process_ip <first
  node>`` with ``num_processes / num_machines`` GPUs per node (c10d rendezvous).
"""
from __future__ import annotations

import shlex
from typing import Sequence

SIGNAL_LEAD_S = 120  # USR1 this many seconds before the time limit: enough for one checkpoint
MAIN_PORT = 29500


def gpus_per_node(num_processes: int, num_machines: int) -> int:
    """Processes (= GPUs) on each node; the recipe check guarantees divisibility."""
    if num_machines < 1 or num_processes % num_machines:
        raise ValueError(f"num_processes {num_processes} is not a multiple of num_machines {num_machines}")
    return num_processes // num_machines


def sbatch_train_lines(num_machines: int, num_processes: int, signal_lead_s: int = SIGNAL_LEAD_S) -> list[str]:
    """``#SBATCH`` lines of a training job: nodes, one task per node, GPUs per node, requeue."""
    return [f"#SBATCH --nodes={num_machines}", "#SBATCH --ntasks-per-node=1",
            f"#SBATCH --gpus-per-node={gpus_per_node(num_processes, num_machines)}",
            "#SBATCH --requeue", f"#SBATCH --signal=B:USR1@{signal_lead_s}", "#SBATCH --open-mode=append"]


def accelerate_srun_command(config_file: str, module: str, argv: Sequence[str], num_machines: int,
                            num_processes: int, port: int = MAIN_PORT) -> str:
    """``srun`` running ``accelerate launch`` once per node; ``$SLURM_NODEID`` and ``$MAIN_IP``
    expand on each node (``MAIN_IP`` is exported by :func:`requeue_wrapped`)."""
    q = shlex.quote
    inner = " ".join([
        "python -m accelerate.commands.launch", "--config_file", q(config_file),
        "--num_machines", str(num_machines), '--machine_rank "$SLURM_NODEID"',
        "--num_processes", str(num_processes), '--main_process_ip "$MAIN_IP"',
        "--main_process_port", str(port), "--rdzv_backend c10d", "-m", q(module), *(q(a) for a in argv)])
    return f"srun --kill-on-bad-exit=1 bash -c {q(inner)}"


def requeue_wrapped(command: str, stop_dir: str = "${SLURM_SUBMIT_DIR:-$PWD}") -> list[str]:
    """Bash lines that run ``command`` (which must resume by itself) in the background, turn
    USR1 into a checkpoint-and-stop request, and requeue the job after such a stop. The script
    ends with the command's status otherwise (``set -e`` scripts: the final ``exit`` decides)."""
    return [
        'MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail',
        "export MAIN_IP",
        f'export MOODGUARD_STOP_FILE="{stop_dir}/.moodguard-stop-$SLURM_JOB_ID"',
        'rm -f "$MOODGUARD_STOP_FILE"',
        "on_usr1() { echo \"moodguard: time limit near: checkpoint, then requeue\"; touch \"$MOODGUARD_STOP_FILE\"; }",
        "trap on_usr1 USR1",
        f"{command} &",
        "CHILD=$!",
        "rc=0",
        "while true; do",
        '  wait "$CHILD" && rc=0 || rc=$?',
        '  kill -0 "$CHILD" 2>/dev/null || break  # wait returned for the trap, the step still runs',
        "done",
        'if [ -f "$MOODGUARD_STOP_FILE" ]; then',
        '  rm -f "$MOODGUARD_STOP_FILE"',
        '  echo "moodguard: requeueing job $SLURM_JOB_ID (resumes from the last checkpoint)"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'if [ "$rc" -ne 0 ]; then exit "$rc"; fi',
    ]
