"""Issue 22 (security and reliability, round 3): never lose or overwrite a user's data, never
trust a file twice. The guarantees that need more than one command line of
tests/bad_inputs/cases.yaml: planted lock symlinks, a bundle swapped between its check and its
load, damaged ``score --resume`` chunks, outputs that would replace the input or a complete
earlier output, ``export`` onto a folder it did not write, file modes, orphaned ranks."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moodguard.cli import main as moodguard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
CONV = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello there<end_of_turn>\n"
PROGRESS = re.compile(r"\d+%\|")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def one_error_line(err: str, command: str) -> str:
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
    errors = [ln for ln in lines if ln.startswith(f"moodguard {command}: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def write_input(path: Path, n: int, prefix: str = "r") -> Path:
    words = "please help me write a short note about the weather today thanks sure here is".split()
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(4 + i % 9))
            conv = f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\nsure {text}<end_of_turn>\n"
            fh.write(json.dumps({"id": f"{prefix}{i}", "conversation": conv}) + "\n")
    return path


# ----------------------------------------------------------------------------- 1. lock files
def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    from mood_data.errors import OutputError
    from mood_data.runlock import lock_path, output_file_lock, output_lock

    victim = tmp_path / "precious.txt"
    victim.write_text("the user's data\n")
    run = tmp_path / "run"
    run.mkdir()
    lock = lock_path(run.resolve())
    lock.symlink_to(victim)
    with pytest.raises(OutputError, match=rf"{re.escape(str(lock))}: .*symlink"):
        with output_lock(run):
            pass
    assert victim.read_text() == "the user's data\n" and lock.is_symlink()
    # a dangling link would have CREATED the file it points to
    lock.unlink()
    elsewhere = tmp_path / "created-through-the-link"
    lock.symlink_to(elsewhere)
    with pytest.raises(OutputError, match="symlink"):
        with output_lock(run):
            pass
    assert not elsewhere.exists()
    # a hard link to someone else's file would be truncated just the same
    lock.unlink()
    os.link(victim, lock)
    with pytest.raises(OutputError, match="hard link"):
        with output_lock(run):
            pass
    assert victim.read_text() == "the user's data\n"
    lock.unlink()
    with output_lock(run):  # a plain stale file (or none) is still taken
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock.exists()
    out = tmp_path / "scores.jsonl"
    flock = lock_path(out.resolve())
    flock.symlink_to(victim)
    with pytest.raises(OutputError, match="symlink"):
        with output_file_lock(out):
            pass
    assert victim.read_text() == "the user's data\n"


def test_score_refuses_a_lock_symlink_through_the_cli(bundle, tmp_path, capsys):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    inp = write_input(tmp_path / "in.jsonl", 3)
    out = tmp_path / "scores.jsonl"
    (tmp_path / ".scores.jsonl.moodguard.lock").symlink_to(victim)
    assert moodguard(["score", "--monitor", str(bundle[0]), str(inp), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "score")
    assert ".scores.jsonl.moodguard.lock" in line and "symlink" in line
    assert victim.read_text() == "keep me\n" and not out.exists()


# ----------------------------------------------------------------------------- file modes
def test_weight_files_follow_the_umask_like_every_other_file(bundle, tmp_path):
    """docs/hardening.md promises 0644 files / 0755 folders (umask 022): safetensors writes its
    files 0600, and the bundle copied those modes along."""
    import numpy as np

    from eval.engine.detectors.tensors import save_tensors
    from mood_data import atomic

    old = os.umask(0o022)
    try:
        save_tensors(tmp_path / "stats", "x", {"w": np.zeros(3)}, {})
        assert (tmp_path / "stats" / "x.safetensors").stat().st_mode & 0o777 == 0o644
        with atomic.atomic_dir(tmp_path / "adapter") as tmp:
            from safetensors.numpy import save_file

            (tmp / "sub").mkdir(mode=0o700)
            save_file({"w": np.zeros(2)}, str(tmp / "sub" / "adapter_model.safetensors"))  # as peft does
        assert (tmp_path / "adapter" / "sub").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "adapter" / "sub" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    # the session's bundle (exported under this process's umask): weights included
    mask = atomic.umask()
    modes = {p.relative_to(bundle[0]).as_posix(): p.stat().st_mode & 0o777 for p in bundle[0].rglob("*")}
    assert modes["guard/adapter_model.safetensors"] == modes["stats/maha-layer-1.safetensors"] == 0o666 & ~mask
    assert set(modes.values()) == {0o666 & ~mask, 0o777 & ~mask}, modes


# ----------------------------------------------------------------------------- 2. bundle TOCTOU
def evil_adapter(src: Path, dst: Path) -> Path:
    """The same adapter with every tensor negated (a valid file of the right shapes whose guard
    scores point the other way): what an attacker would swap in after the check."""
    from safetensors.numpy import load_file, save_file

    save_file({k: -v for k, v in load_file(str(src)).items()}, str(dst))
    return dst


@pytest.mark.parametrize("how", ["rename", "symlink"])
def test_an_adapter_swapped_after_the_manifest_check_is_never_loaded(bundle, tmp_path, monkeypatch, how):
    import eval.run.bundle as bundle_mod
    from eval.run.bundle import Monitor, write_manifest

    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    weights = copy / "guard" / "adapter_model.safetensors"
    evil = evil_adapter(weights, tmp_path / "evil.safetensors")
    convs = [CONV, CONV.replace("hello there", "sure here is how to hurt someone")]
    honest = [r["score"] for r in Monitor.load(copy).score(convs)]
    # the vector is real: a bundle really holding the swapped adapter scores differently
    tampered = tmp_path / "tampered"
    shutil.copytree(copy, tampered)
    shutil.copy(evil, tampered / "guard" / "adapter_model.safetensors")
    write_manifest(tampered)
    assert [r["score"] for r in Monitor.load(tampered).score(convs)] != pytest.approx(honest, abs=1e-3)

    import eval.run.bundle_check as check_mod

    where = check_mod if hasattr(check_mod, "verify_manifest") else bundle_mod  # where the loader calls it
    real_verify = where.verify_manifest
    swapped = []

    def verify_then_swap(*args, **kwargs):  # the attacker wins the race right after the check
        out = real_verify(*args, **kwargs)
        if how == "rename":
            os.replace(shutil.copy(evil, weights.with_suffix(".new")), weights)
        else:
            weights.unlink()
            weights.symlink_to(evil)
        swapped.append(True)
        return out

    monkeypatch.setattr(where, "verify_manifest", verify_then_swap)
    got = [r["score"] for r in Monitor.load(copy).score(convs)]
    assert swapped and got == pytest.approx(honest, abs=1e-6)  # the bytes that were hashed, not the swapped ones


def test_push_verifies_the_bundle_and_uploads_the_verified_bytes(bundle, tmp_path, monkeypatch, capsys):
    from unittest import mock

    import eval.run.bundle as bundle_mod
    import huggingface_hub

    copy = tmp_path / "b"
    shutil.copytree(bundle[0], copy)
    fusion = copy / "fusion.json"
    good = fusion.read_bytes()
    api = mock.MagicMock()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    fusion.write_bytes(good.replace(b"{", b"{ ", 1))  # edited, the manifest not
    assert moodguard(["push", str(copy), "--repo-id", "org/b"]) == 2
    line = one_error_line(capsys.readouterr().err, "push")
    assert f"{fusion}: sha256 does not match manifest.json" in line
    assert api.upload_folder.call_count == 0 and api.create_repo.call_count == 0
    # the bytes uploaded are the ones verified, even if the file changes right after the check
    fusion.write_bytes(good)
    uploaded = {}

    def upload_folder(*, folder_path, **_kw):
        uploaded.update({p.relative_to(folder_path).as_posix(): p.read_bytes()
                         for p in Path(folder_path).rglob("*") if p.is_file()})

    api.upload_folder.side_effect = upload_folder
    import eval.run.bundle_check as check_mod

    where = check_mod if hasattr(check_mod, "verify_manifest") else bundle_mod
    real_verify = where.verify_manifest

    def verify_then_swap(*args, **kwargs):
        out = real_verify(*args, **kwargs)
        fusion.write_bytes(b'{"evil": true}')
        return out

    monkeypatch.setattr(where, "verify_manifest", verify_then_swap)
    assert moodguard(["push", str(copy), "--repo-id", "org/b"]) == 0
    assert uploaded["fusion.json"] == good and "manifest.json" in uploaded


# ----------------------------------------------------------------------------- 5, 7: what --out may replace
def rows_of(path: Path) -> list[dict]:
    """The output rows without their wall time (the only field that differs between runs)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        r.pop("latency_s")
    return rows


