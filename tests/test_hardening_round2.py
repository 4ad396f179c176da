"""Issue 14 (security and reliability, round 2): the guarantees that need more than one command
line of tests/bad_inputs/cases.yaml — code execution from a bundle's base folder, output-folder
locks, checkpoint choice on --resume, disk full, FIFOs, file modes, SIGTERM, the left character
cut of very long conversations, checksummed caches and fail-closed NaN scores."""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moodguard.cli import main as moodguard

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "tests" / "bad_inputs"
CONV = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello there<end_of_turn>\n"


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


PROGRESS = re.compile(r"\d+%\|")


def one_error_line(err: str, command: str) -> str:
    """The one error line: no traceback, exactly one ``moodguard <cmd>: error:`` line, and it is
    the last thing printed (progress bars and library log lines of a long run may precede it)."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and not PROGRESS.search(ln)]
    errors = [ln for ln in lines if ln.startswith(f"moodguard {command}: error: ")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def hidden_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".staging"))]


# ----------------------------------------------------------------------------- trust_remote_code
def evil_base(tiny_model_dir: Path, root: Path, marker: Path) -> Path:
    """The tiny base model, plus an ``auto_map`` to its own Python file that writes ``marker``
    when imported: what a hostile bundle's base folder would carry."""
    base = root / "evil-base"
    shutil.copytree(tiny_model_dir, base)
    (base / "evil_model.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("code from the bundle ran")
        from transformers import LlamaForCausalLM as EvilForCausalLM
        from transformers import LlamaConfig as EvilConfig
    """))
    cfg = json.loads((base / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil_model.EvilConfig", "AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def test_bundle_never_runs_its_base_models_code_unless_asked(bundle, tiny_model_dir, tmp_path, capsys):
    from eval.run.bundle import write_manifest

    folder, _, _ = bundle
    marker = tmp_path / "PWNED"
    base = evil_base(tiny_model_dir, tmp_path, marker)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "conversation": CONV}) + "\n")

    def variant(name: str, trust) -> Path:
        b = tmp_path / name
        shutil.copytree(folder, b)
        spec = json.loads((b / "monitor.json").read_text())
        spec.update(base=str(base), trust_remote_code=trust)
        (b / "monitor.json").write_text(json.dumps(spec))
        write_manifest(b)
        return b

    # asks for it: refused without the flag, nothing executed, nothing written
    asking = variant("asking", True)
    assert moodguard(["score", "--monitor", str(asking), str(inp), "--out", str(tmp_path / "o1.jsonl")]) == 2
    assert "field 'trust_remote_code'" in one_error_line(capsys.readouterr().err, "score")
    # the string "false" (truthy in Python) is refused too
    stringy = variant("stringy", "false")
    assert moodguard(["score", "--monitor", str(stringy), str(inp), "--out", str(tmp_path / "o2.jsonl")]) == 2
    assert "expected true or false" in one_error_line(capsys.readouterr().err, "score")
    # says false: the auto_map is ignored (the built-in Llama class loads), the code never runs
    honest = variant("honest", False)
    assert moodguard(["score", "--monitor", str(honest), str(inp), "--out", str(tmp_path / "o3.jsonl")]) == 0
    capsys.readouterr()
    assert not marker.exists() and not (tmp_path / "o1.jsonl").exists() and not (tmp_path / "o2.jsonl").exists()
    # the vector is real: with the explicit flag, the bundle's code does run (so the test can fail).
    # In a subprocess: loading remote code registers the class for auto-saving inside transformers
    # (LlamaForCausalLM._auto_class), which would break later save_pretrained calls of this process
    subprocess.run([sys.executable, "-m", "moodguard.cli", "score", "--monitor", str(asking), str(inp), "--out",
                    str(tmp_path / "o4.jsonl"), "--trust-remote-code"], env=_env(), capture_output=True, timeout=300)
    assert marker.exists()


def test_recipe_key_alone_never_turns_trust_remote_code_on(tmp_path, capsys):
    from train import recipe as recipe_mod

    path = tmp_path / "r.yaml"
    path.write_text(f"base: {REPO / 'recipes' / 'tiny' / 's.yaml'}\ntrust_remote_code: true\n")
    recipe_mod._WARNED_TRUST.clear()
    r1 = recipe_mod.load_recipe(path)
    r2 = recipe_mod.load_recipe(path)
    warn = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert r1.trust_remote_code is False and r2.trust_remote_code is False
    assert len(warn) == 1 and "key 'trust_remote_code'" in warn[0] and "ignored" in warn[0]  # once
    recipe_mod._WARNED_TRUST.clear()
    r3 = recipe_mod.load_recipe(path, trust_remote_code=True)
    assert r3.trust_remote_code is True and "will run" in capsys.readouterr().err
    # the flag is what turns it on; without a recipe key there is nothing to warn about
    plain = tmp_path / "p.yaml"
    plain.write_text(f"base: {REPO / 'recipes' / 'tiny' / 's.yaml'}\n")
    assert recipe_mod.load_recipe(plain, trust_remote_code=True).trust_remote_code is True
    assert recipe_mod.load_recipe(plain).trust_remote_code is False
    assert capsys.readouterr().err == ""


def test_relaunched_training_gets_the_flag_not_the_file():
    from train.launch import relaunch_flags
    from train.recipe import load_recipe

    r = load_recipe(REPO / "recipes" / "tiny" / "s.yaml")
    assert relaunch_flags(r, resume=True) == ["--resume"]
    r.trust_remote_code = True  # what load_recipe(..., trust_remote_code=True) sets
    assert relaunch_flags(r, resume=False) == ["--trust-remote-code"]


# ----------------------------------------------------------------------------- NaN fails closed
def test_unscorable_row_is_an_error_and_json_never_gets_nan(bundle, tmp_path):
    from eval.run.bundle import Monitor, UnscorableRow
    from mood_data import atomic
    from mood_data.errors import OutputError

    mon = Monitor.load(bundle[0])
    with pytest.raises(UnscorableRow) as exc:
        mon.score([CONV, "x"])  # "x": one token, nothing for perplexity to predict
    assert exc.value.index == 1 and exc.value.detector == "ppl" and math.isnan(exc.value.value)
    out = tmp_path / "a.json"
    for bad in ({"a": {"b": [1.0, float("nan")]}}, {"s": np.float64("inf")}):
        with pytest.raises(OutputError, match=r"a.json: field '(a.b\[1\]|s)': not a finite number"):
            atomic.write_json(out, bad)
    with pytest.raises(OutputError, match=r"a.json: row 2: field 'score'"):
        atomic.write_jsonl(out, [{"score": 1.0}, {"score": float("-inf")}])
    assert list(tmp_path.iterdir()) == []  # no file, no temporary


def test_fusion_names_the_row_and_detector():
    from eval.engine.fusion import Fusion
    from mood_data.errors import DataError

    s = {"guard": np.array([0.1, 0.2, 0.3, 0.4]), "ppl": np.array([1.0, 2.0, np.nan, 3.0])}
    with pytest.raises(DataError, match=r"row 3 of the calibration rows: field 'ppl': score is nan"):
        Fusion.fit("mean", s, np.array([0, 0, 1, 1]), ["hh-rlhf-helpful"] * 4)


# ----------------------------------------------------------------------------- locks
HOLD = """
import sys, time
from mood_data.runlock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_writer_gets_the_holders_pid_and_stale_locks_are_taken_over(tmp_path, capsys):
    from mood_data.errors import OutputError
    from mood_data.runlock import lock_path, output_lock

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        recipe = HERE / "recipes" / "tiny_ok.yaml"
        assert moodguard(["fit", "--recipe", str(recipe), f"output_dir={run}"]) == 2
        line = one_error_line(capsys.readouterr().err, "fit")
        assert f"pid {holder.pid}" in line and str(run) in line
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            with output_lock(run):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup, the lock file stays with a dead pid in it
        holder.wait()
    assert lock_path(run.resolve()).read_text().strip() == str(holder.pid)
    with output_lock(run):  # stale: the kernel dropped the flock with the process
        assert lock_path(run.resolve()).read_text().strip() == str(os.getpid())
        with output_lock(run):  # re-entrant within one process
            pass
    assert not lock_path(run.resolve()).exists()  # released and removed


def test_output_dir_that_cannot_be_a_folder(tmp_path):
    from mood_data.errors import OutputError
    from mood_data.runlock import output_lock

    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        with output_lock(f, "output_dir"):
            pass
    with pytest.raises(OutputError, match="cannot be written"):
        with output_lock("/proc/moodguard-x/run", "output_dir"):
            pass
    with output_lock(tmp_path / "a" / "b" / "c"):  # created for the run ...
        assert (tmp_path / "a" / "b" / "c").is_dir()
    assert not (tmp_path / "a").exists()  # ... and removed again when nothing was written


# ----------------------------------------------------------------------------- checkpoints
def fake_checkpoint(ckpt_dir: Path, step: int, *, corrupt: str | None = None) -> Path:
    from safetensors.numpy import save_file

    c = ckpt_dir / f"checkpoint-{step}"
    c.mkdir(parents=True)
    save_file({"w": np.ones(3, dtype=np.float32)}, str(c / "adapter_model.safetensors"))
    (c / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if corrupt == "weights":
        (c / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    elif corrupt == "state":
        (c / "trainer_state.json").write_text("{truncated")
    elif corrupt == "incomplete":
        (c / "trainer_state.json").unlink()
    return c


def test_resume_point(tmp_path, capsys):
    from mood_data.errors import OutputError, RecipeError
    from train.checkpoints import RECIPE_FILE, resume_point, staging_dir
    from train.recipe import load_recipe

    recipe = load_recipe(HERE / "recipes" / "tiny_ok.yaml", [f"output_dir={tmp_path / 'run'}"])
    ckpt = tmp_path / "run" / "checkpoints" / "guard"
    assert resume_point(recipe, "guard", ckpt, resume=False) is None  # fresh: start at step 0
    assert json.loads((ckpt / RECIPE_FILE).read_text())["guard"]["learning_rate"] == recipe.guard.learning_rate
    good = fake_checkpoint(ckpt, 2)
    # a rerun without --resume over existing checkpoints says so (error), never restarts silently
    with pytest.raises(OutputError, match=r"holds 1 checkpoint\(s\) of an earlier run .*pass --resume"):
        resume_point(recipe, "guard", ckpt, resume=False)
    # the newest checkpoint corrupt in three ways: each skipped, with one warning line each
    for step, how in ((4, "weights"), (6, "state"), (8, "incomplete")):
        fake_checkpoint(ckpt, step, corrupt=how)
    capsys.readouterr()
    assert resume_point(recipe, "guard", ckpt, resume=True) == str(good)
    warn = capsys.readouterr().err.splitlines()
    assert [re.search(r"(checkpoint-\d+): skipped for resuming", w).group(1) for w in warn] == \
        ["checkpoint-8", "checkpoint-6", "checkpoint-4"]
    # a different recipe (another learning rate) may not resume these checkpoints
    other = load_recipe(HERE / "recipes" / "tiny_ok.yaml", [f"output_dir={tmp_path / 'run'}", "guard.learning_rate=0.5"])
    lr = recipe.guard.learning_rate
    with pytest.raises(RecipeError, match=rf"--resume refused: .*key 'guard.learning_rate': {lr} in the checkpoints, 0.5 now"):
        resume_point(other, "guard", ckpt, resume=True)
    # book-keeping keys (save/log cadence) do not count as a different recipe
    cadence = load_recipe(HERE / "recipes" / "tiny_ok.yaml", [f"output_dir={tmp_path / 'run'}", "guard.logging_steps=1"])
    assert resume_point(cadence, "guard", ckpt, resume=True) == str(good)
    assert staging_dir(tmp_path, "guard") != staging_dir(tmp_path, "guard")  # no fixed shared name


# ----------------------------------------------------------------------------- disk full
def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def enospc_for(name: str):
    """An atomic commit that fails with a full disk for outputs called ``name`` only."""
    from mood_data import atomic

    real = atomic._commit

    def commit(tmp: Path, path: Path) -> None:
        if path.name == name:
            enospc()
        real(tmp, path)

    return commit


def test_disk_full_during_score_and_export(bundle, tmp_path, monkeypatch, capsys):
    from mood_data import atomic

    folder, _, recipe_path = bundle
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "conversation": CONV}) + "\n")
    monkeypatch.setattr(atomic, "_commit", enospc)
    out = tmp_path / "scored.jsonl"
    assert moodguard(["score", "--monitor", str(folder), str(inp), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err, "score")
    # the first commit of the streamed score fails (its chunk folder's meta.json): named, one line
    assert "scored.jsonl" in line and "No space left on device" in line and "ENOSPC" in line
    bundle_out = tmp_path / "bundle"
    assert moodguard(["export", "--recipe", str(recipe_path), "--monitor", "guard+maha+ppl", "--out", str(bundle_out)]) == 2
    line = one_error_line(capsys.readouterr().err, "export")
    assert "ENOSPC" in line
    assert not out.exists() and not bundle_out.exists()  # nothing half-written ...
    assert [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")] == []  # ... and no temporary left


def test_disk_full_during_training(tiny_model_dir, tiny_dataset_dir, tmp_path, monkeypatch, capsys):
    from test_train_guard import write_tiny_recipe

    from mood_data import atomic

    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                               guard__max_steps=2, guard__save_steps=2)
    monkeypatch.setattr(atomic, "_commit", enospc_for("guard"))  # the disk fills up as the adapter is saved
    assert moodguard(["train", "guard", "--recipe", str(recipe)]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    run = tmp_path / "run"
    assert f"{run / 'guard'}: cannot write (No space left on device, ENOSPC)" in line
    assert (run / "checkpoints" / "guard" / "checkpoint-2").is_dir()  # training itself ran
    assert not (run / "guard").exists() and hidden_temporaries(run) == []


# ----------------------------------------------------------------------------- FIFO, modes, SIGTERM
def test_fifo_input_is_reported_as_a_fifo(bundle, tmp_path, capsys):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)
    assert moodguard(["data", "validate", str(fifo)]) == 2
    assert "is a FIFO (named pipe), not a regular file" in one_error_line(capsys.readouterr().err, "data")
    assert moodguard(["score", "--monitor", str(bundle[0]), str(fifo)]) == 2
    assert "is a FIFO (named pipe)" in one_error_line(capsys.readouterr().err, "score")


def test_written_files_follow_the_umask(tmp_path):
    from mood_data import atomic

    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "a.json", {"x": 1})
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            atomic.write_text(tmp / "f.txt", "x")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "d" / "f.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        atomic.write_text(tmp_path / "b.txt", "x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("sig", ["term", "int"])
def test_sigterm_and_sigint_remove_the_temporary(bundle, tmp_path, sig):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "conversation": CONV}) + "\n")
    out = tmp_path / "out" / "scored.jsonl"
    out.parent.mkdir()
    env = dict(_env(), MOODGUARD_TEST_KILL_AFTER=f"1:{sig}")  # the signal arrives with the temporary complete
    # a child started from a background job inherits SIGINT ignored (and Python then installs no
    # KeyboardInterrupt handler): give it the default disposition, as a terminal's Ctrl-C finds it
    proc = subprocess.run([sys.executable, "-m", "moodguard.cli", "score", "--monitor", str(bundle[0]), str(inp),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    code, said = (128 + signal.SIGTERM, "terminated") if sig == "term" else (130, "interrupted")
    assert proc.returncode == code, proc.stderr[-2000:]
    assert f"moodguard score: {said}" in proc.stderr and "Traceback" not in proc.stderr
    # neither the output nor any hidden temporary (.X.*.tmp); the committed chunk folder
    # (.scored.jsonl.parts, complete files only) is what `score --resume` continues from
    assert not out.exists() and [p for p in out.parent.rglob("*") if p.name.endswith(".tmp")] == []
    assert [p.name for p in out.parent.iterdir()] in ([], [".scored.jsonl.parts"])


# ----------------------------------------------------------------------------- long conversations
def test_left_character_cut_equals_full_tokenisation(tiny_tokenizer, monkeypatch):
    from eval.engine import forward

    rng = np.random.default_rng(0)
    words = ["please", "help", "me", "write", "a", "note", "sure", "here", "is", "how"]
    body = " ".join(rng.choice(words, size=60_000))
    long = f"<start_of_turn>user\n{body}<end_of_turn>\n<start_of_turn>model\n{body[:50_000]}<end_of_turn>\n"
    convs = [CONV, long, long[-3000:]]
    max_length = 48
    seen: list[int] = []
    real = forward._tokenise

    def spy(tok, texts, offsets):
        seen.extend(len(t) for t in texts)
        return real(tok, texts, offsets)

    monkeypatch.setattr(forward, "_tokenise", spy)
    for assistant_only in (False, True):
        seen.clear()
        cut = forward.encode(tiny_tokenizer, convs, max_length, assistant_only=assistant_only)
        assert max(seen) <= forward.CHARS_PER_TOKEN_CUT * max_length  # the 650 kB row was never tokenised whole
        monkeypatch.setattr(forward, "CHARS_PER_TOKEN_CUT", 10 ** 9)  # reference: tokenise everything
        full = forward.encode(tiny_tokenizer, convs, max_length, assistant_only=assistant_only)
        monkeypatch.setattr(forward, "CHARS_PER_TOKEN_CUT", 32)
        assert cut.truncated == full.truncated == [1, 2]
        for a, b in zip(cut.input_ids, full.input_ids):
            assert a.tolist() == b.tolist()
        if assistant_only:
            for a, b in zip(cut.lm_mask, full.lm_mask):
                assert a.tolist() == b.tolist()
            assert cut.lm_mask[1].sum() > 0  # the kept tail lies in the assistant turn


# ----------------------------------------------------------------------------- caches
def test_edited_stats_cache_is_refitted(bundle, tmp_path):
    from eval.engine.detectors.mahalanobis import MahalanobisDetector
    from eval.run.cache import cache_intact
    from eval.run.fitting import fit_detectors
    from train.recipe import load_recipe

    _, eval_dir, recipe_path = bundle
    run = tmp_path / "run"
    shutil.copytree(eval_dir.parents[1], run, ignore=shutil.ignore_patterns("eval"))
    recipe = load_recipe(recipe_path, [f"output_dir={run}"])
    stats = fit_detectors(recipe)["stats"]["maha"]
    d = next(iter(stats.values()))
    original = (d / "maha.safetensors").read_bytes()
    # a valid Mahalanobis fit of the right dimension, but not the one the cache recorded
    dim = MahalanobisDetector.load(d, "maha").meta["d"]
    MahalanobisDetector.fit(np.random.default_rng(1).normal(size=(64, int(dim)))).save(d, "maha")
    assert not cache_intact(d)
    again = fit_detectors(recipe)["stats"]["maha"]
    assert next(iter(again.values())) == d and cache_intact(d)
    assert (d / "maha.safetensors").read_bytes() == original  # refitted, not trusted


def test_bounded_repr_of_an_alias_bomb():
    import yaml

    from mood_data.readers import short_repr

    doc = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(6))
    value = yaml.safe_load(doc)["g"]  # 10**7 leaves when expanded
    assert len(short_repr(value)) < 200


def test_evaluate_names_the_unscorable_test_row(bundle, tiny_dataset_dir, tmp_path, capsys):
    """A one-token test row: perplexity has nothing to predict. evaluate stops naming the
    source, the row and the id instead of fusing a NaN (formerly: "fusion: NaN detector scores
    in the fit rows", no file, no row) and writes no run folder."""
    _, eval_dir, recipe_path = bundle
    run = tmp_path / "run"
    shutil.copytree(eval_dir.parents[1], run, ignore=shutil.ignore_patterns("eval"))
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_dataset_dir / "train.jsonl", data / "train.jsonl")
    rows = (tiny_dataset_dir / "test.jsonl").read_text().splitlines()
    rows.insert(3, json.dumps({"id": "tiny", "conversation": "x", "domain": "hh-rlhf-helpful", "malign": 0}))
    (data / "test.jsonl").write_text("\n".join(rows) + "\n")
    code = moodguard(["evaluate", "--recipe", str(recipe_path), "--monitors", "guard+ppl", "--source", str(data),
                      f"output_dir={run}"])
    line = one_error_line(capsys.readouterr().err, "evaluate")
    assert code == 2
    assert f"{data} (test split): row 4 (id 'tiny'): field 'conversation': detector 'ppl' score is nan" in line
    assert not (run / "eval").exists()
