"""``moodguard score`` over inputs of any size: streamed, committed in chunks, resumable, sharded.

* The input is read twice, row by row: a first pass validates every row (one-line DataError
  before the slow model load), counts the rows and hashes the file; the second scores
  ``chunk`` rows at a time (length-sorted within the chunk). Memory is bounded by a chunk,
  never the file.
* With ``--out F`` each scored chunk is committed atomically to the hidden folder
  ``.F.parts/`` (``chunk-<k>.jsonl``, fsynced with its folder before the rename that commits it),
  then recorded in ``meta.json`` (input, shard, chunk size, bundle, and per chunk its row count,
  byte size and sha256); at the end the chunks are checked again as they are concatenated into
  ``F`` (atomic, fsynced) and the files we wrote are removed (a file we did not write is left,
  and said). ``--resume`` keeps the committed chunks of a killed run (same input, shard, chunk
  size and bundle, else a one-line error) and scores only the rest: every committed chunk is
  read once and must match its record and hold exactly the input's ids for its rows, in order;
  a truncated, empty, edited, swapped, missing or symlinked chunk is rescored, one line saying
  so. Every row exactly once, in input order.
* ``F`` is never the input (same path or same inode), an existing ``F`` is never replaced
  without ``--overwrite``, and a killed run's chunks are never dropped silently: without
  ``--resume`` they are an error naming ``--resume`` and ``--overwrite``. The chunk folder is
  never a symlink.
* ``--shard i/N`` scores rows ``[i*n//N, (i+1)*n//N)`` of the ``n`` input rows (0-based ``i``):
  the N shards are disjoint, their union is the file, and concatenating their outputs in shard
  order gives the one-job output (Slurm array jobs: ``--shard $SLURM_ARRAY_TASK_ID/N``).
* Under a multi-process launch every rank reads the input and scores its share of each
  chunk's batches (:mod:`eval.engine.parallel`); rank 0 commits.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from mood_data import atomic
from mood_data.errors import DataError, MoodguardError, OutputError
from mood_data.readers import jsonl_rows, read_json, sha256_file, short_repr

from ..engine import parallel

SCORE_CHUNK = 512  # conversations tokenised + scored + committed at a time
PARTS_FORMAT = 1
_SHARD = re.compile(r"(\d+)/(\d+)")


# ----------------------------------------------------------------------------- input
def _input_rows(path: Path, template: str = "mood") -> Iterator[tuple[int, Any, str]]:
    """``(row number, id, rendered conversation)`` of every row; an ``id`` given in a row must be
    a non-empty string (as ``data validate`` requires), else it is the row number. A row with no
    text renders as ``""`` (scored as unscorable, never through the model)."""
    from mood_data.render import render_or_empty

    for n, row in jsonl_rows(path, DataError):
        if isinstance(row.get("conversation"), str):
            conv = row["conversation"]
        elif isinstance(row.get("messages"), list):
            try:
                conv = render_or_empty(row["messages"], template)  # "" when no message holds text
            except (ValueError, AttributeError, TypeError) as exc:
                raise DataError(f"{path}: row {n}: field 'messages': {exc}") from None
        else:
            raise DataError(f"{path}: row {n}: field 'conversation': expected a string (or a 'messages' list)")
        if "id" in row:
            rid = row["id"]
            if not isinstance(rid, str):
                raise DataError(f"{path}: row {n}: field 'id': expected a string, got "
                                f"{'null' if rid is None else type(rid).__name__}")
            if not rid.strip():
                raise DataError(f"{path}: row {n}: field 'id': empty string")
        yield n, row.get("id", n), conv


def iter_conversations(path: str | Path, template: str = "mood") -> Iterator[tuple[Any, str]]:
    """``(id, rendered conversation)`` for each row of a jsonl file with ``conversation``
    (str) or ``messages`` (list), streamed; ``id`` (a string) defaults to the 1-based row number."""
    for _, rid, conv in _input_rows(Path(path), template):
        yield rid, conv


@dataclass(frozen=True)
class InputScan:
    path: Path
    n_rows: int
    sha256: str


def _id_key(rid: str) -> int:
    """A 64-bit digest of an id: the duplicate check keeps these, not the ids themselves."""
    return int.from_bytes(hashlib.blake2b(rid.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def scan_input(path: str | Path) -> InputScan:
    """Validate every row (keeping none: ids are remembered as 64-bit digests), refuse a
    duplicate id as ``data validate`` does, count the rows and hash the file."""
    path = Path(path)
    seen: set[int] = set()
    n = 0
    for row_no, rid, _ in _input_rows(path):
        n += 1
        if isinstance(rid, str):
            key = _id_key(rid)
            if key in seen:  # a digest match: find the first row with this very id (a collision passes)
                first = next((m for m, other, _ in _input_rows(path) if other == rid), row_no)
                if first < row_no:
                    raise DataError(f"{path}: row {row_no}: field 'id': duplicate id {short_repr(rid)} "
                                    f"(first at row {first})")
            seen.add(key)
    if n == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return InputScan(path, n, sha256_file(path))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` -> ``(i, N)`` with ``0 <= i < N``; ``None`` -> ``(0, 1)``."""
    if text is None:
        return 0, 1
    m = _SHARD.fullmatch(str(text).strip())
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise MoodguardError(f"--shard {text!r}: expected i/N with 0 <= i < N (e.g. 0/4)")
    return int(m.group(1)), int(m.group(2))


