"""Data-parallel evaluate / score (2 gloo ranks on CPU) equal one process; streamed score:
--resume after a SIGKILL scores every id exactly once, --shard i/N splits a file.

The 2-rank runs go through ``--num-processes 2`` (re-exec under ``accelerate launch`` with the
MULTI_GPU + ACCELERATE_USE_CPU config that really starts 2 gloo ranks here; see
accelerate_configs/cpu.yaml); ``meta.json`` records the world size each run saw.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moodguard.cli import main as moodguard
from test_interrupts import adapters, hidden_leftovers, ids_of, killed, new_run, visible  # noqa: F401 (fixture)
from test_train_distributed import env as subprocess_env

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVAL = ["--monitors", "guard,guard+maha,guard+ppl", "--n-boot", "20", "--no-plots"]
FIGURES: dict[str, float] = {}


def launched(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "moodguard.cli", *argv, "--num-processes", "2", "--device", "cpu"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate.commands.launch" in proc.stderr and "--num_processes 2" in proc.stderr
    return proc


def results(folder: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (folder / "results.jsonl").read_text().splitlines())}


def max_abs_diff(a: dict[str, dict], b: dict[str, dict], relative: bool = False) -> float:
    """Largest |score difference| over the fused score and every detector score, same ids
    (``relative``: divided by max(1, |score|))."""
    assert list(a) == list(b)  # same ids, same (original) order
    def floats(row: dict, prefix: str = "") -> dict[str, float]:
        out = {}
        for k, v in row.items():
            if isinstance(v, dict):
                out.update(floats(v, f"{prefix}{k}."))
            elif isinstance(v, float) and k not in ("latency_s",):  # wall time, not a score
                out[prefix + k] = v
        return out

    diffs = [0.0]
    for i in a:
        fa, fb = floats(a[i]), floats(b[i])
        assert fa.keys() == fb.keys() and "score" in fa
        diffs += [abs(fa[k] - fb[k]) / (max(1.0, abs(fa[k])) if relative else 1.0) for k in fa]
    return max(diffs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, tiny_dataset_dir, adapters):  # noqa: F811
    """The same run evaluated by one process and by two: ``(tmp, one, two)``."""
    tmp = tmp_path_factory.mktemp("parallel")
    r1, one = new_run(tmp, "one", tiny_model_dir, tiny_dataset_dir, adapters)
    r2, two = new_run(tmp, "two", tiny_model_dir, tiny_dataset_dir, adapters)
    assert moodguard(["evaluate", "--recipe", str(r1), *EVAL]) == 0
    launched(["evaluate", "--recipe", str(r2), *EVAL], tmp)
    return tmp, (r1, one), (r2, two)


def test_evaluate_two_processes_equal_one(runs, tiny_dataset_dir):
    _, (_, one), (_, two) = runs
    worst = 0.0
    for monitor in ("guard", "guard+maha", "guard+ppl"):
        a, b = one / "eval" / monitor, two / "eval" / monitor
        assert json.loads((a / "meta.json").read_text())["num_processes"] == 1
        assert json.loads((b / "meta.json").read_text())["num_processes"] == 2
        ra, rb = results(a), results(b)
        assert sorted(rb) == sorted(ids_of(tiny_dataset_dir))  # every test id exactly once
        d = max_abs_diff(ra, rb)
        assert d <= 1e-5, (monitor, d)
        worst = max(worst, d)
        ma, mb = (json.loads((x / "analysis.json").read_text()) for x in (a, b))
        assert ma == mb, monitor  # thresholds, TPRs, AUROCs, intervals: equal
    FIGURES["evaluate_max_abs_score_diff"] = worst
    # the fitted statistics (fit ran on 2 ranks too) are the same files
    s1 = sorted(p.relative_to(one).as_posix() for p in (one / "stats").rglob("*.safetensors"))
    s2 = sorted(p.relative_to(two).as_posix() for p in (two / "stats").rglob("*.safetensors"))
    assert s1 == s2 and s1
    from safetensors.numpy import load_file

    for rel in s1:
        t1, t2 = load_file(str(one / rel)), load_file(str(two / rel))
        assert t1.keys() == t2.keys()
        for k in t1:
            np.testing.assert_allclose(t2[k], t1[k], rtol=1e-6, atol=1e-8, err_msg=f"{rel}:{k}")
    print(f"\n2-process evaluate: max |score diff| {worst:.3g}, analysis.json equal for 3 monitors")


def test_score_two_processes_equal_one_and_resume_and_shards(runs, tiny_dataset_dir):
    tmp, (r1, _), _ = runs
    bundle = tmp / "bundle"
    assert moodguard(["export", "--recipe", str(r1), "--monitor", "guard+maha", "--out", str(bundle)]) == 0
    inp = tiny_dataset_dir / "test.jsonl"
    ids = ids_of(tiny_dataset_dir)
    ref = tmp / "score1" / "s.jsonl"
    assert moodguard(["score", "--monitor", str(bundle), str(inp), "--out", str(ref), "--chunk-size", "10"]) == 0
    rows1 = [json.loads(x) for x in ref.read_text().splitlines()]
    assert [r["id"] for r in rows1] == ids

    # 2 processes
    two = tmp / "score2" / "s.jsonl"
    launched(["score", "--monitor", str(bundle), str(inp), "--out", str(two), "--chunk-size", "10"], tmp)
    rows2 = [json.loads(x) for x in two.read_text().splitlines()]
    d = max_abs_diff({r["id"]: r for r in rows1}, {r["id"]: r for r in rows2})
    assert d <= 1e-5
    assert [r["flags"] for r in rows1] == [r["flags"] for r in rows2]
    FIGURES["score_max_abs_score_diff"] = d
    print(f"\n2-process score: max |score diff| {d:.3g} over {len(rows2)} rows")

    # SIGKILL after the 3rd commit (meta.json, chunk 0, chunk 0 recorded in meta.json), then --resume
    out = tmp / "killed" / "s.jsonl"
    argv = ["score", "--monitor", str(bundle), str(inp), "--out", str(out), "--chunk-size", "10"]
    killed(argv, "3", tmp)
    assert visible(out.parent) == [] and hidden_leftovers(out.parent)  # only the hidden chunk folder
    assert moodguard([*argv, "--resume"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ids  # each id once, in input order
    assert max_abs_diff({r["id"]: r for r in rows1}, {r["id"]: r for r in rows}) <= 1e-6
    assert not (out.parent / f".{out.name}.parts").exists()

    # --shard i/3: disjoint, union = the file, concatenation = the one-job output
    got = []
    for i in range(3):
        part = tmp / "shards" / f"s{i}.jsonl"
        assert moodguard(["score", "--monitor", str(bundle), str(inp), "--out", str(part), "--shard", f"{i}/3"]) == 0
        got.append([json.loads(x) for x in part.read_text().splitlines()])
    shard_ids = [[r["id"] for r in g] for g in got]
    assert all(shard_ids) and sum(len(s) for s in shard_ids) == len(ids)
    assert [i for s in shard_ids for i in s] == ids
    # other chunk boundaries = other length-sorted batches (other padding): float32 noise only
    assert max_abs_diff({r["id"]: r for r in rows1}, {r["id"]: r for g in got for r in g}, relative=True) <= 1e-4


def test_resume_refuses_another_input(runs, tiny_dataset_dir, tmp_path, capsys):
    from eval.run.streaming import parse_shard, shard_rows

    assert [shard_rows(10, (i, 4)) for i in range(4)] == [(0, 2), (2, 5), (5, 7), (7, 10)]
    with pytest.raises(Exception, match="0 <= i < N"):
        parse_shard("4/4")
    tmp = runs[0]
    bundle = tmp / "bundle"
    if not bundle.is_dir():
        pytest.skip("needs the bundle of test_score_two_processes_equal_one_and_resume_and_shards")
    out = tmp_path / "s.jsonl"
    parts = tmp_path / ".s.jsonl.parts"
    parts.mkdir()
    (parts / "meta.json").write_text(json.dumps({"format": 1, "input_sha256": "0" * 64, "shard": [0, 1],
                                                 "rows": [0, 1], "chunk": 512, "bundle_manifest": ""}))
    rc = moodguard(["score", "--monitor", str(bundle), str(tiny_dataset_dir / "test.jsonl"), "--out", str(out),
                    "--resume"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moodguard score: error:") and "input_sha256" in err and "cannot resume" in err
    assert not out.exists()
