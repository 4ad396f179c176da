"""Processes moodguard starts never outlive it: a launcher (``accelerate launch``) or a seed
member dies with the command that started it, and the ranks a launcher starts die with the
launcher (Linux ``PR_SET_PDEATHSIG``, SIGKILL). Meanwhile the command's output locks are
shared with them (:func:`mood_data.runlock.shared_with_children`), so an output stays locked
while any of them still runs. Before this, a SIGKILLed ``score --num-processes 2`` left both
ranks scoring and writing for ~30 s after its lock was gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Sequence

PARENT_ENV = "MOODGUARD_LAUNCHED_BY"  # pid of the moodguard process that started a launcher / member
PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's ``prctl`` on Linux (None elsewhere), looked up before any fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


def die_with_parent(sig: int = signal.SIGKILL, prctl=None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux
    ``PR_SET_PDEATHSIG``; a no-op elsewhere)."""
    prctl = prctl or _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _ancestors(n: int = 3) -> list[int]:
    """This process's parent, grandparent, ... (``/proc``; as many as can be read)."""
    out, pid = [], os.getpid()
    for _ in range(n):
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        out.append(pid)
    return out


def die_with_launcher() -> None:
    """In a launched rank or a seed member: die (SIGKILL) with the process that started it, and
    exit now if the moodguard process behind the launch (``MOODGUARD_LAUNCHED_BY``) is already
    gone, so no rank keeps writing after the command that owns the output was killed."""
    die_with_parent()
    want = os.environ.get(PARENT_ENV)
    if want and sys.platform.startswith("linux") and int(want) not in _ancestors():
        os.kill(os.getpid(), signal.SIGKILL)


def start_child(cmd: Sequence[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` of a launcher or member that dies with this process: the kernel
    SIGKILLs it when this process dies (even by SIGKILL), and the ranks it starts die with it
    (:func:`die_with_launcher`)."""
    parent, prctl = os.getpid(), _prctl()

    def preexec() -> None:  # in the child, before exec
        die_with_parent(signal.SIGKILL, prctl)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGKILL)

    return subprocess.Popen(list(cmd), env={**env, PARENT_ENV: str(parent)},
                            preexec_fn=preexec if prctl is not None else None, **kwargs)


def run_child(cmd: Sequence[str], env: dict[str, str], **kwargs) -> int:
    """:func:`start_child` and wait (``subprocess.call`` semantics: killed if we are interrupted),
    sharing this process's output locks with it meanwhile (``runlock.shared_with_children``)."""
    from mood_data.runlock import shared_with_children

    with shared_with_children(), start_child(cmd, env, **kwargs) as proc:
        try:
            return proc.wait()
        except BaseException:
            proc.kill()
            raise


__all__ = ["PARENT_ENV", "die_with_launcher", "die_with_parent", "run_child", "start_child"]
