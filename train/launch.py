"""Launching a training job: in this process, re-executed under ``accelerate launch
--config_file accelerate_configs/<name>.yaml``, or as parallel seed-member processes.
The training loop itself is :mod:`train.loop`; the parser of both ``moodguard train`` and
``python -m train.<kind>`` is :mod:`train.entry`.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import yaml

from mood_data.children import run_child
from mood_data.errors import RecipeError

from .loop import adapter_dirname, end_distributed
from .recipe_files import REPO_ROOT, accelerate_config_path
from .recipe_schema import Recipe

CPU_CONFIGS = ("cpu",)


# ---------------------------------------------------------------------------------------------
# re-exec under accelerate launch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolved_config_file(name: str) -> Path:
    """The accelerate config with relative file paths (DeepSpeed json) made absolute, so that
    launching works from any working directory."""
    path = accelerate_config_path(name)
    if not path.is_file():
        raise RecipeError(f"accelerate config {name!r}: {path} not found")
    cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    ds = cfg.get("deepspeed_config") or {}
    rel = ds.get("deepspeed_config_file")
    if not rel or Path(rel).is_absolute():
        return path
    ds["deepspeed_config_file"] = str((REPO_ROOT / rel).resolve())
    fd, tmp = tempfile.mkstemp(prefix=f"accelerate-{name}-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return Path(tmp)


def launch_command(config: str, module: str, argv: Sequence[str], num_processes: int | None = None,
                   port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """``accelerate launch`` argv + environment for running ``python -m module argv``."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolved_config_file(config))]
    if num_processes is not None:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["--main_process_port", str(port or free_port()), "-m", module, *argv]
    env = dict(os.environ)
    if config in CPU_CONFIGS:
        env["ACCELERATE_USE_CPU"] = "1"  # MULTI_GPU + static rendezvous + this = real gloo ranks
    return cmd, env


CPU_RANKS_PER_CORE = 4  # gloo ranks beyond this many a core only slow every rank down