def interrupted(monkeypatch, after_chunks: int):
    """Make ``score`` stop (Ctrl-C) when it starts scoring chunk ``after_chunks`` (0-based)."""
    import eval.run.streaming as streaming

    real = streaming.score_chunk
    calls = []

    def score_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) > after_chunks:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "score_chunk", score_chunk)
    return lambda: monkeypatch.setattr(streaming, "score_chunk", real)


def interrupted_run(bundle, tmp_path: Path, monkeypatch, n_rows: int, chunk: int, stop: int):
    """A reference run and a run of the same rows stopped (Ctrl-C, exit 130) when it starts
    chunk ``stop``: ``(argv without --out, reference output, interrupted output)``."""
    inp = write_input(tmp_path / "in.jsonl", n_rows)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "scores.jsonl"
    base = ["score", "--monitor", str(bundle[0]), str(inp), "--chunk-size", str(chunk)]
    assert moodguard([*base, "--out", str(ref)]) == 0
    restore = interrupted(monkeypatch, stop)
    assert moodguard([*base, "--out", str(out)]) == 130
    restore()
    return base, ref, out


def test_score_out_that_resolves_to_the_input_is_refused(bundle, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", 4)
    before = inp.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    hard = tmp_path / "sub" / "hard.jsonl"
    hard.parent.mkdir()
    os.link(inp, hard)
    for out, extra in ((inp, []), (tmp_path / "sub" / ".." / "in.jsonl", []), (link, []), (hard, []),
                       (inp, ["--overwrite"]), (hard, ["--overwrite"])):  # not even when asked to overwrite
        assert moodguard(["score", "--monitor", str(bundle[0]), str(inp), "--out", str(out), *extra]) == 2
        line = one_error_line(capsys.readouterr().err, "score")
        assert f"{out}: --out is the input file" in line
        assert inp.read_bytes() == before
    assert inp.read_bytes() == before and link.is_symlink() and hard.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["hard.jsonl", "in.jsonl", "link.jsonl", "sub"]


def test_a_complete_output_is_never_replaced_without_overwrite(bundle, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", 10)
    out = tmp_path / "scores.jsonl"
    base = ["score", "--monitor", str(bundle[0]), str(inp), "--out", str(out)]
    assert moodguard(base) == 0
    complete = out.read_bytes()
    capsys.readouterr()
    for extra in ([], ["--resume"], ["--shard", "1/2", "--resume"], ["--shard", "0/2"]):
        assert moodguard([*base, *extra]) == 2
        line = one_error_line(capsys.readouterr().err, "score")
        assert f"{out}: --out already exists" in line and "--overwrite" in line
        assert out.read_bytes() == complete
    assert moodguard([*base, "--shard", "1/2", "--overwrite"]) == 0  # asked for: replaced
    assert [r["id"] for r in rows_of(out)] == [f"r{i}" for i in range(5, 10)]


def test_an_earlier_runs_chunks_need_resume_or_overwrite(bundle, tmp_path, monkeypatch, capsys):
    from eval.run.streaming import parts_dir

    base, ref, out = interrupted_run(bundle, tmp_path, monkeypatch, 12, 4, 2)  # 2 of 3 chunks committed
    parts = parts_dir(out)
    kept = {p.name: p.read_bytes() for p in parts.iterdir()}
    assert {"meta.json", "chunk-000000.jsonl", "chunk-000001.jsonl"} <= set(kept)
    capsys.readouterr()
    assert moodguard([*base, "--out", str(out)]) == 2  # formerly: the chunks silently discarded
    line = one_error_line(capsys.readouterr().err, "score")
    assert f"{parts}: holds 2 committed chunk(s)" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in parts.iterdir()} == kept and not out.exists()
    assert moodguard([*base, "--out", str(out), "--resume"]) == 0
    assert "resuming: 2 of 3 chunks" in capsys.readouterr().err
    assert rows_of(out) == rows_of(ref) and not parts.exists()
    # --overwrite over an interrupted run: its chunks are dropped, everything scored again
    out.unlink()
    restore = interrupted(monkeypatch, 1)
    assert moodguard([*base, "--out", str(out)]) == 130
    restore()
    capsys.readouterr()
    assert moodguard([*base, "--out", str(out), "--overwrite"]) == 0
    assert "resuming" not in capsys.readouterr().err and rows_of(out) == rows_of(ref) and not parts.exists()
    # stopped before any chunk was committed (meta.json only): nothing to lose, no flag needed
    out.unlink()
    restore = interrupted(monkeypatch, 0)
    assert moodguard([*base, "--out", str(out)]) == 130
    restore()
    assert [p.name for p in parts.iterdir()] == ["meta.json"]
    assert moodguard([*base, "--out", str(out)]) == 0 and rows_of(out) == rows_of(ref) and not parts.exists()


def test_a_symlinked_parts_folder_is_refused_naming_it(bundle, tmp_path, capsys):
    inp = write_input(tmp_path / "in.jsonl", 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("x")
    out = tmp_path / "scores.jsonl"
    parts = tmp_path / ".scores.jsonl.parts"
    parts.symlink_to(elsewhere)
    for extra in ([], ["--resume"], ["--overwrite"]):
        assert moodguard(["score", "--monitor", str(bundle[0]), str(inp), "--out", str(out), *extra]) == 2
        line = one_error_line(capsys.readouterr().err, "score")
        assert f"{parts}: the chunk folder of --out is a symlink" in line
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"] and not out.exists()


# ----------------------------------------------------------------------------- 3. resume trusts no chunk
def test_resume_rescores_damaged_chunks_and_says_so(bundle, tmp_path, monkeypatch, capsys):
    from eval.run.streaming import parts_dir

    base, ref, out = interrupted_run(bundle, tmp_path, monkeypatch, 40, 5, 7)  # chunks 0-6 of 8 committed
    parts = parts_dir(out)
    c = [parts / f"chunk-{k:06d}.jsonl" for k in range(8)]
    c[1].write_bytes(c[1].read_bytes()[:-40])  # truncated mid-row: formerly 35 of 40 rows
    c[2].write_bytes(b"")  # empty: formerly 30 rows
    a, b = c[3].read_bytes(), c[4].read_bytes()
    c[3].write_bytes(b)  # swapped: formerly out of order
    c[4].write_bytes(a)
    rows = [json.loads(x) for x in c[5].read_text().splitlines()]
    rows[2]["score"] = -123.0  # edited: formerly copied through
    c[5].write_text("".join(json.dumps(r) + "\n" for r in rows))
    c[6].unlink()  # deleted
    (parts / "notes.txt").write_text("a stray file")
    capsys.readouterr()
    assert moodguard([*base, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    said = re.findall(r"chunk-(\d{6})\.jsonl: (.*?): rescoring its 5 rows", err)
    assert [int(k) for k, _ in said] == [1, 2, 3, 4, 5, 6], err
    assert "missing" in said[-1][1] and all("chunk-000000" not in ln for ln in err.splitlines())
    assert rows_of(out) == rows_of(ref)  # 40 rows, input order, the scores the bundle gives
    assert (parts / "notes.txt").read_text() == "a stray file"  # not ours: left where it was, and said
    assert [p.name for p in parts.iterdir()] == ["notes.txt"] and "moodguard did not write" in err


def test_chunks_are_fsynced_with_their_folder_before_the_rename(bundle, tmp_path, monkeypatch):
    from mood_data import atomic

    inp = write_input(tmp_path / "in.jsonl", 6)
    out = tmp_path / "scores.jsonl"
    events: list[tuple[str, str]] = []
    real_fsync, real_commit = os.fsync, atomic._commit

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def commit(tmp, path):
        events.append(("rename", str(path)))
        return real_commit(tmp, path)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(atomic, "_commit", commit)
    assert moodguard(["score", "--monitor", str(bundle[0]), str(inp), "--out", str(out), "--chunk-size", "3"]) == 0
    parts = str(tmp_path / ".scores.jsonl.parts")
    for target in (f"{parts}/chunk-000000.jsonl", f"{parts}/chunk-000001.jsonl", str(out)):
        i = events.index(("rename", target))
        folder = str(Path(target).parent)
        before = events[:i]
        tmp = [p for kind, p in before if kind == "fsync" and Path(p).name.startswith(f".{Path(target).name}.")]
        assert tmp and ("fsync", folder) in before, (target, before)  # its data and its folder, then the rename
        assert events[i + 1] == ("fsync", folder)  # and the rename itself


# ----------------------------------------------------------------------------- 6. export --out
def test_export_never_deletes_a_folder_it_did_not_write(bundle, tmp_path, monkeypatch, capsys):
    _, _, recipe = bundle
    export = ["export", "--recipe", str(recipe), "--monitor", "guard+maha+ppl"]
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("two years of work\n")
    (mine / "figures").mkdir()
    (mine / "figures" / "a.png").write_bytes(b"png")
    assert moodguard([*export, "--out", str(mine)]) == 2  # formerly: its contents deleted
    line = one_error_line(capsys.readouterr().err, "export")
    assert f"{mine}: --out exists and is a folder that is not a moodguard bundle" in line and "--overwrite" in line
    assert (mine / "chapter1.tex").read_text() == "two years of work\n" and (mine / "figures" / "a.png").exists()
    # the folder the command runs from (and any folder holding it) is refused even with --overwrite
    monkeypatch.chdir(mine / "figures")
    for out in (".", "..", str(mine)):
        assert moodguard([*export, "--out", out, "--overwrite"]) == 2
        assert "holds the working folder" in one_error_line(capsys.readouterr().err, "export")
    monkeypatch.chdir(tmp_path)
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["chapter1.tex", "figures",
                                                                                "figures/a.png"]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes\n")
    assert moodguard([*export, "--out", str(a_file)]) == 2
    assert "--out exists and is a file" in one_error_line(capsys.readouterr().err, "export")
    assert a_file.read_text() == "notes\n"
    # a bundle moodguard wrote is replaced (its own files only); one holding a file it did not
    # write is no longer "ours"
    out = tmp_path / "bundle"
    assert moodguard([*export, "--out", str(out)]) == 0
    assert moodguard([*export, "--out", str(out)]) == 0
    (out / "my-notes.md").write_text("mine\n")
    assert moodguard([*export, "--out", str(out)]) == 2
    capsys.readouterr()
    # --overwrite: the bundle is written, what was there is moved aside, never deleted
    assert moodguard([*export, "--out", str(mine), "--overwrite"]) == 0
    err = capsys.readouterr().err
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("thesis.moodguard-old-")]
    assert len(aside) == 1 and str(aside[0]) in err
    assert (aside[0] / "chapter1.tex").read_text() == "two years of work\n"
    assert (mine / "manifest.json").is_file() and not (mine / "chapter1.tex").exists()
    from eval.run.bundle import verify_manifest

    verify_manifest(mine)


def test_replacing_a_bundle_deletes_only_its_own_files(bundle, tmp_path, capsys):
    from eval.run.bundle import dispose_replaced, own_bundle_files

    ours = tmp_path / "ours"
    shutil.copytree(bundle[0], ours)
    assert own_bundle_files(ours) is not None
    dispose_replaced(tmp_path / "out")(ours)
    assert not ours.exists() and capsys.readouterr().err == ""  # all its own: gone
    raced = tmp_path / "raced"
    shutil.copytree(bundle[0], raced)
    (raced / "stats" / "mine.txt").write_text("added after the check\n")
    assert own_bundle_files(raced) is None
    dispose_replaced(tmp_path / "out")(raced)
    aside = next(tmp_path.glob("out.moodguard-old-*"))
    assert (aside / "stats" / "mine.txt").read_text() == "added after the check\n"
    assert str(aside) in capsys.readouterr().err


# ----------------------------------------------------------------------------- orphans
HOLDER = """
import subprocess, sys
from mood_data.runlock import output_lock
from mood_data.children import run_child
with output_lock(sys.argv[1]):
    sys.exit(run_child([sys.executable, "-c", sys.argv[2], sys.argv[1]], dict(__import__("os").environ)))
"""
SHARING_HOLDER = """
import subprocess, sys
from mood_data.runlock import output_lock, shared_with_children
with output_lock(sys.argv[1]), shared_with_children():  # a plain child: it does not die with us
    sys.exit(subprocess.call([sys.executable, "-c", sys.argv[2], sys.argv[1]]))
"""
WRITER = """
import os, sys, time
from mood_data.children import die_with_launcher
if len(sys.argv) > 2:
    die_with_launcher()
from mood_data.runlock import output_lock
with output_lock(sys.argv[1]):  # inherited from the holder: joined, not re-taken
    print(os.getpid(), flush=True)
    time.sleep(300)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie no one reaped is dead
    except FileNotFoundError:
        return True


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (``/proc``)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = _parent(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and not _gone(c)]
        out += kids
        todo += kids
    return out


def _wait_gone(pid: int, limit: float = 60.0) -> bool:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if _gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_lock_is_held_by_the_process_that_writes(tmp_path):
    """The holder SIGKILLed while the process it started still writes: the output stays locked
    (formerly the lock went with the holder and a second writer was let in)."""
    from mood_data.errors import OutputError
    from mood_data.runlock import output_lock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", SHARING_HOLDER, str(run), WRITER], env=_env(),
                              stdout=subprocess.PIPE, text=True)
    writer = int(holder.stdout.readline())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert not _gone(writer)  # this writer did not ask to die with its parent
        with pytest.raises(OutputError, match=f"{re.escape(str(run.resolve()))}: in use by another moodguard process"):
            with output_lock(run):
                pass
    finally:
        os.kill(writer, signal.SIGKILL)
    assert _wait_gone(writer)
    with output_lock(run):  # the last writer gone: free again
        pass


def test_started_processes_die_with_the_command_that_started_them(tmp_path):
    """SIGKILL on the moodguard process: the launcher it started gets SIGKILL from the kernel,
    and the rank that launcher started dies with it (PR_SET_PDEATHSIG), so nothing keeps
    writing after the command that owns the output is gone. Chain: holder -> launcher -> rank."""
    from mood_data.runlock import output_lock

    launcher = ("import subprocess, sys\n"
                "from mood_data.children import die_with_launcher\n"
                "die_with_launcher()\n"
                "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], 'rank']).wait()\n")
    holder_code = HOLDER.replace("[sys.executable, \"-c\", sys.argv[2], sys.argv[1]]",
                                 "[sys.executable, \"-c\", sys.argv[2], sys.argv[3], sys.argv[1]]")
    assert holder_code != HOLDER
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(run), launcher, WRITER], env=_env(),
                              stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    rank = int(holder.stdout.readline())  # the grandchild, writing under a share of the lock
    launcher_pid = _parent(rank)
    try:
        assert _parent(launcher_pid) == holder.pid  # rank -> launcher -> holder
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        assert _wait_gone(launcher_pid), "the launcher outlived the command that started it"
        assert _wait_gone(rank), "the rank outlived its launcher"
    finally:  # never leave a sleeper behind, even when the test fails
        for pid in (rank, launcher_pid):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    with output_lock(run):
        pass


@pytest.mark.slow
def test_score_ranks_die_with_a_killed_score_and_keep_its_output_locked_meanwhile(bundle, tmp_path):
    """The real thing: `score --num-processes 2` (accelerate launch, 2 gloo ranks), SIGKILL on
    the `score` process while the ranks write: launcher and ranks are gone (formerly both ranks
    kept writing for ~30 s after the lock was released), then a resumed run completes."""
    inp = write_input(tmp_path / "in.jsonl", 1200)
    out = tmp_path / "scores.jsonl"
    argv = ["score", "--monitor", str(bundle[0]), str(inp), "--out", str(out), "--chunk-size", "8"]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moodguard.cli", *argv, "--num-processes", "2", "--device", "cpu"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / ".scores.jsonl.parts"
    end = time.monotonic() + 400
    while not (parts / "chunk-000001.jsonl").exists() and proc.poll() is None and time.monotonic() < end:
        time.sleep(0.2)
    below = _descendants(proc.pid)
    try:
        assert proc.poll() is None and len(below) >= 3, proc.stderr.read()[-2000:] if proc.poll() else below
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert all(_wait_gone(p) for p in below), [p for p in below if not _gone(p)]
        assert not out.exists()  # formerly the orphaned ranks went on and wrote it
    finally:
        for p in below:
            if not _gone(p):
                os.kill(p, signal.SIGKILL)
    assert moodguard([*argv, "--resume"]) == 0
    assert [r["id"] for r in rows_of(out)] == [f"r{i}" for i in range(1200)]
