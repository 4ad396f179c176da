"""Atomic writes: every output file is written to a temporary sibling and renamed into place.

A killed process therefore leaves either the old file or the new one, never half of one.
This module is the one place that writes files for moodguard.

Test hook (inert by default): with ``MOODGUARD_TEST_KILL_AFTER=N`` the process SIGKILLs itself
right after its N-th atomic commit (a file rename or a folder swap); ``N:before`` kills it once
the N-th temporary is complete but before its rename. ``tests/test_interrupts.py`` uses it to
kill fit / evaluate / score / sweep at a deterministic point and check that a rerun resumes;
``N:term`` / ``N:int`` send SIGTERM / SIGINT instead at the ``before`` point (temporaries must
then be removed).

Files and folders are created with the process umask (0644 / 0755 by default), not the 0600 /
0700 of ``tempfile``, and every finished temporary (a whole ``atomic_dir`` tree included) is
given those modes before its rename, whatever wrote it (safetensors writes 0600): a bundle
written by one account can be read by the service scoring with it. JSON writers refuse NaN / inf (``allow_nan=False``): the error names the file and the key.
An ``OSError`` when creating the temporary or renaming it into place (disk full, read-only
folder, ...) becomes a one-line :class:`~mood_data.errors.OutputError` naming the file; the
temporary is removed first. Any other OSError propagates (the CLI prints it on one line).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import OutputError


KILL_ENV = "MOODGUARD_TEST_KILL_AFTER"
_commits = 0

# Data-parallel runs (eval.engine.parallel): every rank runs the same program, only the writer renames
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
    if _commits == int(n) and (when in ("before", "term", "int")) == before:
        import signal

        sig = {"term": signal.SIGTERM, "int": signal.SIGINT}.get(when, signal.SIGKILL)
        os.kill(os.getpid(), sig)


def umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def io_error(path: str | os.PathLike, exc: OSError, action: str = "cannot write") -> OutputError:
    """One line for an ``OSError`` on ``path``: ``<path>: cannot write (No space left on device, ENOSPC)``."""
    code = errno.errorcode.get(exc.errno or 0, "")
    text = " ".join(str(exc).split())
    why = exc.strerror or (text[:200] if text else type(exc).__name__)
    return OutputError(f"{path}: {action} ({why}{', ' + code if code else ''})")


def _mkdir_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise io_error(path.parent, exc, "cannot create the folder") from None
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: not a folder")


def _tmp_sibling(path: Path) -> Path:
    _mkdir_parent(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~umask())
    except OSError as exc:
        raise io_error(path, exc) from None
    return Path(tmp)


def _umask_mode(path: Path, st: os.stat_result | None = None) -> None:
    """Give a finished temporary (file) the mode a plain ``open`` would: ``0666 & ~umask``
    (``0777`` for an executable or a folder). Writers such as safetensors create their files
    0600, which a bundle then carried along to the service that must read it."""
    st = st or os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return
    full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else 0o666
    if st.st_mode & 0o777 != full & ~umask():
        os.chmod(path, full & ~umask())


def _umask_tree(folder: Path) -> None:
    """:func:`_umask_mode` for ``folder`` and everything under it (links never followed)."""
    _umask_mode(folder)
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            _umask_mode(Path(root) / name)


def _commit(tmp: Path, path: Path) -> None:
    """Move a finished temporary onto its final name (the one rename of every output)."""
    os.replace(tmp, path)


def _commit_or_fail(tmp: Path, path: Path) -> None:
    """:func:`_commit`, an ``OSError`` (disk full, ...) becoming a one-line OutputError naming
    ``path``. An OSError raised while the temporary is written propagates as it is (the CLI
    prints it as one line naming its own file), so a read error elsewhere is never called a
    failed write of ``path``."""
    try:
        _commit(tmp, path)
    except OSError as exc:
        raise io_error(path, exc) from None


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's: its entries) data to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed onto ``path``, on error removed.
    ``durable``: the temporary and its folder are fsynced before the rename and the folder again
    after it, so a power cut leaves the old file or the complete new one, never an empty file
    under the final name."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder (expected a file path)")
    tmp = _tmp_sibling(path)
    private = _private(path)
    try:
        yield tmp
        _umask_mode(tmp)  # the writer may have replaced the temporary with a 0600 file
        if durable and (_writer or private):
            fsync_path(tmp)
            fsync_path(path.parent)
        _test_kill_hook(before=True)
        if _writer or private:
            _commit_or_fail(tmp, path)
            if durable:
                fsync_path(path.parent)
        else:
            tmp.unlink()
        _test_kill_hook(before=False)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _committed(private)


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, *, durable: bool = False) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def non_finite(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first NaN / inf float in ``obj`` (None if every number is finite)."""
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (prefix or "(value)")
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = non_finite(v, f"{prefix}.{k}" if prefix else str(k))
            if hit:
                return hit
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            hit = non_finite(v, f"{prefix}[{i}]")
            if hit:
                return hit
    else:
        try:
            import numpy as np

            if isinstance(obj, np.ndarray) and obj.dtype.kind == "f" and not np.isfinite(obj).all():
                return f"{prefix}[{int(np.flatnonzero(~np.isfinite(obj.ravel()))[0])}]"
            if isinstance(obj, np.floating) and not np.isfinite(obj):
                return prefix or "(value)"
        except ImportError:  # pragma: no cover
            pass
    return None