def check_ranks(config: str, num_processes: int | None, num_machines: int = 1, *, what: str = "--num-processes",
                gpus: Sequence[str] | None = None, n_cpus: int | None = None) -> None:
    """The ranks this machine is asked to start fit it: one GPU a rank when GPUs are visible
    (and the config is not a CPU one), else at most :data:`CPU_RANKS_PER_CORE` a core (gloo
    ranks; DeepSpeed configs run that way on a CPU-only machine). Each rank holds its own copy
    of the model: a million ranks would exhaust memory long before any work."""
    from mood_data.errors import RecipeError

    if num_processes is None:
        return
    here = -(-num_processes // max(num_machines, 1))
    gpus = visible_gpus() if gpus is None and config not in CPU_CONFIGS else gpus or []
    if config in CPU_CONFIGS or not gpus:
        limit, unit = CPU_RANKS_PER_CORE * (n_cpus if n_cpus is not None else os.cpu_count() or 1), "CPU ranks"
    else:
        limit, unit = len(gpus), "GPUs (one a rank)"
    if here > limit:
        raise RecipeError(f"{what} {num_processes}: {here} ranks on this machine, but it has room for {limit} "
                          f"{unit}")


def relaunch(config: str, module: str, argv: Sequence[str], num_processes: int | None = None,
             num_machines: int = 1) -> int:
    check_ranks(config, num_processes, num_machines)
    cmd, env = launch_command(config, module, argv, num_processes)
    print("moodguard: " + " ".join(cmd), file=sys.stderr)
    return run_child(cmd, env)


# ---------------------------------------------------------------------------------------------
# seed members in parallel


def member_slots(parallel: int, n_members: int, procs_per_member: int, gpus: Sequence[str],
                 n_cpus: int) -> list[dict[str, str]]:
    """Environment additions of each concurrent member slot (pure).

    With GPUs, every slot gets ``procs_per_member`` of them (``CUDA_VISIBLE_DEVICES``) and the
    number of slots shrinks to what the GPUs allow; on CPU every slot gets an equal share of
    the cores as its thread count."""
    k = max(1, min(parallel, n_members))
    per = max(1, procs_per_member)
    if gpus:
        k = max(1, min(k, len(gpus) // per))
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])} for i in range(k)]
    threads = str(max(1, n_cpus // (k * per)))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(k)]


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [g.strip() for g in env.split(",") if g.strip()] if env else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


def member_command(kind: str, recipe: Recipe, argv: Sequence[str], seed: int) -> tuple[list[str], dict[str, str]]:
    """The command that trains one seed member: ``python -m train.<kind> ... --member S``, under
    ``accelerate launch`` when the recipe names an accelerate config."""
    args = [*argv, "--member", str(seed)]
    if recipe.accelerate.config is not None:
        return launch_command(recipe.accelerate.config, f"train.{kind}", args, recipe.accelerate.num_processes)
    return [sys.executable, "-m", f"train.{kind}", *args], dict(os.environ)


def train_members_parallel(kind: str, recipe: Recipe, recipe_path: str | os.PathLike, overrides: Sequence[str],
                           resume: bool = False) -> list[Path]:
    """Train the seed members of ``recipe.<kind>`` ``parallel_members`` at a time, one process
    (or one ``accelerate launch``) each; logs go to ``<output_dir>/logs/<kind>-seed<S>.log``.
    The folders are the ones sequential training writes (``<kind>-seed<S>``)."""
    import threading

    from tqdm.auto import tqdm

    sec = recipe.section(kind)
    seeds = list(sec.seeds)
    procs = recipe.accelerate.num_processes if recipe.accelerate.config else 1
    slots = member_slots(sec.parallel_members, len(seeds), procs, visible_gpus(), os.cpu_count() or 1)
    out_root = Path(recipe.output_dir)
    logs = out_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    argv = ["--recipe", str(recipe_path), *relaunch_flags(recipe, resume), *overrides]
    queue, failed, lock = list(seeds), [], threading.Lock()
    bar = tqdm(total=len(seeds), desc=f"{kind} members ({len(slots)} at a time)", unit="member", disable=None)

    def worker(extra_env: dict[str, str]) -> None:
        while True:
            with lock:
                if not queue:
                    return
                seed = queue.pop(0)
            cmd, env = member_command(kind, recipe, argv, seed)
            log = logs / f"{kind}-seed{seed}.log"
            with open(log, "w", encoding="utf-8") as fh:
                rc = run_child(cmd, {**env, **extra_env}, stdout=fh, stderr=subprocess.STDOUT)
            with lock:
                bar.update(1)
                if rc != 0:
                    failed.append((seed, rc, log))

    threads = [threading.Thread(target=worker, args=(env,), daemon=True) for env in slots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    if failed:
        seed, rc, log = failed[0]
        tail = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"{kind} member seed {seed} exited with {rc} (log: {log}){': ' + tail[0] if tail else ''}")
    return adapter_folders(recipe, kind)


def relaunch_flags(recipe: Recipe, resume: bool) -> list[str]:
    """The flags a re-executed training process needs to do what this one was asked to."""
    return [*(["--resume"] if resume else []), *(["--trust-remote-code"] if recipe.trust_remote_code else [])]


def trains_in_parallel(recipe: Recipe, kind: str) -> bool:
    sec = recipe.section(kind)
    return sec.parallel_members > 1 and len(sec.seeds) > 1


def adapter_folders(recipe: Recipe, kind: str) -> list[Path]:
    """The final adapter folders training ``kind`` writes (one per seed)."""
    seeds = recipe.section(kind).seeds
    return [Path(recipe.output_dir) / adapter_dirname(kind, seeds, s) for s in seeds]


def train_in_process(kind: str, recipe: Recipe, resume: bool = False, only_seeds: Sequence[int] | None = None) -> Path:
    """``train.guard`` / ``train.lm`` / ``train.judge`` in this process; the first adapter folder."""
    if kind == "guard":
        from .guard import train_guard as train_fn
    elif kind == "judge":
        from .judge import train_judge as train_fn
    else:
        from .lm import train_lm as train_fn
    return train_fn(recipe, resume, only_seeds)


def run_training(kind: str, recipe: Recipe, recipe_path: str | os.PathLike, overrides: Sequence[str],
                 resume: bool = False) -> int:
    """Train ``kind`` the way the recipe asks (what ``moodguard train`` and sweep stages run):
    seed members in parallel processes (``<kind>.parallel_members > 1``), else re-executed under
    ``accelerate launch`` (``accelerate.config``), else in this process. Returns the exit status.
    The output_dir is locked meanwhile (launched ranks and parallel members inherit the lock)."""
    from mood_data.runlock import output_lock

    with output_lock(recipe.output_dir, "output_dir"):
        if trains_in_parallel(recipe, kind):
            train_members_parallel(kind, recipe, recipe_path, overrides, resume)
            return 0
        if recipe.accelerate.config is not None:
            argv = ["--recipe", str(recipe_path), *relaunch_flags(recipe, resume), *overrides]
            return relaunch(recipe.accelerate.config, f"train.{kind}", argv, recipe.accelerate.num_processes,
                            recipe.accelerate.num_machines)
        from .distributed import EXIT_STOPPED, TrainingStopped

        ok = False
        try:
            train_in_process(kind, recipe, resume)
            ok = True
        except TrainingStopped as stop:
            ok = True
            print(f"moodguard train {kind}: {stop}", file=sys.stderr)
            return EXIT_STOPPED
        finally:
            end_distributed(ok)
        return 0
