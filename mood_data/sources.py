"""Where a data source points: the ``train.*`` / ``test.*`` files of a folder, whether a source has
a local test split, and the early check that a local path exists (a mistyped file is reported
as such, never retried as a hub id)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import DataError
from .records import SPLITS, SUFFIXES


def split_files(folder: str | Path, splits: Sequence[str] = SPLITS) -> dict[str, Path]:
    """The ``train.*`` / ``test.*`` file of each split in ``folder`` (exactly one each)."""
    folder = Path(folder)
    out = {}
    for split in splits:
        names = {f"{split}{suffix}" for suffix in SUFFIXES}
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() in names)
        if not found:
            raise DataError(f"{folder}: no {split} file (expected one of {', '.join(sorted(names))})")
        if len(found) > 1:
            raise DataError(f"{folder}: several {split} files ({', '.join(p.name for p in found)}); keep one")
        out[split] = found[0]
    return out


def has_local_test_split(source: str | os.PathLike | None) -> bool:
    """True when ``source`` is the embedded benchmark or a local folder with one ``test.*`` file."""
    from .embedded import benchmark_dir

    folder = benchmark_dir() if source is None or str(source) == "embedded" else Path(source)
    if not folder.is_dir():
        return False
    names = {f"test{suffix}" for suffix in SUFFIXES}
    return sum(1 for p in folder.iterdir() if p.is_file() and p.name.lower() in names) == 1


def _near_local(source: str) -> list[str]:
    """Entries of the local folder ``source`` points into whose names are close to its last
    component (a mistyped folder: ``my-data/mood-tset`` next to ``my-data/mood-test``)."""
    import difflib

    path = Path(source).expanduser()
    parent = path.parent
    try:
        names = [p.name for p in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return []
    return [str(parent / n) if str(parent) != "." else n
            for n in difflib.get_close_matches(path.name, names, n=3, cutoff=0.8)]


def looks_like_local(source: str) -> bool:
    """A missing path the user surely meant as a local file or folder, not a hub id: absolute,
    ``.``/``~``, a data-file suffix, more than one ``/`` or a ``\\``, or a path that exists in part
    (its folder exists here, or a local entry has a close name)."""
    if os.path.isabs(source) or source.startswith((".", "~")):
        return True
    if any(source.lower().endswith(s) for s in SUFFIXES):
        return True
    if source.count("/") > 1 or "\\" in source:  # hub ids are "owner/name"
        return True
    parent = Path(source).expanduser().parent
    return (str(parent) != "." and parent.is_dir()) or bool(_near_local(source))


def not_found(source: str) -> str:
    near = _near_local(source)
    return f"{source}: file not found" + (f" (no such local file or folder; did you mean {', '.join(near)}?)"
                                          if near else "")


def check_source(source: str | os.PathLike | None) -> None:
    """A one-line DataError at once when ``source`` names a local path that does not exist:
    called before any model or adapter is looked at (a mistyped data file is reported as such,
    not as a missing adapter), and never retried as a hub id."""
    if source is None or str(source) == "embedded" or Path(source).exists():
        return
    if looks_like_local(str(source)):
        raise DataError(not_found(str(source)))


__all__ = ["check_source", "has_local_test_split", "looks_like_local", "not_found", "split_files"]
