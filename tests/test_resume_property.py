"""Property test of ``score --resume`` (issue 22): random damage to the parts folder of an
interrupted run -- truncate, delete, reorder, edit a score or an id, duplicate a row, empty a
file, a symlink in place of a chunk, stray files, a damaged meta.json -- never yields a run that
succeeds with wrong or missing rows. Either the resumed run refuses with a one-line error and
writes nothing, or its output is exactly the uninterrupted run's (every id once, in input
order, the scores the bundle gives).

A seeded random loop (no extra dependency), through the library call that ``moodguard score``
makes (:func:`eval.streaming.score_stream`) with one loaded tiny bundle, so that many trials
fit in a few seconds; tests/test_hardening_round3.py covers the same path through the CLI."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from test_hardening_round3 import rows_of, write_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_ROWS, CHUNK, TRIALS = 23, 4, 40  # 6 chunks, the last one short


class Interrupted(Exception):
    pass


class StopsAfter:
    """The monitor, interrupted (as by a kill) when it starts scoring chunk ``n``."""

    def __init__(self, monitor, n: int):
        self._monitor, self._left = monitor, n

    def __getattr__(self, name):
        return getattr(self._monitor, name)

    def score(self, conversations):
        if self._left == 0:
            raise Interrupted
        self._left -= 1
        return self._monitor.score(conversations)


def damage(parts: Path, rng: random.Random) -> list[str]:
    """1-3 random damages to the committed chunks (and rarely the meta file); what was done."""
    done = []
    for _ in range(rng.randint(1, 3)):
        chunks = sorted(parts.glob("chunk-*.jsonl"))
        op = rng.choice(["truncate", "delete", "reorder", "edit_score", "edit_id", "duplicate_row", "empty",
                         "symlink", "stray", "stray_chunk", "meta"] if chunks else ["stray", "stray_chunk", "meta"])
        c = rng.choice(chunks) if chunks else None
        if op == "truncate":
            data = c.read_bytes()
            c.write_bytes(data[:rng.randrange(len(data) or 1)])
        elif op == "delete":
            c.unlink()
        elif op == "reorder" and len(chunks) > 1:
            a, b = rng.sample(chunks, 2)
            tmp = a.with_name("swap")
            a.rename(tmp)
            b.rename(a)
            tmp.rename(b)
        elif op in ("edit_score", "edit_id", "duplicate_row"):
            try:
                rows = [json.loads(x) for x in c.read_text().splitlines()]
            except ValueError:  # an earlier damage cut it mid-row
                continue
            if not rows:
                continue
            i = rng.randrange(len(rows))
            if op == "edit_score":
                rows[i]["score"] += rng.choice([-1, 1]) * rng.uniform(0.01, 5.0)
            elif op == "edit_id":
                rows[i]["id"] = rows[(i + 1) % len(rows)]["id"] if len(rows) > 1 else "someone-else"
            else:
                rows.insert(i, dict(rows[i]))
            c.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif op == "empty":
            c.write_bytes(b"")
        elif op == "symlink" and len(chunks) > 1:
            other = rng.choice([x for x in chunks if x != c])
            c.unlink()
            c.symlink_to(other)
        elif op == "stray":
            (parts / rng.choice(["notes.txt", ".hidden", "chunk-x.jsonl"])).write_text("stray\n")
        elif op == "stray_chunk":  # a chunk file no run committed, beyond the last chunk
            (parts / "chunk-000099.jsonl").write_text('{"id": "r0", "score": 1.0}\n')
        elif op == "meta":
            meta = parts / "meta.json"
            data = meta.read_bytes()
            meta.write_bytes(data[:rng.randrange(len(data) or 1)] if rng.random() < 0.5 else b"[]")
        done.append(op)
    return done


def test_random_damage_to_the_parts_folder_never_yields_wrong_rows(bundle, tmp_path):
    from eval.run.bundle import Monitor
    from eval.run.streaming import parts_dir, scan_input, score_stream
    from mood_data.errors import MoodguardError

    monitor = Monitor.load(bundle[0])
    scan = scan_input(write_input(tmp_path / "in.jsonl", N_ROWS))
    ref = tmp_path / "ref.jsonl"
    score_stream(monitor, scan, ref, chunk=CHUNK)
    expected = rows_of(ref)
    assert len(expected) == N_ROWS
    rng = random.Random(22)
    outcomes = {"equal": 0, "refused": 0}
    seen: set[str] = set()
    for trial in range(TRIALS):
        out = tmp_path / f"t{trial}" / "scores.jsonl"
        with pytest.raises(Interrupted):
            score_stream(StopsAfter(monitor, rng.randint(1, 5)), scan, out, chunk=CHUNK)
        ops = damage(parts_dir(out), rng)
        seen.update(ops)
        try:
            score_stream(monitor, scan, out, chunk=CHUNK, resume=True)
        except MoodguardError as exc:  # refusing is allowed: one line, nothing written
            assert "\n" not in str(exc) and not out.exists(), (trial, ops, exc)
            outcomes["refused"] += 1
            continue
        assert rows_of(out) == expected, (trial, ops)  # exit 0 only with every row, right
        outcomes["equal"] += 1
    assert outcomes["equal"] >= TRIALS // 2, outcomes
    assert {"truncate", "delete", "reorder", "edit_score", "stray"} <= seen, seen  # the five, at least  # the damage is rescored, not merely refused