def shard_rows(n_rows: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Row range ``[lo, hi)`` of shard ``(i, N)`` of ``n_rows`` rows (contiguous, balanced)."""
    i, n = shard
    return i * n_rows // n, (i + 1) * n_rows // n


def chunks(path: Path, lo: int, hi: int, size: int) -> Iterator[tuple[list[Any], list[str]]]:
    """``(ids, conversations)`` of rows ``[lo, hi)`` in ``size``-row chunks, streamed."""
    ids: list[Any] = []
    convs: list[str] = []
    for k, (i, c) in enumerate(iter_conversations(path)):
        if k < lo:
            continue
        if k >= hi:
            break
        ids.append(i)
        convs.append(c)
        if len(ids) == size:
            yield ids, convs
            ids, convs = [], []
    if ids:
        yield ids, convs


# ----------------------------------------------------------------------------- scoring
@dataclass
class Summary:
    """What ``score`` reports at the end (kept as counters: no row is held)."""

    rows: int = 0
    truncated: int = 0
    flagged: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    resumed_rows: int = 0
    unscorable: int = 0

    def add(self, row: dict) -> None:
        self.rows += 1
        self.unscorable += int(bool(row.get("unscorable")))
        self.truncated += int(bool(row["truncated"]))
        for k, v in row["flags"].items():
            self.flagged[k] = self.flagged.get(k, 0) + int(bool(v))


def parts_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.parts"


def _chunk_file(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.jsonl"


META = "meta.json"
_OWN_FILES = re.compile(r"meta\.json|chunk-\d{6}\.jsonl|\.(meta\.json|chunk-\d{6}\.jsonl)\..+\.tmp")  # what we write there


def _parts_meta(monitor, scan: InputScan, shard: tuple[int, int], rows: tuple[int, int], chunk: int) -> dict:
    from .bundle import MANIFEST

    return {"format": PARTS_FORMAT, "input": str(scan.path.resolve()), "input_sha256": scan.sha256,
            "n_rows": scan.n_rows, "shard": list(shard), "rows": list(rows), "chunk": chunk,
            "bundle": str(Path(monitor.folder).resolve()),
            "bundle_manifest": getattr(monitor, "manifest_sha256", None) or sha256_file(Path(monitor.folder) / MANIFEST)}


def _committed(parts: Path) -> list[str]:
    """Names of the committed chunk files in ``parts``: a killed run's partial output."""
    if not parts.is_dir() or parts.is_symlink():
        return []
    return sorted(p.name for p in parts.iterdir() if re.fullmatch(r"chunk-\d{6}\.jsonl", p.name))


def check_output(out: str | Path | None, input_path: str | Path, *, resume: bool = False,
                 overwrite: bool = False) -> None:
    """What ``--out`` may replace, checked before any work (one-line OutputError otherwise):

    * never the input itself (same path once resolved, or the same file through a hard link);
    * never an existing file without ``overwrite`` (a complete output of an earlier run);
    * the committed chunks of an earlier run only with ``resume`` (continue them) or
      ``overwrite`` (start afresh); the chunk folder ``.<out>.parts`` is never a symlink."""
    if out is None:
        return
    out, input_path = Path(out), Path(input_path)
    if out.resolve() == input_path.resolve() or (out.exists() and os.path.samefile(out, input_path)):
        raise OutputError(f"{out}: --out is the input file {input_path} (refused: scoring would replace its input; "
                          "choose another --out)")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"{out}: --out already exists (a complete output is never replaced silently): pass "
                          "--overwrite to replace it, or choose another --out")
    parts = parts_dir(out)
    if parts.is_symlink():
        raise OutputError(f"{parts}: the chunk folder of --out is a symlink (refused: it is never followed; "
                          "remove it)")
    if os.path.lexists(parts) and not parts.is_dir():
        raise OutputError(f"{parts}: the chunk folder of --out is not a folder (remove it)")
    done = _committed(parts)
    if done and not (resume or overwrite):
        raise OutputError(f"{parts}: holds {len(done)} committed chunk(s) of an earlier run of this --out: pass "
                          "--resume to continue it, or --overwrite to start afresh")


