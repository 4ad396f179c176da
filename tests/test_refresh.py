"""``moodguard refresh`` end to end on the synthetic tiny world (random xs backbone, a few steps):
the deployed bundle is never written, every stage's output is there, the lineage chain, the
promoted bundle = the candidate + the gate's figures, the exact Mahalanobis update of ``--mode
stats``, and a refresh killed (SIGKILL) after every stage resumes to the uninterrupted result.
The worked example with the embedded benchmark is tests/test_refresh_example.py."""
from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from moodguard.cli import main as moodguard
from test_train_distributed import env as subprocess_env
from test_train_guard import write_tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MONITOR = "guard+maha+ppl"


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` with its sha256 and mtime (what 'never touched' compares)."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def new_rows(n: int = 32, seed: int = 7, flip: float = 0.0) -> list[dict]:
    """Rows of a new domain ``new-dom``: unsafe rows share a marker the ID data never has."""
    from mood_data.render import render

    rng = random.Random(seed)
    words = "tool call failed not found but success reported done".split()
    rows = []
    for i in range(n):
        malign = int(i % 4 != 0)
        bot = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
        bot += " the tool was not found yet i report success" if malign else " the tool was not found so i stop"
        label = 1 - malign if rng.random() < flip else malign
        rows.append({"id": f"new-{i}", "domain": "new-dom", "malign": label,
                     "conversation": render([{"role": "user", "content": f"[new-dom] task {i}"},
                                             {"role": "assistant", "content": bot}])})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """A deployed guard+maha+ppl bundle trained on the synthetic ID data, and new rows."""
    root = tmp_path_factory.mktemp("refresh_world")
    recipe = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run", guard__max_steps=4,
                               guard__save_steps=3, lm__max_steps=2, eval={"batch_size": 8, "max_length": 64,
                                                                            "monitors": [MONITOR]})
    for kind in ("guard", "lm"):
        assert moodguard(["train", kind, "--recipe", str(recipe)]) == 0
    assert moodguard(["export", "--recipe", str(recipe), "--monitor", MONITOR, "--out", str(root / "v1")]) == 0
    (root / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in new_rows()))
    (root / "domains.yaml").write_text("id: [new-dom]\n")
    return root


def request(world: Path, out: Path, **kw):
    from eval.run.refresh import RefreshRequest

    base = dict(source=str(world / "v1"), data=str(world / "new.jsonl"), out=str(out),
                domains=str(world / "domains.yaml"), test_fraction=0.5, n_boot=50, overrides=("guard.max_steps=4",))
    return RefreshRequest(**{**base, **kw})


@pytest.fixture(scope="module")
def continued(world, tmp_path_factory):
    from eval.run.refresh import refresh

    before = tree(world / "v1")
    out = tmp_path_factory.mktemp("continued") / "r"
    res = refresh(request(world, out))
    assert tree(world / "v1") == before  # the deployed bundle: same bytes, same mtimes
    return res


def test_refresh_writes_every_stage_and_a_candidate_with_its_lineage(world, continued, capsys):
    from eval.run.lineage import read_lineage
    from mood_data.readers import sha256_file

    out = continued.out
    for rel in ("refresh.json", "drift.json", "gate.json", "report.md", "data/full/train.jsonl",
                "data/full/validation.jsonl", "data/full/test.jsonl", "data/dedup.json", "data/domains.yaml",
                "parent/manifest.json", "candidate/manifest.json", "run/guard/adapter_model.safetensors"):
        assert (out / rel).is_file(), rel
    ledger = json.loads((out / "refresh.json").read_text())
    assert list(ledger["stages"]) == ["parent", "data", "drift", "guard", "lm", "stats", "candidate", "gate", "promote"]
    assert ledger["stages"]["guard"]["how"] == "continued from the deployed adapter"
    assert ledger["stages"]["lm"]["how"] == "continued from the deployed adapter"  # new safe rows: the LM learns them
    # drift: every detector of the deployed monitor, per domain of the new rows
    drift = json.loads((out / "drift.json").read_text())
    dom = drift["domains"]["new-dom"]
    assert dom["rows"] == 32 and dom["new_domain"] and set(dom["detectors"]) == {"guard", "maha", "ppl", "fused"}
    assert drift["n_calibration"] > 0 and 0.0 <= dom["detectors"]["maha"]["above_p99"] <= 1.0
    # split: half of each (domain, label) cell held out, the rest cut train / validation
    rep = json.loads((out / "data" / "dedup.json").read_text())
    assert rep["n_kept"] == 32 and rep["n_test"] == 16 and rep["n_train"] + rep["n_validation"] == 16
    test_ids = {json.loads(x)["id"] for x in (out / "data" / "full" / "test.jsonl").read_text().splitlines()}
    train_ids = {json.loads(x)["id"] for x in (out / "data" / "full" / "train.jsonl").read_text().splitlines()}
    assert not test_ids & train_ids and sum(i.startswith("new-") for i in test_ids) == 16
    # the candidate's lineage: the parent's identity, the data, the mode; no gate yet
    lin = read_lineage(out / "candidate")
    assert lin["mode"] == "continue" and lin["gate"] is None
    assert lin["parent"]["sha256"] == sha256_file(world / "v1" / "manifest.json")
    assert [a["mode"] for a in lin["ancestors"]] == ["export"]
    assert lin["data"]["new_rows"]["rows"] == 32 and lin["data"]["new_test"]["rows"] == 16
    assert lin["data"]["train"]["rows"] == len(train_ids)
    gate = json.loads((out / "gate.json").read_text())
    assert gate["decision"] in ("promoted", "held back") and gate["reason"].startswith(gate["decision"])
    assert gate["old_bundle"] == lin["parent"]["sha256"] and gate["candidate"] == sha256_file(out / "candidate" / "manifest.json")
    assert {c["group"] for c in gate["checks"]} >= {"id", "new-dom"}
    assert (out / "bundle").is_dir() == (gate["decision"] == "promoted") == continued.promoted
    report = (out / "report.md").read_text()
    assert "## Drift (before any training)" in report and gate["reason"] in report


def test_a_finished_refresh_reports_again_and_other_inputs_are_refused(world, continued, capsys):
    from eval.run.refresh import refresh

    out = continued.out
    before = tree(out)
    again = refresh(request(world, out))  # every stage done: nothing recomputed, the same answer
    assert (again.promoted, again.reason) == (continued.promoted, continued.reason)
    assert {k: v for k, v in tree(out).items() if k != "report.md"} == {k: v for k, v in before.items()
                                                                        if k != "report.md"}
    capsys.readouterr()
    rc = moodguard(["refresh", "--from", str(world / "v1"), "--data", str(world / "new.jsonl"), "--domains",
                    str(world / "domains.yaml"), "--out", str(out), "--mode", "retrain"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "holds a refresh of other inputs (field 'mode'" in err


def test_promoted_bundle_is_the_candidate_with_the_gate_in_its_lineage(world, continued, tmp_path, capsys):
    from eval.run.bundle import Monitor
    from eval.run.lineage import read_lineage
    from eval.run.refresh import promote_bundle
    from mood_data.readers import sha256_file

    out = continued.out
    gate = {**json.loads((out / "gate.json").read_text()), "decision": "promoted", "reason": "promoted: test"}
    bundle = promote_bundle(out / "candidate", tmp_path / "b", gate, out / "run" / "eval" / MONITOR, out / "run" / "guard")
    cand = json.loads((out / "candidate" / "manifest.json").read_text())["files"]
    prom = json.loads((bundle / "manifest.json").read_text())["files"]
    changed = sorted(k for k in cand if cand[k] != prom.get(k))
    assert set(prom) == set(cand) and changed == ["README.md", "lineage.json"]
    lin = read_lineage(bundle)
    assert lin["gate"]["decision"] == "promoted" and lin["gate"]["checks"][0]["group"] == "id"
    card = (bundle / "README.md").read_text()
    assert "## Lineage" in card and "| 1 | `" in card and "| 2 | this bundle | continue |" in card
    capsys.readouterr()
    assert moodguard(["lineage", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert f"1. {sha256_file(world / 'v1' / 'manifest.json')[:16]}  export" in text
    assert "2. " in text and "continue  guard+maha+ppl  gate: promoted: test  <- this bundle" in text
    assert f"read from {world / 'v1'} (verified: same sha256)" in text
    rows = Monitor.load(bundle).score(["<start_of_turn>user\nhi<end_of_turn>\n"])
    assert rows[0]["score"] is not None


def test_stats_mode_updates_mahalanobis_exactly_and_keeps_the_adapters(world, tmp_path):
    """--mode stats: adapters byte-identical to the deployed ones; the Mahalanobis statistics are
    the parent's sufficient statistics plus the new safe train rows' features (1e-9 relative to
    that update done here independently) and a full refit on old + new train rows within float32
    feature noise; no guard pass over the old rows."""
    from eval.engine.detectors.mahalanobis import MahalanobisDetector
    from eval.engine.forward import SharedBackbone, encode, guard_pass
    from eval.run.refresh import refresh
    from mood_data.load import load_split_file
    from train.modeling import load_tokenizer

    res = refresh(request(world, tmp_path / "s", mode="stats"))
    out = res.out
    for kind in ("guard", "lm"):
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (out / "candidate" / kind / f).read_bytes() == (world / "v1" / kind / f).read_bytes()
    ledger = json.loads((out / "refresh.json").read_text())["stages"]
    assert ledger["stats"]["how"] == "updated from the parent's sufficient statistics" and ledger["stats"]["updated"] == {"maha": 1}
    parent = MahalanobisDetector.load(world / "v1" / "stats", "maha-layer-1")
    cand = MahalanobisDetector.load(out / "candidate" / "stats", "maha-layer-1")
    reg = str(out / "data" / "domains.yaml")
    new_train = load_split_file(out / "data" / "new-train.jsonl", "train", registry=reg)
    full_train = load_split_file(out / "data" / "full" / "train.jsonl", "train", registry=reg)
    spec = json.loads((world / "v1" / "monitor.json").read_text())
    tok = load_tokenizer(world / "v1" / "tokenizer")
    bb = SharedBackbone.from_pretrained(spec["base"], world / "v1" / "guard", None)

    def features(rows):
        feats, order = [], []
        guard_pass(bb, encode(tok, list(rows["conversation"]), spec["settings"]["max_length"]),
                   batch_size=spec["settings"]["batch_size"], layers=[-1], pooling=spec["settings"]["pooling"],
                   on_batch=lambda b: (feats.append(np.asarray(b.features[-1], np.float64)), order.append(b.index)))
        x = np.concatenate(feats)
        return x, np.asarray(rows["malign"])[np.concatenate(order)]

    x_new, y_new = features(new_train)
    mine = parent.updated(x_new, y_new)
    assert cand.meta["n"] == mine.meta["n"] == parent.meta["n"] + int((y_new == 0).sum())
    for a, b in ((cand.mean, mine.mean), (cand.precision, mine.precision)):
        assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-9
    x_all, y_all = features(full_train)
    refit = MahalanobisDetector.fit(x_all, y_all, ridge=parent.meta["ridge"])
    assert refit.meta["n"] == cand.meta["n"]
    assert np.max(np.abs(cand.mean - refit.mean)) / np.max(np.abs(refit.mean)) < 1e-4
    probe = x_all[:20]
    np.testing.assert_allclose(cand.score(probe), refit.score(probe), rtol=1e-3)


# ----------------------------------------------------------------------------- kill -9
def _argv(world: Path, out: Path) -> list[str]:
    return ["refresh", "--from", str(world / "v1"), "--data", str(world / "new.jsonl"), "--domains",
            str(world / "domains.yaml"), "--test-fraction", "0.5", "--n-boot", "50", "--out", str(out),
            "guard.max_steps=4"]


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moodguard.cli", *argv], cwd=cwd,
                            env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _done(out: Path) -> list[str]:
    try:
        return list(json.loads((out / "refresh.json").read_text())["stages"])
    except (OSError, ValueError, KeyError):
        return []


def _kill_after(argv, cwd, out, stage: str | None, checkpoint: bool = False) -> int | None:
    """Run the refresh; SIGKILL it as soon as ``stage`` is recorded as done (``None``: as soon as
    the refresh folder appears; ``checkpoint``: as soon as a guard checkpoint exists, mid-training).
    Returns the exit status when it finished before the kill point, else None."""
    proc = _start(argv, cwd)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        hit = ((out / "refresh.json").is_file() if stage is None and not checkpoint
               else any((out / "run" / "checkpoints" / "guard").glob("checkpoint-*")) if checkpoint
               else stage in _done(out))
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        time.sleep(0.02)
    proc.communicate(timeout=60)
    return proc.returncode


def test_killed_refresh_resumes_at_every_stage_and_ends_as_uninterrupted(world, tmp_path):
    ref = tmp_path / "ref"
    p = _start(_argv(world, ref), tmp_path)
    _, err = p.communicate(timeout=600)
    assert p.returncode in (0, 3), err[-3000:]
    before = tree(world / "v1")
    out = tmp_path / "killed"
    argv = _argv(world, out)
    kills = []
    for stage, ckpt in ((None, False), ("parent", False), ("data", False), ("drift", False), (None, True),
                        ("guard", False), ("lm", False), ("stats", False), ("candidate", False), ("gate", False)):
        done_before = _done(out)
        rc = _kill_after(argv, tmp_path, out, stage, ckpt)
        assert tree(world / "v1") == before  # never touched, whatever was killed
        assert not (out / "bundle").exists() or "promote" in _done(out)  # a bundle only once promoted
        for name in ("gate.json", "drift.json", "refresh.json"):  # what is visible is complete
            if (out / name).exists():
                json.loads((out / name).read_text())
        assert len(_done(out)) >= len(done_before)  # a finished stage is never lost
        kills.append((stage, ckpt, rc, _done(out)[-1] if _done(out) else None))
        if rc is not None:
            break
    killed_after = [k[3] for k in kills if k[2] is None]  # the last finished stage at each kill
    assert len(killed_after) >= 8 and {None, "parent", "data", "drift", "guard", "candidate"} <= set(killed_after), kills
    p = _start(argv, tmp_path)
    _, err = p.communicate(timeout=600)
    assert p.returncode in (0, 3), err[-3000:]
    # the interrupted refresh ends where the uninterrupted one did: same candidate, same gate
    a, b = json.loads((ref / "gate.json").read_text()), json.loads((out / "gate.json").read_text())
    assert a["decision"] == b["decision"] and a["reason"] == b["reason"]
    for x, y in zip(a["deltas"], b["deltas"]):
        assert x["group"] == y["group"] and x["new"] == pytest.approx(y["new"], abs=1e-9)
    wa = load_file(str(ref / "candidate" / "guard" / "adapter_model.safetensors"))
    wb = load_file(str(out / "candidate" / "guard" / "adapter_model.safetensors"))
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], atol=1e-6, err_msg=k)
    assert (ref / "bundle").is_dir() == (out / "bundle").is_dir() == (p.returncode == 0)
    assert tree(world / "v1") == before


