"""What a bundle must prove before anything in it is used (``eval.run.bundle.Monitor.load``).

A bundle is passed between teams, so every byte of it is untrusted until checked:

* no pickle-format file (``.bin``, ``.pt``, ``.pkl``, ...) may be in the folder at all;
* the manifest covers EVERY file: a file on disk that it does not list, a listed file that is
  missing, an empty ``files`` map, a path leaving the folder, a symlink or any non-regular file
  is refused, and each file's sha256 must match;
* every value of ``monitor.json`` and ``thresholds.json`` is type- and range-checked
  (``settings.max_length > 0``, ``batch_size >= 1``, thresholds finite numbers, ...);
* ``trust_remote_code`` must be a JSON boolean; a bundle asking for ``true`` is refused unless
  the person scoring passed ``--trust-remote-code``;
* every adapter's ``adapter_model.safetensors`` has a readable safetensors header and its
  ``adapter_config.json`` is a JSON object (a corrupt or empty file is one line, not a traceback).

Every problem is a one-line :class:`~mood_data.errors.BundleError` naming the file and field.
The check and the use read the same bytes: :func:`staged_bundle` hashes each file while copying
it into a private folder, and only that copy is loaded or uploaded.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mood_data.errors import BundleError, MoodguardError
from mood_data.readers import read_json, short_repr
from train.recipe_checks import MAX_BATCH, MAX_TOKENS  # the same bounds as a recipe's

from ..engine.checks import check_bool, check_int, check_name, check_number, check_str, fail

FORMAT = 1  # of the bundle layout and its manifest
MANIFEST = "manifest.json"
# formats that unpickle (or usually do) when loaded: a bundle never holds one, listed or not
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
DTYPES = ("bfloat16", "float16", "float32", "auto")
POOLINGS = ("last", "mean")


def files_on_disk(folder: Path) -> set[str]:
    """Every entry under ``folder`` except the manifest; symlinks and non-regular files refused."""
    out = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            p = Path(root) / name
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                raise BundleError(f"{p}: a symlink inside the bundle (refused: files must be the bundle's own)")
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise BundleError(f"{p}: not a regular file (refused)")
            if p.name.lower().endswith(PICKLE_SUFFIXES):
                raise BundleError(f"{p}: pickle-format file in a bundle (refused: bundles hold safetensors, "
                                  "JSON and YAML only)")
            rel = p.relative_to(folder).as_posix()
            if rel != MANIFEST:
                out.add(rel)
    return out


def check_manifest_coverage(folder: Path, files: Any, mpath: Path) -> None:
    """The manifest's ``files`` map lists exactly the files of the bundle."""
    if not isinstance(files, dict) or not files:
        raise BundleError(f"{mpath}: field 'files': empty or not a mapping (the manifest must list every file)")
    for rel, digest in files.items():
        parts = Path(rel).parts
        if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in parts or not parts:
            raise BundleError(f"{mpath}: field 'files': path {short_repr(rel)} leaves the bundle folder")
        if not (isinstance(digest, str) and len(digest) == 64):
            raise BundleError(f"{mpath}: field 'files.{rel}': expected a sha256 hex digest, got {short_repr(digest)}")
    on_disk = files_on_disk(folder)
    unlisted = sorted(on_disk - set(files))
    if unlisted:
        raise BundleError(f"{folder / unlisted[0]}: file not listed in {MANIFEST} (refused: every bundle file "
                          f"must be covered; {len(unlisted)} unlisted)")


