"""``moodguard score`` over inputs of any size: streamed, committed in chunks, resumable, sharded.

* The input is read twice, row by row: a first pass validates every row (one-line DataError
  before the slow model load), counts the rows and hashes the file; the second scores
  ``chunk`` rows at a time (length-sorted within the chunk). Memory is bounded by a chunk,
  never the file.
* With ``--out F`` each scored chunk is committed atomically to the hidden folder
  ``.F.parts/`` (``chunk-<k>.jsonl``, plus ``meta.json`` naming input, shard, chunk size and
  bundle); at the end the chunks are concatenated into ``F`` (atomic) and the folder removed.
  ``--resume`` keeps the committed chunks of a killed run (same input, shard, chunk size and
  bundle, else a one-line error) and scores only the rest: every row exactly once, in input order.
* ``--shard i/N`` scores rows ``[i*n//N, (i+1)*n//N)`` of the ``n`` input rows (0-based ``i``):
  the N shards are disjoint, their union is the file, and concatenating their outputs in shard
  order gives the one-job output (Slurm array jobs: ``--shard $SLURM_ARRAY_TASK_ID/N``).
* Under a multi-process launch every rank reads the input and scores its share of each
  chunk's batches (:mod:`eval.parallel`); rank 0 commits.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, TextIO

from mood_data import atomic
from mood_data.errors import DataError, MoodguardError
from mood_data.readers import jsonl_rows, read_json, sha256_file

from . import parallel

SCORE_CHUNK = 512  # conversations tokenised + scored + committed at a time
PARTS_FORMAT = 1
_SHARD = re.compile(r"(\d+)/(\d+)")


# ----------------------------------------------------------------------------- input
def iter_conversations(path: str | Path, template: str = "mood") -> Iterator[tuple[Any, str]]:
    """``(id, rendered conversation)`` for each row of a jsonl file with ``conversation``
    (str) or ``messages`` (list), streamed; ``id`` defaults to the 1-based row number."""
    from mood_data.render import render_or_empty

    path = Path(path)
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
        yield row.get("id", n), conv


@dataclass(frozen=True)
class InputScan:
    path: Path
    n_rows: int
    sha256: str


def scan_input(path: str | Path) -> InputScan:
    """Validate every row (keeping none), count them and hash the file."""
    path = Path(path)
    n = sum(1 for _ in iter_conversations(path))
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


def _parts_meta(monitor, scan: InputScan, shard: tuple[int, int], rows: tuple[int, int], chunk: int) -> dict:
    from .bundle import MANIFEST

    return {"format": PARTS_FORMAT, "input": str(scan.path.resolve()), "input_sha256": scan.sha256,
            "n_rows": scan.n_rows, "shard": list(shard), "rows": list(rows), "chunk": chunk,
            "bundle": str(Path(monitor.folder).resolve()), "bundle_manifest": sha256_file(Path(monitor.folder) / MANIFEST)}


def _committed_chunks(parts: Path, meta: dict, resume: bool) -> set[int]:
    """Chunks a killed run committed (``--resume``, same meta); otherwise start afresh."""
    mpath = parts / "meta.json"
    if resume and mpath.is_file():
        old = read_json(mpath, MoodguardError)
        for key in ("format", "input_sha256", "shard", "rows", "chunk", "bundle_manifest"):
            if old.get(key) != meta[key]:
                raise MoodguardError(f"{mpath}: field '{key}': cannot resume, the killed run had {old.get(key)!r}, "
                                     f"this one {meta[key]!r} (rerun without --resume to start afresh)")
        return {int(p.stem.split("-")[1]) for p in parts.glob("chunk-*.jsonl")}
    if parallel.is_main() and parts.exists():
        shutil.rmtree(parts)
    parallel.barrier()
    return set()


def score_chunk(monitor, ids: list[Any], convs: list[str], label: str = "input", first_row: int = 1) -> list[dict]:
    """``{"id", ...}`` per conversation. A row whose score cannot be computed (NaN/inf: e.g. a
    one-token conversation for perplexity) fails the call naming ``label``, the row and its id:
    fail closed, never a silent "not flagged"."""
    from mood_data.readers import short_repr

    from .bundle import UnscorableRow
    from .scoring import unscorable_reason

    try:
        scored = monitor.score(convs)
    except UnscorableRow as exc:
        raise DataError(f"{label}: row {first_row + exc.index} (id {short_repr(ids[exc.index])}): field 'conversation': "
                        f"detector '{exc.detector}' score is {exc.value} ({unscorable_reason(exc.detector)}); "
                        "scoring stopped") from None
    return [{"id": i, **r} for i, r in zip(ids, scored)]


def score_stream(monitor, scan: InputScan, out: str | Path | None = None, *, shard: tuple[int, int] = (0, 1),
                 resume: bool = False, chunk: int = SCORE_CHUNK, stdout: TextIO | None = None) -> Summary:
    """Score the rows of ``scan.path`` in ``shard`` (see the module doc); rows go to ``out``
    (committed in chunks, resumable) or, without ``out``, to ``stdout`` as they are scored."""
    from tqdm.auto import tqdm

    if chunk < 1:
        raise MoodguardError(f"--chunk-size {chunk}: expected a positive number")
    lo, hi = shard_rows(scan.n_rows, shard)
    summary = Summary()
    t0 = time.perf_counter()
    n_chunks = -(-(hi - lo) // chunk)
    done: set[int] = set()
    parts = None
    if out is not None:
        out = Path(out)
        parts = parts_dir(out)
        meta = _parts_meta(monitor, scan, shard, (lo, hi), chunk)
        done = {k for k in _committed_chunks(parts, meta, resume) if k < n_chunks}
        atomic.write_json(parts / "meta.json", meta)
        if done:
            print(f"score: resuming: {len(done)} of {n_chunks} chunks already committed in {parts}", file=sys.stderr)
    bar = tqdm(total=hi - lo, desc=f"score{f' shard {shard[0]}/{shard[1]}' if shard[1] > 1 else ''}",
               unit="conv", disable=None if parallel.is_main() else True)
    for k, (ids, convs) in enumerate(chunks(scan.path, lo, hi, chunk)):
        if k in done:
            for line in _chunk_file(parts, k).read_text(encoding="utf-8").splitlines():
                summary.add(json.loads(line))
            summary.resumed_rows += len(ids)
            bar.update(len(ids))
            continue
        try:
            rows = score_chunk(monitor, ids, convs, str(scan.path), lo + k * chunk + 1)
        except DataError:
            if parts is not None and parallel.is_main() and not any(_chunk_file(parts, j).exists() for j in range(k)):
                shutil.rmtree(parts, ignore_errors=True)  # nothing committed yet: leave nothing behind
            raise
        for r in rows:
            summary.add(r)
        if parts is not None:
            atomic.write_jsonl(_chunk_file(parts, k), rows)
        elif parallel.is_main():
            fh = stdout or sys.stdout
            for n, r in enumerate(rows, lo + k * chunk + 1):
                fh.write(atomic.dumps(r, "stdout", row=n, ensure_ascii=False) + "\n")  # NaN/inf refused
            fh.flush()
        bar.update(len(ids))
    bar.close()
    if parts is not None:
        with atomic.atomic_path(out) as tmp, open(tmp, "wb") as fh:
            for k in range(n_chunks) if parallel.is_main() else ():  # only rank 0's file is kept
                with open(_chunk_file(parts, k), "rb") as src:
                    shutil.copyfileobj(src, fh)
        if parallel.is_main():
            shutil.rmtree(parts, ignore_errors=True)
        parallel.barrier()
    summary.seconds = time.perf_counter() - t0
    return summary


__all__ = ["InputScan", "SCORE_CHUNK", "Summary", "chunks", "iter_conversations", "parse_shard", "parts_dir",
           "scan_input", "score_chunk", "score_stream", "shard_rows"]