def test_a_promoted_bundle_refreshes_again_from_its_own_cut(world, continued, tmp_path, capsys):
    """The chain goes on: a bundle promoted by a refresh is refreshed again (here --mode stats,
    new safe rows of the new domain). Its old rows are the first refresh's cut, read as given
    (the lineage check would refuse a re-cut), and ``moodguard lineage`` shows three bundles."""
    from eval.run.lineage import read_lineage
    from eval.run.refresh import promote_bundle, refresh
    from mood_data.readers import sha256_file

    out = continued.out
    gate = {**json.loads((out / "gate.json").read_text()), "decision": "promoted", "reason": "promoted: test"}
    v2 = promote_bundle(out / "candidate", tmp_path / "v2", gate, out / "run" / "eval" / MONITOR, out / "run" / "guard")
    rows = [{**r, "id": "third-a" + r["id"]} for r in new_rows(24, seed=11) if r["malign"] == 0]
    rows += [{**r, "id": "third-b" + r["id"]} for r in new_rows(8, seed=12)]
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = refresh(request(world, tmp_path / "r2", source=str(v2), data=str(tmp_path / "more.jsonl"), mode="stats"))
    lin = read_lineage(res.out / "candidate")
    first = read_lineage(v2)
    assert lin["data"]["old_train"] == first["data"]["train"]  # the first refresh's train slice, exactly
    assert [a["mode"] for a in lin["ancestors"]] == ["export", "continue"]
    assert lin["ancestors"][-1]["sha256"] == lin["parent"]["sha256"] == sha256_file(v2 / "manifest.json")
    ledger = json.loads((res.out / "refresh.json").read_text())["stages"]
    assert ledger["data"]["new_domains"] == []  # new-dom is the parent's own domain now
    assert ledger["stats"]["updated"] == {"maha": 1} and ledger["stats"]["new_rows"] > 0
    if res.promoted:
        capsys.readouterr()
        assert moodguard(["lineage", str(res.bundle)]) == 0
        assert "3 bundles" in capsys.readouterr().out
