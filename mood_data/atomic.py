"""Atomic writes: every output file is written to a temporary sibling and renamed into place.

A killed process therefore leaves either the old file or the new one, never half of one.
This module is the one place that writes files for moodguard.

Test hook (inert by default): with ``MOODGUARD_TEST_KILL_AFTER=N`` the process SIGKILLs itself
right after its N-th atomic commit (a file rename or a folder swap); ``N:before`` kills it once
the N-th temporary is complete but before its rename. ``tests/test_interrupts.py`` uses it to
kill fit / evaluate / score / sweep at a deterministic point and check that a rerun resumes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


KILL_ENV = "MOODGUARD_TEST_KILL_AFTER"
_commits = 0

# Data-parallel runs (eval.parallel): every rank runs the same program, only the writer renames
# its temporaries into place, and every rank waits after each commit so that what rank 0 wrote
# is what every rank reads next. Single-process default: write, no wait.
_writer = True
_after_commit: Callable[[], None] | None = None
_open_dirs: list[Path] = []  # temporaries of atomic_dir blocks being built (private to this process)


def set_commit_policy(writer: bool = True, after_commit: Callable[[], None] | None = None) -> None:
    """``writer=False``: commits of this process are dropped (its temporary is removed);
    ``after_commit`` runs after every commit, dropped or not (a barrier across ranks)."""
    global _writer, _after_commit
    _writer, _after_commit = bool(writer), after_commit


def _private(path: Path) -> bool:
    """Inside a temporary folder this process is building: written normally, never shared."""
    return any(path.is_relative_to(d) for d in _open_dirs)


def _committed(private: bool) -> None:
    if _after_commit is not None and not private:
        _after_commit()


def _test_kill_hook(before: bool) -> None:
    """Count commits; SIGKILL this process at the point ``MOODGUARD_TEST_KILL_AFTER`` names."""
    global _commits
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    n, _, when = spec.partition(":")
    if before:
        _commits += 1
    if _commits == int(n) and (when == "before") == before:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _tmp_sibling(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed onto ``path``, on error removed."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    private = _private(path)
    try:
        yield tmp
        _test_kill_hook(before=True)
        if _writer or private:
            os.replace(tmp, path)
        else:
            tmp.unlink()
        _test_kill_hook(before=False)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _committed(private)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole folder in a temporary sibling, then swap it into place.

    An existing folder at ``path`` is replaced only once the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    private = _private(path)
    try:
        _open_dirs.append(tmp)
        try:
            yield tmp
        finally:
            _open_dirs.remove(tmp)
        _test_kill_hook(before=True)
        if not (_writer or private):
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _test_kill_hook(before=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _committed(private)


def _json_default(obj: Any):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
