"""The parts of ``moodguard refresh`` that need no model: the gate's rules, the drift figures, the
new rows' de-duplication and seeded split, the registry merge and the request checks (issue 24)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mood_data.domains import ID_DOMAINS, load_registry
from mood_data.errors import DataError, MoodguardError
from moodguard.cli import main as moodguard


# ----------------------------------------------------------------------------- gate
def _world(rng, n_safe=400, shift_new=0.0, shift_id=0.0, shift_ood=0.0, new_safe=0, new_safe_shift=0.0):
    """Rows of a gate: ID safe / unsafe, one OOD domain, a new domain; scores of old and new."""
    ids, dom, y, old, new = [], [], [], [], []

    def add(d, label, n, o_mu, n_mu):
        for _ in range(n):
            ids.append(f"r{len(ids)}")
            dom.append(d)
            y.append(label)
            base = rng.normal()
            old.append(base + o_mu)
            new.append(base + n_mu + 0.05 * rng.normal())

    add("function-calling", 0, n_safe, 0.0, 0.0)
    add("function-calling", 1, 80, 2.0, 2.0 + shift_id)
    add("jailbroken", 1, 60, 1.5, 1.5 + shift_ood)
    add("tool-missing", 1, 60, 0.0, shift_new)
    add("tool-missing", 0, new_safe, 0.0, new_safe_shift)
    return ids, dom, y, old, new


def _gate(world, **kw):
    from eval.run.gate import run_gate

    ids, dom, y, old, new = world
    return run_gate(ids, dom, y, old, new, parent=load_registry(None), new_domains=["tool-missing"], n_boot=200,
                    monitor="guard", **kw)


def test_gate_promotes_when_the_new_domain_improves_and_nothing_regresses():
    g = _gate(_world(np.random.default_rng(0), shift_new=4.0))
    assert g["decision"] == "promoted", g["reason"]
    assert g["reason"].startswith("promoted: id recall") and "tool-missing recall" in g["reason"]
    new = next(c for c in g["checks"] if c["group"] == "tool-missing")
    assert new["passed"] and new["new"] > 0.9 and new["old"] < 0.1 and new["ci"][0] > 0
    assert g["n_negatives"] == 400 and g["groups"] == {"id": 80, "jailbroken": 60, "tool-missing": 60}
    json.dumps(g, allow_nan=False)  # gate.json never holds NaN


@pytest.mark.parametrize("kw, failed", [
    (dict(shift_new=0.0), "new domain improved"),                       # nothing learnt
    (dict(shift_new=4.0, shift_id=-1.5), "id recall"),                  # forgetting beyond the margin
    (dict(shift_new=4.0, shift_ood=-3.0), "OOD domain not regressed"),  # an old OOD domain lost
    (dict(shift_new=4.0, new_safe=60, new_safe_shift=4.0), "new domain safe rows: flag rate not up"),  # label noise
])
def test_gate_holds_back_on_each_rule(kw, failed):
    g = _gate(_world(np.random.default_rng(1), **kw))
    assert g["decision"] == "held back"
    assert g["reason"].startswith(f"held back: {failed} failed:"), g["reason"]
    assert "\n" not in g["reason"]


def test_gate_id_margin_is_configurable():
    w = _world(np.random.default_rng(2), shift_new=4.0, shift_id=-0.8)
    loose, strict = _gate(w, id_margin=0.9), _gate(w, id_margin=0.0)
    assert loose["decision"] == "promoted" and strict["decision"] == "held back"
    assert strict["reason"].startswith("held back: id recall failed")


def test_gate_without_negatives_is_never_a_pass():
    from eval.run.gate import run_gate

    ids, dom, y, old, new = _world(np.random.default_rng(3), n_safe=0, shift_new=4.0)
    g = run_gate(ids, dom, y, old, new, parent=load_registry(None), new_domains=["tool-missing"], n_boot=50)
    assert g["decision"] == "held back" and "not compared" in g["reason"]


# ----------------------------------------------------------------------------- drift
def _rows(scores: dict[str, np.ndarray], flag_at: float):
    n = len(next(iter(scores.values())))
    return [{"score": float(scores["guard"][i]), "detectors": {k: float(v[i]) for k, v in scores.items()},
             "flags": {"0.01": bool(scores["guard"][i] > flag_at)}, "unscorable": None} for i in range(n)]


def test_drift_flags_a_domain_whose_median_passes_the_calibration_p99():
    from eval.run.drift import drift_report

    rng = np.random.default_rng(0)
    calib = _rows({"guard": rng.normal(size=500), "maha": rng.chisquare(8, 500)}, 2.3)
    shifted = {"guard": rng.normal(size=100), "maha": rng.chisquare(8, 100) + 40}
    same = {"guard": rng.normal(size=80), "maha": rng.chisquare(8, 80)}
    new = _rows(shifted, 2.3) + _rows(same, 2.3)
    rep = drift_report(calib, new, ["far"] * 100 + ["near"] * 80, [1] * 180, ["guard", "maha"], {"0.01": 2.3},
                       ["far"], "guard+maha")
    far, near = rep["domains"]["far"], rep["domains"]["near"]
    assert rep["drifted"] == ["far"] and far["drifted_under"] == ["maha"] and far["new_domain"]
    assert far["detectors"]["maha"]["above_p99"] > 0.9 and far["detectors"]["maha"]["median_rank"] == 1.0
    assert near["detectors"]["maha"]["above_p99"] < 0.1 and not near["detectors"]["maha"]["drift"]
    assert 0.0 <= far["flagged"]["0.01"] <= 0.1  # the guard does not see it
    assert far["detectors"]["maha"]["calibration"]["p99"] == pytest.approx(
        np.quantile([r["detectors"]["maha"] for r in calib], 0.99))
    json.dumps(rep, allow_nan=False)


# ----------------------------------------------------------------------------- data
def _ds(rows):
    import datasets

    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("id", "conversation", "domain", "malign")})


def _row(i, conv, domain="tool-missing", malign=1):
    return {"id": i, "conversation": conv, "domain": domain, "malign": malign}


@pytest.fixture
def registry(tmp_path):
    p = tmp_path / "domains.yaml"
    p.write_text("id: [tool-missing]\nood: [new-ood]\n")
    return load_registry(p)


def _old():
    from eval.run.refresh_data import OldData

    train = _ds([_row(f"t{i}", f"old train {i}", ID_DOMAINS[i % 3], i % 2) for i in range(20)])
    test = _ds([_row(f"s{i}", f"old test {i}", ID_DOMAINS[i % 3], i % 2) for i in range(10)])
    return OldData(train, train.select(range(4)), test, train)


def test_new_rows_are_deduplicated_by_content_and_split_seeded(registry, tmp_path):
    from eval.run.refresh_data import split_new

    rows = [_row(f"n{i}", f"user: new incident {i} <end>", malign=int(i % 5 != 0)) for i in range(40)]
    rows += [_row("dup-train", "OLD  Train 3"), _row("dup-test", "old test 7"), _row("again", "user: NEW incident 1 <end>"),
             _row("o1", "an ood row", "new-ood")]
    raw = {"rows": _ds(rows)}
    a = split_new(raw, _old(), registry, test_fraction=0.5, validation_fraction=0.25, label="new.jsonl",
                  source=tmp_path / "none")
    rep = a.report
    assert rep["n_read"] == 44 and rep["n_kept"] == 41
    assert rep["dropped"]["old train split"] == {"rows": 1, "ids": ["dup-train"]}  # case / spaces normalised
    assert rep["dropped"]["old test split"]["ids"] == ["dup-test"]
    assert rep["dropped"]["repeated in the new data"]["ids"] == ["again"]
    assert "o1" in list(a.test["id"]) and "o1" not in list(a.train["id"]) + list(a.validation["id"])  # OOD: test only
    parts = [set(a.train["id"]), set(a.validation["id"]), set(a.test["id"])]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(a.test) == 21 and rep["n_test"] == 21  # half of each (domain, label) cell + the OOD row
    for label in (0, 1):  # stratified: both labels on both sides
        assert label in a.train["malign"] and label in a.test["malign"]
    b = split_new(raw, _old(), registry, test_fraction=0.5, validation_fraction=0.25, label="new.jsonl",
                  source=tmp_path / "none")
    assert list(b.test["id"]) == list(a.test["id"]) and list(b.train["id"]) == list(a.train["id"])  # seeded


def test_prompt_groups_keep_a_requests_replies_on_one_side_of_both_new_cuts(registry, tmp_path):
    """With the parent's ``data.validation_groups: prompt`` the gate's test part and the validation
    slice of the new rows hold out whole requests (two replies per request here)."""
    from eval.run.refresh_data import split_new
    from train.data import prompt_group

    def conv(i, reply):
        return f"<start_of_turn>user\nincident {i}: call the tool<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n"

    rows = [_row(f"n{i}-{m}", conv(i, f"reply {m}"), malign=m) for i in range(24) for m in (0, 1)]
    raw = {"rows": _ds(rows)}
    got = split_new(raw, _old(), registry, test_fraction=0.25, validation_fraction=0.25, label="new.jsonl",
                    source=tmp_path / "none", groups="prompt")
    sides = [{prompt_group(c) for c in part["conversation"]} for part in (got.train, got.validation, got.test)]
    assert all(sides) and not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sum(len(x) for x in sides) == 24
    rowwise = split_new(raw, _old(), registry, test_fraction=0.25, validation_fraction=0.25, label="new.jsonl",
                        source=tmp_path / "none")
    assert {prompt_group(c) for c in rowwise.train["conversation"]} & {prompt_group(c) for c in rowwise.test["conversation"]}


def test_an_old_id_in_the_new_rows_is_one_line_naming_the_row(registry, tmp_path):
    from eval.run.refresh_data import split_new

    path = tmp_path / "new.jsonl"
    rows = [_row("n1", "fresh"), _row("t5", "fresh too")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"new.jsonl: row 2: field 'id': id 't5' is also an id of the old train split"):
        split_new({"rows": _ds(rows)}, _old(), registry, test_fraction=0.5, validation_fraction=0.25,
                  label=str(path), source=path)
    with pytest.raises(DataError, match="every new row is already in the parent's data"):
        split_new({"rows": _ds([_row("x", "old train 1")])}, _old(), registry, test_fraction=0.5,
                  validation_fraction=0.25, label="new.jsonl", source=tmp_path / "none")


def test_registries_merge_and_conflicts_are_one_line(tmp_path):
    from eval.run.refresh_data import merge_registries

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("id: [support-chats]\n")
    b.write_text("id: [tool-missing]\nood: [weird]\n")
    out = merge_registries([a, None, b], tmp_path / "m.yaml")
    reg = load_registry(out)
    assert reg.is_id("support-chats") and reg.is_id("tool-missing") and reg.is_ood("weird")
    assert merge_registries([None, None], tmp_path / "none.yaml") is None
    b.write_text("ood: [support-chats]\n")
    with pytest.raises(DataError, match=r"b.yaml: key 'ood': domain 'support-chats' is declared as 'id' in .*a.yaml"):
        merge_registries([a, b], tmp_path / "m2.yaml")


# ----------------------------------------------------------------------------- requests
def test_bad_requests_are_one_line_before_anything_is_written(tmp_path, capsys):
    src = tmp_path / "b"
    src.mkdir()
    (src / "manifest.json").write_text("{}")
    data = tmp_path / "new.jsonl"
    data.write_text("")
    base = ["refresh", "--from", str(src), "--data", str(data)]
    cases = [
        ([*base, "--out", str(tmp_path / "o"), "--replay", "some"], "--replay 'some': expected 'all', a number of old train rows >= 0, or Kx"),
        ([*base, "--out", str(tmp_path / "o"), "--mode", "retrain", "--replay", "5"], "replay is a continue-mode choice"),
        ([*base, "--out", str(tmp_path / "o"), "--test-fraction", "1"], "--test-fraction 1.0: must be in (0, 1)"),
        ([*base, "--out", str(tmp_path / "o"), "--n-boot", "0"], "--n-boot 0: the gate needs bootstrap intervals"),
        ([*base, "--out", str(tmp_path / "o"), "output_dir=/x"], "override 'output_dir=/x': output_dir is set by the refresh"),
        ([*base, "--out", str(src / "inside")], "--out must be a new folder beside --from"),
        (["refresh", "--from", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o")],
         "nope: --from: not found"),
        (["refresh", "--from", str(src), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")],
         "nope.jsonl: --data: file not found"),
    ]
    for argv, pattern in cases:
        capsys.readouterr()
        assert moodguard(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and pattern in err, err
    assert not (tmp_path / "o").exists() and sorted(p.name for p in src.iterdir()) == ["manifest.json"]


def test_out_holding_something_else_is_refused(tmp_path):
    from eval.run.refresh import Ledger

    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(MoodguardError, match="--out exists and is not a refresh folder .*'precious.txt'"):
        Ledger(out, {"mode": "continue"})
    out2 = tmp_path / "o2"
    out2.mkdir()
    Ledger(out2, {"mode": "continue"})
    with pytest.raises(MoodguardError, match="holds a refresh of other inputs \\(field 'mode'"):
        Ledger(out2, {"mode": "retrain"})
    assert (out / "precious.txt").read_text() == "mine"