# ----------------------------------------------------------------------------- verified copy
def _open_beneath(folder: Path, rel: str) -> int:
    """A read-only fd of ``folder/rel`` opened WITHOUT following a symlink at any component
    below ``folder`` (``O_NOFOLLOW`` on each, relative to its parent's fd) and never blocking
    (a FIFO swapped in would hang a plain open); one-line BundleError otherwise."""
    parts = Path(rel).parts
    p = folder / rel
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            os.close(dfd)
            dfd = nfd
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise BundleError(f"{p}: file listed in {MANIFEST} is missing") from None
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{p}: a symlink inside the bundle (refused: files must be the bundle's own)") from None
        raise BundleError(f"{p}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(dfd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"{p}: not a regular file (refused)")
    return fd


def _hash_copy(folder: Path, rel: str, copy_to: Path | None) -> str:
    """sha256 of ``folder/rel`` read ONCE through a no-follow fd; with ``copy_to`` the same bytes
    are written to ``copy_to/rel`` (0600, in the caller's private folder) as they are hashed."""
    h = hashlib.sha256()
    fd = _open_beneath(folder, rel)
    out = None
    try:
        if copy_to is not None:
            dst = copy_to / rel
            dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        while block := os.read(fd, 1 << 20):
            h.update(block)
            if out is not None:
                os.write(out, block)  # a regular file: a short write raises, never truncates silently
    finally:
        os.close(fd)
        if out is not None:
            os.close(out)
    return h.hexdigest()


def verify_manifest(folder: Path, copy_to: Path | None = None) -> dict:
    """Check every listed file exists with its sha256; returns the manifest.

    With ``copy_to`` (an empty private folder, see :func:`staged_bundle`) every file, the
    manifest first, is copied there in the same single read that hashes it: load from the copy
    and what is used is exactly what was verified (a file swapped by rename or symlink after
    the check never reaches the loader)."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found")
    if not os.path.lexists(mpath):
        raise BundleError(f"{mpath}: file not found (not a monitor bundle?)")
    if copy_to is None:
        doc = read_json(mpath, BundleError)
    else:
        _hash_copy(folder, MANIFEST, copy_to)
        try:
            doc = read_json(copy_to / MANIFEST, BundleError)  # the bytes just copied, not the file again
        except BundleError as exc:
            raise BundleError(str(exc).replace(str(copy_to / MANIFEST), str(mpath))) from None
    files = doc.get("files")
    if doc.get("format") != FORMAT or not isinstance(files, dict):
        raise BundleError(f"{mpath}: field 'format'/'files': not a format-{FORMAT} manifest")
    check_manifest_coverage(folder, files, mpath)  # every file listed, nothing unlisted, no symlink
    for rel, digest in files.items():
        p = folder / rel
        if ".." in Path(rel).parts or rel == MANIFEST:
            raise BundleError(f"{p}: file listed in {MANIFEST} is missing")
        if _hash_copy(folder, rel, copy_to) != digest:
            raise BundleError(f"{p}: sha256 does not match {MANIFEST} (tampered or corrupted)")
    return doc


@contextlib.contextmanager
def staged_bundle(folder: str | Path) -> Iterator[tuple[Path, dict]]:
    """``(private copy, manifest)`` of the bundle ``folder``, verified while copied (see
    :func:`verify_manifest`) into a fresh ``mkdtemp`` folder (0700) that is removed on exit.
    One-line errors raised inside the block name ``folder``, not the private copy."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="moodguard-bundle-") as private:
        staged = Path(private) / "bundle"
        staged.mkdir(mode=0o700)
        try:
            yield staged, verify_manifest(folder, copy_to=staged)
        except MoodguardError as exc:
            exc.args = tuple(a.replace(str(staged), str(folder)) if isinstance(a, str) else a for a in exc.args)
            raise


# ----------------------------------------------------------------------------- values
def check_monitor_spec(folder: Path, spec: dict, *, trust_remote_code: bool = False) -> tuple[str, ...]:
    """Type- and range-check ``monitor.json``; returns the parsed detector names."""
    from ..engine.table import fitted, parse_monitor

    path = folder / "monitor.json"
    for key in ("monitor", "detectors", "base", "settings", "stats"):
        if key not in spec:
            fail(path, key, "missing")
    if "format" in spec and spec["format"] != 1:
        fail(path, "format", f"unsupported bundle format {short_repr(spec['format'])}")
    try:
        names = parse_monitor(check_str(path, "monitor", spec["monitor"]))
    except MoodguardError as exc:
        fail(path, "monitor", str(exc))
    if spec["detectors"] != list(names):
        fail(path, "detectors", f"{short_repr(spec['detectors'])} != the monitor's {list(names)}")
    check_str(path, "base", spec["base"])
    check_str(path, "dtype", spec.get("dtype", "float32"), DTYPES)
    if check_bool(path, "trust_remote_code", spec.get("trust_remote_code", False)) and not trust_remote_code:
        fail(path, "trust_remote_code", "the bundle asks to run the base model's own Python code; refused "
                                         "(pass --trust-remote-code if you trust this bundle's base model)")
    s = spec["settings"]
    if not isinstance(s, dict):
        fail(path, "settings", f"expected a mapping, got {short_repr(s)}")
    for key in ("max_length", "batch_size", "pooling", "assistant_only", "predict_safe"):
        if key not in s:
            fail(path, f"settings.{key}", "missing")
    check_int(path, "settings.max_length", s["max_length"], 1, MAX_TOKENS)
    check_int(path, "settings.batch_size", s["batch_size"], 1, MAX_BATCH)
    check_str(path, "settings.pooling", s["pooling"], POOLINGS)
    check_bool(path, "settings.assistant_only", s["assistant_only"])
    check_bool(path, "settings.predict_safe", s["predict_safe"])
    stats = spec["stats"]
    if not isinstance(stats, dict):
        fail(path, "stats", f"expected a mapping, got {short_repr(stats)}")
    for kind, layers in stats.items():
        if kind not in fitted():
            fail(path, f"stats.{kind}", "unknown detector kind")
        if not isinstance(layers, list):
            fail(path, f"stats.{kind}", f"expected a list of layers, got {short_repr(layers)}")
        for i, layer in enumerate(layers):
            if not isinstance(layer, int) or isinstance(layer, bool):
                fail(path, f"stats.{kind}[{i}]", f"expected an integer layer, got {short_repr(layer)}")
    ens = spec.get("ensemble")
    if ens is not None:
        if not isinstance(ens, dict) or not isinstance(ens.get("members"), list) or not ens["members"]:
            fail(path, "ensemble.members", "expected a non-empty list of member names")
        for i, m in enumerate(ens["members"]):
            check_name(path, f"ensemble.members[{i}]", m)
    js = spec.get("judge")
    if js is not None:
        if not isinstance(js, dict):
            fail(path, "judge", f"expected a mapping, got {short_repr(js)}")
        for key in ("model", "adapter", "max_length", "rubrics", "shots"):
            if key not in js:
                fail(path, f"judge.{key}", "missing")
        if js["model"] is not None:
            check_str(path, "judge.model", js["model"])
        check_bool(path, "judge.adapter", js["adapter"])
        check_int(path, "judge.max_length", js["max_length"], 1, MAX_TOKENS)
        if not isinstance(js["rubrics"], list) or not isinstance(js["shots"], list):
            fail(path, "judge.rubrics/shots", "expected lists")
        for i, r in enumerate(js["rubrics"]):
            check_name(path, f"judge.rubrics[{i}]", r)
    return names


def _fpr_key(path: Path, field: str, key: str) -> str:
    """A thresholds key: an FPR in (0, 1) written as ``format(fpr, "g")`` ("0.01"); anything else
    (``<script>``, ``nan``, ``1e-2``) would be printed into summaries and model cards."""
    try:
        value = float(key)
    except ValueError:
        value = math.nan
    if not (0.0 < value < 1.0) or format(value, "g") != key:
        fail(path, field, f"key {short_repr(key)} is not an FPR in (0, 1) written like \"0.01\"")
    return key


def check_thresholds(folder: Path) -> dict[str, float]:
    """``thresholds.json``: ``thresholds`` maps each FPR key ("0.01") to a finite number."""
    path = folder / "thresholds.json"
    doc = read_json(path, BundleError)
    th = doc.get("thresholds")
    if not isinstance(th, dict) or not th:
        fail(path, "thresholds", "missing or empty (expected {fpr: threshold})")
    out = {}
    for k, v in th.items():
        out[_fpr_key(path, "thresholds", k)] = check_number(path, f"thresholds.{k}", v)
    fprs = doc.get("fprs")
    if fprs is not None:
        if not isinstance(fprs, list):
            fail(path, "fprs", f"expected a list, got {short_repr(fprs)}")
        for i, f in enumerate(fprs):
            if not 0.0 < check_number(path, f"fprs[{i}]", f) < 1.0:
                fail(path, f"fprs[{i}]", f"must be in (0, 1), got {f}")
    return out


def adapter_folders(folder: Path, spec: dict, names: tuple[str, ...]) -> list[Path]:
    """Every adapter folder the bundle's monitor will load."""
    from ..engine.planner import plan

    out = [folder / "guard"]
    if plan(names).needs_lm_adapter:
        out.append(folder / "lm")
    for m in (spec.get("ensemble") or {}).get("members", []):
        if m != "guard":
            out.append(folder / "members" / m)
    if (spec.get("judge") or {}).get("adapter"):
        out.append(folder / "judge" / "adapter")
    return out


__all__ = ["FORMAT", "adapter_folders", "check_manifest_coverage", "check_monitor_spec", "check_thresholds",
           "files_on_disk", "staged_bundle", "verify_manifest"]