def dumps(obj: Any, path: str | os.PathLike, *, row: int | None = None, **kwargs) -> str:
    """``json.dumps`` that refuses NaN / inf with a one-line error naming ``path`` (and row) and the key."""
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default, **kwargs)
    except ValueError:
        key = non_finite(obj) or "?"
        at = f"{path}: row {row}" if row is not None else f"{path}"
        raise OutputError(f"{at}: field '{key}': not a finite number (NaN/inf is never written to JSON)") from None


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, durable: bool = False) -> Path:
    return write_text(path, dumps(obj, path, indent=indent, sort_keys=False) + "\n", durable=durable)


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for i, row in enumerate(rows, 1):
            fh.write(dumps(row, path, row=i, ensure_ascii=False) + "\n")
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, dispose: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Build a whole folder in a temporary sibling, then swap it into place.

    An existing folder at ``path`` is replaced only once the new one is complete. The old one
    is then removed, or handed to ``dispose`` (moved into a private temporary folder first, which
    is removed afterwards only if ``dispose`` emptied it): ``export`` deletes only a bundle's own
    files that way.
    """
    path = Path(path)
    _mkdir_parent(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~umask())
    except OSError as exc:
        raise io_error(path, exc) from None
    private = _private(path)
    try:
        _open_dirs.append(tmp)
        try:
            yield tmp
        finally:
            _open_dirs.remove(tmp)
        _umask_tree(tmp)  # files written into it by libraries (safetensors: 0600) included
        _test_kill_hook(before=True)
        if not (_writer or private):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(path):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            _commit_or_fail(tmp, path)
            if dispose is None:
                shutil.rmtree(old, ignore_errors=True)
            else:
                dispose(old / "x")
                with contextlib.suppress(OSError):
                    old.rmdir()
        else:
            _commit_or_fail(tmp, path)
        _test_kill_hook(before=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _committed(private)


@contextlib.contextmanager
def remove_temporaries_on_signal(command: str = "moodguard") -> Iterator[None]:
    """While inside, SIGTERM (like Ctrl-C / SIGINT already does) unwinds the stack as
    ``SystemExit(143)``: every ``atomic_path`` / ``atomic_dir`` removes its temporary on the way
    out, so a terminated run leaves no hidden ``.X.*.tmp``. Main thread only (else inert)."""
    import signal
    import sys
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):  # noqa: ARG001
        print(f"{command}: terminated", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