def _remove_parts(parts: Path, folder: bool = True) -> list[str]:
    """Remove what ``score`` writes in ``parts`` (meta.json, chunk files, their temporaries) and,
    with ``folder``, the folder once empty; returns the names left (files moodguard did not write)."""
    if not parts.is_dir() or parts.is_symlink():
        return []
    left = []
    for p in parts.iterdir():
        if _OWN_FILES.fullmatch(p.name) and not stat.S_ISDIR(os.lstat(p).st_mode):
            p.unlink(missing_ok=True)
        else:
            left.append(p.name)
    if folder and not left:
        parts.rmdir()
    return sorted(left)


def _chunk_record(data: bytes) -> dict:
    return {"rows": data.count(b"\n"), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_chunk(parts: Path, k: int, record: dict) -> bytes | str:
    """The bytes of committed chunk ``k`` if they match ``record`` (size, sha256, rows); else why not.
    Read once, through a no-follow fd, and only as many bytes as the record says."""
    path = _chunk_file(parts, k)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or type(exc).__name__})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size != record.get("bytes"):
            return f"{st.st_size} bytes, {record.get('bytes')} committed"
        data = b""
        while len(data) < st.st_size and (block := os.read(fd, st.st_size - len(data))):
            data += block
    finally:
        os.close(fd)
    if hashlib.sha256(data).hexdigest() != record.get("sha256"):
        return f"content does not match its sha256 in {META}"
    n_rows = data.count(b"\n")
    if n_rows != record.get("rows"):
        return f"{n_rows} rows, {record.get('rows')} committed"
    return data


def _chunk_rows(data: bytes, ids: list[Any]) -> list[dict] | str:
    """The rows of a verified chunk if they are exactly the rows ``ids`` of the input, in order."""
    try:
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    except ValueError as exc:
        return f"not valid JSON lines ({exc})"
    if [r.get("id") if isinstance(r, dict) else None for r in rows] != list(ids):
        return "its rows are not the input's rows for this chunk"
    return rows


def _records(meta: dict | None, n_chunks: int) -> dict[int, dict]:
    """The per-chunk records of a meta.json (those of this run's chunk range only)."""
    out = {}
    chunks_ = (meta or {}).get("chunks")
    for key, rec in (chunks_ if isinstance(chunks_, dict) else {}).items():
        if isinstance(key, str) and key.isdigit() and int(key) < n_chunks and isinstance(rec, dict):
            out[int(key)] = rec
    return out


def _committed_chunks(parts: Path, meta: dict, resume: bool, overwrite: bool, n_chunks: int) -> dict[int, dict]:
    """The records (rows, bytes, sha256) of the chunks an earlier run committed (``--resume``,
    same input / shard / chunk size / bundle; each is verified again before use). Without
    ``--resume`` (:func:`check_output` allowed it: ``--overwrite`` or nothing committed) the
    earlier run's files are removed, ours only."""
    mpath = parts / META
    records: dict[int, dict] = {}
    if resume and os.path.lexists(mpath):
        try:
            if mpath.is_symlink():
                raise MoodguardError(f"{mpath}: a symlink (never followed)")
            old = read_json(mpath, MoodguardError)
        except MoodguardError as exc:
            old = None
            parallel.main_print(f"score: {exc}; no committed chunk can be trusted: rescoring all", file=sys.stderr)
        if old is not None:
            for key in ("format", "input_sha256", "shard", "rows", "chunk", "bundle_manifest"):
                if old.get(key) != meta[key]:
                    raise MoodguardError(f"{mpath}: field '{key}': cannot resume, the killed run had "
                                         f"{old.get(key)!r}, this one {meta[key]!r} (pass --overwrite instead of "
                                         "--resume to start afresh)")
            records = _records(old, n_chunks)
    parallel.barrier()  # every rank has read the old meta before rank 0 writes the new one
    if not resume:
        if parallel.is_main():
            _remove_parts(parts, folder=False)  # --overwrite: the earlier run's files (ours only)
        parallel.barrier()  # ... and before any rank makes a temporary there
    return records


def score_chunk(monitor, ids: list[Any], convs: list[str], label: str = "input", first_row: int = 1) -> list[dict]:
    """``{"id", ...}`` per conversation. A row whose score cannot be computed (NaN/inf: e.g. a
    one-token conversation for perplexity) fails the call naming ``label``, the row and its id:
    fail closed, never a silent "not flagged"."""
    from mood_data.readers import short_repr

    from .bundle import UnscorableRow
    from ..engine.planner import unscorable_reason

    try:
        scored = monitor.score(convs)
    except UnscorableRow as exc:
        raise DataError(f"{label}: row {first_row + exc.index} (id {short_repr(ids[exc.index])}): field 'conversation': "
                        f"detector '{exc.detector}' score is {exc.value} ({unscorable_reason(exc.detector)}); "
                        "scoring stopped") from None
    return [{"id": i, **r} for i, r in zip(ids, scored)]


