"""One writer per output folder: an advisory lock held while a process writes to it.

``with output_lock(folder):`` takes an exclusive ``flock`` on the sibling file
``<parent>/.<folder name>.moodguard.lock`` (beside the folder, not in it, so a command that
fails early leaves the folder itself untouched) and writes the holder's pid into it. A second
writer gets a one-line :class:`~mood_data.errors.OutputError` naming the holder's pid. The
holder removes the file when it is done. The kernel drops a ``flock`` when its process dies, so
the file a crashed or killed run leaves is stale by construction and simply taken over (the pid
in it is rewritten).

The lock file is never followed: it is created with ``O_EXCL`` and reopened with ``O_NOFOLLOW``,
and a symlink, a hard link (a file with more than one link) or a non-regular file in its place
is refused with one line naming it (a planted ``.X.moodguard.lock -> ~/precious`` would
otherwise get its target truncated and overwritten with the pid).

The lock is re-entrant within a process, and processes we start (``accelerate launch`` ranks,
parallel seed members) inherit the holder's permission through ``MOODGUARD_LOCKS_HELD`` (the
paths held by an ancestor) instead of deadlocking on their parent's lock. The holder shares its
lock while it starts them (:func:`shared_with_children`) and each of them joins it (a shared
``flock`` of the same file), so the lock is held by the processes that write: killing the
holder (or the launcher) does not let a second writer in while a rank still runs.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator

from .errors import OutputError

ENV = "MOODGUARD_LOCKS_HELD"
_held: dict[str, tuple[int, int]] = {}  # folder -> (fd, depth)


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.moodguard.lock"


def _inherited() -> set[str]:
    return {p for p in os.environ.get(ENV, "").split(os.pathsep) if p}


def prepare_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` (parents too) or raise ONE line saying why it cannot be a folder:
    a file in the way, a read-only place such as ``/proc``, no permission, disk full."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {what} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "no write permission")
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0, "")
        raise OutputError(f"{folder}: {what} cannot be written ({exc.strerror or type(exc).__name__}"
                          f"{', ' + code if code else ''})") from None
    return folder


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Hold the write lock of ``folder`` (created if missing) for the ``with`` block; a folder
    this call created and nothing was written to is removed again (a failed run leaves none)."""
    missing = []  # the folders this call creates, leaf first
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder = prepare_folder(folder, what).resolve()
    try:
        with _locked(folder):
            yield folder
    finally:
        for p in missing:
            try:
                p.rmdir()  # only succeeds while empty
            except OSError:
                break


@contextlib.contextmanager
def output_file_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of the output FILE ``path`` (its folder must exist or be creatable)."""
    path = Path(path)
    prepare_folder(path.parent, "folder of the output file")
    path = path.parent.resolve() / path.name
    with _locked(path):
        yield path


def _open_lock_file(path: Path) -> int:
    """Open (creating it if needed) the lock file ``path`` WITHOUT following a symlink: a new file
    is created with ``O_EXCL`` (a dangling link is never followed to create its target), an
    existing one is opened with ``O_NOFOLLOW`` and must be a regular file with one link (a
    planted symlink or hard link would get its target truncated and overwritten with our pid)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(5):  # created / removed by another process between the two opens
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            pass
        except OSError as exc:
            raise OutputError(f"{path}: cannot create the lock file ({exc.strerror or type(exc).__name__})") from None
        try:
            fd = os.open(path, flags)
            break
        except FileNotFoundError:
            continue
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise OutputError(f"{path}: the lock file is a symlink (refused: a lock is never followed; remove "
                                  "it if no moodguard run of yours made it)") from None
            raise OutputError(f"{path}: cannot open the lock file ({exc.strerror or type(exc).__name__})") from None
    else:  # pragma: no cover - five lost races in a row
        raise OutputError(f"{path}: could not open the lock file")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "a hard link to another file" if stat.S_ISREG(st.st_mode) else "not a regular file"
        raise OutputError(f"{path}: the lock file is {what} (refused: it would be overwritten; remove it if no "
                          "moodguard run of yours made it)")
    return fd


def _join(target: Path) -> int | None:
    """In a process started by the holder of ``target``'s lock (``MOODGUARD_LOCKS_HELD``): take
    a SHARED lock on the same file, so that the lock stays held while this process runs, even if
    the holder is killed (a contender's exclusive lock fails while any share is held). None when
    the holder did not share it (:func:`shared_with_children`): then its lock alone counts."""
    import fcntl

    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    st = os.fstat(fd)
    try:
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise BlockingIOError
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(path, fd):
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def shared_with_children() -> Iterator[None]:
    """Around starting the processes that write for this one (``accelerate launch`` ranks,
    parallel seed members): every lock held here becomes a SHARED lock that those processes
    join (:func:`_join`), so an output stays locked as long as any of them runs, the one that
    writes included, even after this process is SIGKILLed. A contender's exclusive lock fails
    while any share is held. (The kernel converts a flock by dropping and re-taking it: should a
    contender win that instant, this process stops with a one-line error instead.)"""
    import fcntl

    for key, (fd, _) in list(_held.items()):
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"{key}: taken by another moodguard process while this one handed its lock to the "
                              "processes it starts; run again") from None
        if not _same_file(lock_path(Path(key)), fd):
            raise OutputError(f"{key}: the lock file was replaced while this process held it; run again")
    yield


def _same_file(path: Path, fd: int) -> bool:
    """``path`` (not followed) is still the file open as ``fd``."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    import fcntl

    key = str(target)
    if key in _inherited():  # a process an ancestor started to write for it (a launched rank, a member)
        fd = _join(target)
        try:
            yield
        finally:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        return
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    path = lock_path(target)
    for _ in range(5):  # the file may be unlinked by its releasing holder between open and flock
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{target}: in use by another moodguard process (pid {holder}); wait for it to "
                              f"finish or choose another output") from None
        if _same_file(path, fd):
            break
        os.close(fd)
    else:  # pragma: no cover - five lost races in a row
        raise OutputError(f"{target}: could not take the lock file {path}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    _held[key] = (fd, 1)
    previous = os.environ.get(ENV)
    os.environ[ENV] = os.pathsep.join(sorted(_inherited() | {key}))
    try:
        yield
    finally:
        del _held[key]
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        if _same_file(path, fd):  # never a file (or link) put in its place meanwhile
            with contextlib.suppress(OSError):
                os.unlink(path)  # while still locked: a contender re-checks the inode after its flock
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


__all__ = ["ENV", "lock_path", "output_file_lock", "output_lock", "prepare_folder", "shared_with_children"]
