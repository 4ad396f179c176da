"""Data-parallel fit / evaluate / score: N processes, one shard of the batches each.

``moodguard fit|evaluate|score --num-processes N`` re-executes itself under ``accelerate
launch`` (:func:`relaunch`, the launch helper training uses); plain ``accelerate launch -m
<cli> evaluate ...`` works the same. Every rank runs the same program:

* the length-sorted batches of each pass are the ones a single process builds; in round ``r``
  rank ``k`` runs batch ``r * N + k`` (:func:`run_batches`), the round's outputs are gathered on
  every rank and handed on in the original batch order, so each rank ends with exactly the
  single-process outputs (same batch composition, same padding) and runs the rest of the
  command (fitting, fusion, metrics) on them;
* only rank 0 writes: :mod:`mood_data.atomic` drops the other ranks' commits and every rank
  waits after each commit (:func:`start`), so what rank 0 wrote is what all ranks read next.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

LAUNCH_ENV = ("WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """This process is one rank of a multi-process launch (``accelerate launch``/torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    dist = _dist()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def start(device: str | None = None) -> None:
    """Join the launch's process group (through the device policy) and let only rank 0 write;
    a no-op in a single process. The rank dies with its launcher (``PR_SET_PDEATHSIG``)."""
    if not launched():
        return
    from mood_data import atomic
    from train.device import resolve_device
    from mood_data.children import die_with_launcher

    die_with_launcher()  # no rank outlives the launcher (or the command that started it)
    resolve_device(device)  # PartialState: gloo on CPU, NCCL on GPUs
    atomic.set_commit_policy(writer=is_main(), after_commit=barrier)


def finish(ok: bool = True) -> None:
    """Back to single-process writing; tear the process group down. After a failure there is
    no barrier (the other ranks may sit in another collective: it would deadlock); the launcher
    ends them when this rank exits non-zero."""
    from mood_data import atomic

    atomic.set_commit_policy()
    dist = _dist()
    if dist is not None and ok:
        dist.barrier()
        dist.destroy_process_group()


def run_batches(batches: Sequence[np.ndarray], compute: Callable[[np.ndarray], Any], *, desc: str = "",
                unit: str = "batch") -> Iterator[tuple[np.ndarray, Any]]:
    """``(batch index, compute(batch index))`` for every batch, in the given order, on every
    rank; with N ranks each computes one batch in N (round robin) and the rounds are gathered.
    ``compute`` must return CPU objects (they are pickled between ranks)."""
    from mood_data.console import progress

    rank, size = world()
    dist = _dist() if size > 1 else None
    rounds = range(0, len(batches), size)
    if rank == 0:  # a bar on a terminal, a plain line every 30 s in a log (one round = `size` batches)
        rounds = progress(rounds, desc=desc + (f" ({size} processes)" if size > 1 else ""),
                          unit=unit if size == 1 else f"x{size} {unit}")
    for start_ in rounds:
        group = batches[start_:start_ + size]
        mine = compute(group[rank]) if rank < len(group) else None
        if dist is None:
            results = [mine]
        else:
            results = [None] * size
            dist.all_gather_object(results, mine)
        for index, res in zip(group, results):
            yield index, res


# ----------------------------------------------------------------------------- --num-processes
def strip_num_processes(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--num-processes N`` / ``--num-processes=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def launch_config(device: str | None) -> str:
    """``cpu`` (gloo ranks) without CUDA or with ``--device cpu``, else ``ddp`` (one GPU a rank)."""
    from train.device import on_cpu

    return "cpu" if (device or "").lower() == "cpu" or on_cpu() else "ddp"


def relaunch(cli_module: str, argv: Sequence[str], num_processes: int, device: str | None) -> int:
    """Re-execute ``python -m cli_module argv`` (without ``--num-processes``) as
    ``num_processes`` ranks under ``accelerate launch``; returns its exit status."""
    from mood_data.errors import RecipeError
    from train.launch import relaunch as launch

    if num_processes < 1:
        raise RecipeError(f"--num-processes {num_processes}: expected a positive number")
    return launch(launch_config(device), cli_module, strip_num_processes(argv), num_processes)


def wants_relaunch(num_processes: int | None) -> bool:
    return bool(num_processes and num_processes > 1 and not launched())


def main_print(*args, **kwargs) -> None:
    """``print`` on rank 0 only (every rank runs the same command)."""
    if is_main():
        print(*args, **kwargs)
        (kwargs.get("file") or sys.stdout).flush()


__all__ = ["barrier", "finish", "is_main", "launch_config", "launched", "main_print", "relaunch", "run_batches",
           "start", "strip_num_processes", "wants_relaunch", "world"]