def score_stream(monitor, scan: InputScan, out: str | Path | None = None, *, shard: tuple[int, int] = (0, 1),
                 resume: bool = False, chunk: int = SCORE_CHUNK, stdout: TextIO | None = None,
                 overwrite: bool = False) -> Summary:
    """Score the rows of ``scan.path`` in ``shard`` (see the module doc); rows go to ``out``
    (committed in chunks, resumable) or, without ``out``, to ``stdout`` as they are scored.
    ``out`` is checked by :func:`check_output` (never the input, never an existing output or an
    earlier run's chunks without ``overwrite`` / ``resume``)."""
    from tqdm.auto import tqdm

    if chunk < 1:
        raise MoodguardError(f"--chunk-size {chunk}: expected a positive number")
    lo, hi = shard_rows(scan.n_rows, shard)
    summary = Summary()
    t0 = time.perf_counter()
    n_chunks = -(-(hi - lo) // chunk)
    records: dict[int, dict] = {}
    parts = meta = None
    if out is not None:
        out = Path(out)
        check_output(out, scan.path, resume=resume, overwrite=overwrite)
        parts = parts_dir(out)
        meta = _parts_meta(monitor, scan, shard, (lo, hi), chunk)
        records = _committed_chunks(parts, meta, resume, overwrite, n_chunks)
        meta["chunks"] = {str(k): r for k, r in sorted(records.items())}
        atomic.write_json(parts / META, meta, durable=True)
        if records:
            parallel.main_print(f"score: resuming: {len(records)} of {n_chunks} chunks committed in {parts} "
                                "(each checked against its row count and sha256)", file=sys.stderr)
    bar = tqdm(total=hi - lo, desc=f"score{f' shard {shard[0]}/{shard[1]}' if shard[1] > 1 else ''}",
               unit="conv", disable=None if parallel.is_main() else True)
    for k, (ids, convs) in enumerate(chunks(scan.path, lo, hi, chunk)):
        if k in records:
            got = _read_chunk(parts, k, records[k])
            if isinstance(got, bytes):
                got = _chunk_rows(got, ids)
            if isinstance(got, list):
                for r in got:
                    summary.add(r)
                summary.resumed_rows += len(ids)
                bar.update(len(ids))
                continue
            parallel.main_print(f"score: {_chunk_file(parts, k)}: {got}: rescoring its {len(ids)} rows",
                                file=sys.stderr)
            del records[k]
        try:
            rows = score_chunk(monitor, ids, convs, str(scan.path), lo + k * chunk + 1)
        except DataError:
            if parts is not None and parallel.is_main() and not records:
                _remove_parts(parts)  # nothing committed yet: leave nothing behind
            raise
        for r in rows:
            summary.add(r)
        if parts is not None:
            path = _chunk_file(parts, k)
            data = "".join(atomic.dumps(r, path, row=n, ensure_ascii=False) + "\n"
                           for n, r in enumerate(rows, 1)).encode("utf-8")
            atomic.write_bytes(path, data, durable=True)  # fsynced (file and folder) before its rename
            records[k] = _chunk_record(data)
            meta["chunks"] = {str(j): r for j, r in sorted(records.items())}
            atomic.write_json(parts / META, meta, durable=True)  # then recorded: rows, bytes, sha256
        elif parallel.is_main():
            fh = stdout or sys.stdout
            for n, r in enumerate(rows, lo + k * chunk + 1):
                fh.write(atomic.dumps(r, "stdout", row=n, ensure_ascii=False) + "\n")  # NaN/inf refused
            fh.flush()
        bar.update(len(ids))
    bar.close()
    if parts is not None:
        with atomic.atomic_path(out, durable=True) as tmp, open(tmp, "wb") as fh:
            for k in range(n_chunks) if parallel.is_main() else ():  # only rank 0's file is kept
                data = _read_chunk(parts, k, records[k])  # checked again: what is copied is what was recorded
                if not isinstance(data, bytes):
                    raise OutputError(f"{_chunk_file(parts, k)}: {data} (changed while scoring: nothing written; "
                                      "rerun with --resume)")
                fh.write(data)
        if parallel.is_main():
            left = _remove_parts(parts)
            if left:
                print(f"score: {parts}: left in place: it holds {len(left)} file(s) moodguard did not write "
                      f"({', '.join(left[:3])})", file=sys.stderr)
        parallel.barrier()
    summary.seconds = time.perf_counter() - t0
    return summary


__all__ = ["InputScan", "SCORE_CHUNK", "Summary", "check_output", "chunks", "iter_conversations", "parse_shard",
           "parts_dir", "scan_input", "score_chunk", "score_stream", "shard_rows"]
