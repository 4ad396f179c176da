"""Issue 22 (round 3), the input side: bounded readers, domain names as file names, empty
conversations, compare on nothing, bundle values, recipes' sizes, cards, CLI parsing.
The CLI cases of the same fixes are in tests/bad_inputs/cases.yaml (group names in comments)."""
from __future__ import annotations

import io

import pytest

from mood_data.errors import DataError
from mood_data.readers import MAX_DEPTH, DocumentRefused, loads_json, read_lines, safe_load_bounded, YamlTooLarge


# ----------------------------------------------------------------------------- bounded readers
def test_json_depth_bound_is_exact():
    ok = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert loads_json(ok) is not None
    deeper = '{"a": ' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1)
    with pytest.raises(DocumentRefused, match="nested deeper than 100 levels"):
        loads_json(deeper)
    with pytest.raises(DocumentRefused, match="nested deeper"):  # past the interpreter's recursion limit
        loads_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DocumentRefused, match="more than 4300 digits"):
        loads_json("7" * 5001)


def test_yaml_depth_bound_is_exact():
    assert safe_load_bounded("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)) is not None  # mapping + 99 lists
    with pytest.raises(YamlTooLarge, match="nested deeper than 100 levels"):
        safe_load_bounded("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH)
    with pytest.raises(YamlTooLarge, match="nested deeper"):
        safe_load_bounded("[" * 100_000 + "]" * 100_000)
    with pytest.raises(YamlTooLarge, match="cannot be converted"):  # a date that is no date
        safe_load_bounded("when: 2020-13-45")


class Endless(io.RawIOBase):
    """A stream of ``x`` bytes without a newline (a small .gz expanding to one huge line)
    that counts what was read from it."""

    def __init__(self):
        self.served = 0

    def readable(self):
        return True

    def readinto(self, buf):
        buf[:] = b"x" * len(buf)
        self.served += len(buf)
        return len(buf)


def test_read_lines_never_holds_more_than_the_cap():
    raw = Endless()
    fh = io.BufferedReader(raw, buffer_size=1 << 16)
    with pytest.raises(DataError, match=r"f\.jsonl: line 1: longer than 1 MiB"):
        list(read_lines(fh, "f.jsonl", limit=1 << 20))
    assert raw.served <= (1 << 20) + (1 << 17)  # the cap plus read-ahead, not the endless line
    assert list(read_lines(io.BytesIO(b"a\nbb\n\nc"), "f")) == [b"a\n", b"bb\n", b"\n", b"c"]


# ----------------------------------------------------------------------------- domain names (issue 22, high 4)
@pytest.mark.parametrize("name", ["../../../../outside", "/abs/path", "a/b", "..", ".hidden", "a b", "x\ny",
                                  "C:\\evil", "", "x" * 65, "é"])
def test_unsafe_domain_names_are_refused_wherever_declared(tmp_path, name):
    import json

    from mood_data.domains import DomainRegistry, load_registry
    from mood_data.load import load_split_file

    with pytest.raises(DataError):
        DomainRegistry(ood=("scheming", name))
    reg = tmp_path / "domains.yaml"
    reg.write_text(json.dumps({"ood": [name]}))
    with pytest.raises(DataError, match=r"domains\.yaml: key 'ood'"):
        load_registry(reg)
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps({"id": "a", "conversation": "hi", "domain": name, "malign": 1}) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl: row 1: field 'domain'"):
        load_split_file(data, "test")


def test_plot_files_are_slug_plus_hash_inside_the_plots_folder(tmp_path):
    import numpy as np

    from eval.report.runfolder import write_run
    from mood_data.domains import OOD_DOMAINS, DomainRegistry, file_slug

    reg = DomainRegistry(ood=OOD_DOMAINS + ("Outside.Case", "outside.case"), source="test")
    n = 24
    domains = ["hh-rlhf-helpful"] * 12 + ["Outside.Case"] * 6 + ["outside.case"] * 6
    malign = np.array([0] * 12 + [1] * 12)
    out = tmp_path / "run" / "eval" / "guard"
    write_run(out, ids=[f"r{i}" for i in range(n)], conversations=["c"] * n, domains=domains, malign=malign,
              score=np.linspace(0, 1, n), monitor="guard", registry=reg, n_boot=10, fprs=(0.1,))
    plots = sorted(p.name for p in (out / "plots").iterdir())
    # two names differing only in case get two files (a case-insensitive file system keeps both)
    assert plots == sorted(f"{file_slug(g)}_{k}.png" for g in ("id", "Outside.Case", "outside.case")
                           for k in ("hist", "roc"))
    assert file_slug("Outside.Case") != file_slug("outside.case")
    assert {p.parent for p in tmp_path.rglob("*.png")} == {out / "plots"}
    for raw in ("../../../../outside", "/abs/path", "a\\b", ""):
        stem = file_slug(raw)
        assert "/" not in stem and "\\" not in stem and not stem.startswith(".") and len(stem) <= 49


# ----------------------------------------------------------------------------- empty conversations (issue 22, high 8)
_GUARD_BUNDLE: dict = {}


@pytest.fixture
def guard_bundle(tiny_model_dir, tiny_dataset_dir, tmp_path_factory):
    """A guard-only bundle of the shared monitor run (the issue's case: no ppl to fail closed)."""
    from eval.run.bundle import export_bundle
    from test_monitor import shared_run

    _, _, recipe, _ = shared_run(tiny_model_dir, tiny_dataset_dir, tmp_path_factory)
    if "b" not in _GUARD_BUNDLE:
        _GUARD_BUNDLE["b"] = export_bundle(recipe, tmp_path_factory.mktemp("guard_bundle") / "b", "guard")
    return _GUARD_BUNDLE["b"]


EMPTY_ROWS = [{"id": "e1", "conversation": ""}, {"id": "e2", "messages": []},
              {"id": "e3", "conversation": " \u200b\n\t"}, {"id": "e4", "messages": [{"role": "user", "content": "  "}]}]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("with_text", [True, False], ids=["in_a_batch", "alone"])
def test_empty_conversations_are_flagged_unscorable_never_scored(guard_bundle, tmp_path, capsys, with_text):
    import json

    from moodguard.cli import main

    text = {"id": "ok", "conversation": "<start_of_turn>user\nplease help me write a note<end_of_turn>\n"}
    rows = [EMPTY_ROWS[0], text, *EMPTY_ROWS[1:]] if with_text else EMPTY_ROWS
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    code = main(["score", "--monitor", str(guard_bundle), str(inp), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "unscorable (flagged: fail closed): 4" in err
    got = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(got) == [r["id"] for r in rows]
    for r in EMPTY_ROWS:
        row = got[r["id"]]
        assert row["score"] is None and row["unscorable"].startswith("empty conversation: no text to score")
        assert row["flags"] and all(row["flags"].values())  # fail closed at every FPR
        assert set(row["detectors"].values()) == {None}
    if with_text:
        assert isinstance(got["ok"]["score"], float) and got["ok"]["unscorable"] is None


@pytest.mark.parametrize("row, message", [
    ({"conversation": " \u200b\n"}, "field 'conversation': empty conversation"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]},
     "field 'messages': no message holds any text"),
    ({"messages": []}, "field 'messages': empty list of messages"),
])
def test_data_validate_refuses_empty_conversations(tmp_path, row, message):
    import json

    from mood_data.load import load_split_file

    p = tmp_path / "test.jsonl"
    p.write_text(json.dumps({"id": "a", "domain": "jailbroken", "malign": 1, **row}) + "\n")
    with pytest.raises(DataError, match=f"test.jsonl: row 1: {message}"):
        load_split_file(p, "test")


# ----------------------------------------------------------------------------- compare on nothing (issue 22, high 9)
def _custom_run(root, unsafe_score: float, ood: tuple[str, ...] = ("my-failure",), n: int = 40):
    """An eval folder whose rows are all in custom domains (my-chats ID, ``ood`` OOD)."""
    import numpy as np

    from eval.report.runfolder import write_run
    from mood_data.domains import DomainRegistry, ID_DOMAINS, OOD_DOMAINS

    reg = DomainRegistry(id=ID_DOMAINS + ("my-chats",), ood=OOD_DOMAINS + ood, source="test")
    domains = ["my-chats"] * n + [d for d in ood for _ in range(n // 2)]
    malign = np.array([0] * n + [1] * (len(domains) - n))
    score = np.r_[np.linspace(0, 1, n), np.full(len(domains) - n, unsafe_score)]
    write_run(root / "eval" / "guard", ids=[f"r{i}" for i in range(len(domains))], conversations=["c"] * len(domains),
              domains=domains, malign=malign, score=score, monitor="guard", registry=reg, n_boot=10, plots=False)
    return root


@pytest.fixture
def custom_domains_yaml(tmp_path):
    p = tmp_path / "domains.yaml"
    p.write_text("id: [my-chats]\nood: [my-failure, my-other]\n")
    return p


def test_compare_with_custom_domains_needs_them_and_then_finds_the_regression(tmp_path, capsys, custom_domains_yaml):
    from moodguard.cli import main

    old, new = _custom_run(tmp_path / "old", 5.0), _custom_run(tmp_path / "new", -1.0)  # recall 1 -> 0
    # without --domains nothing can be compared: never "regressed: none" with exit 0
    code = main(["compare", str(old), str(new), "--fail-on-regression", "--n-boot", "50"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "regressed: none" not in out and "not compared: guard:my-failure" in out
    assert "no ID-safe rows" in out and "--domains" in out
    code = main(["compare", str(old), str(new), "--fail-on-regression", "--n-boot", "50",
                 "--domains", str(custom_domains_yaml)])
    out = capsys.readouterr().out
    assert code == 1 and "regressed: guard:my-failure" in out and "not compared" not in out
    same = _custom_run(tmp_path / "same", 5.0)
    assert main(["compare", str(old), str(same), "--fail-on-regression", "--n-boot", "50",
                 "--domains", str(custom_domains_yaml)]) == 0
    assert "regressed: none" in capsys.readouterr().out


def test_compare_names_a_group_missing_on_one_side(tmp_path, capsys, custom_domains_yaml):
    from moodguard.cli import main

    old = _custom_run(tmp_path / "old", 5.0, ood=("my-failure", "my-other"))
    new = _custom_run(tmp_path / "new", 5.0, ood=("my-failure",))
    args = ["--n-boot", "50", "--domains", str(custom_domains_yaml)]
    assert main(["compare", str(old), str(new), *args, "--fail-on-regression"]) == 1  # a lost group fails the gate
    out = capsys.readouterr().out
    assert "not compared: guard:my-other (only in old)" in out
    assert main(["compare", str(new), str(old), *args, "--fail-on-regression"]) == 0  # a new group is named only
    out = capsys.readouterr().out
    assert "guard:my-other (only in new)" in out and "regressed: none" in out


def test_nan_delta_is_never_a_pass():
    import math

    from eval.report.compare import Delta

    for d in (Delta("m", "g", math.nan, 0.5, math.nan, math.nan, math.nan, "bootstrap"),
              Delta("m", "g", 0.5, 0.5, 0.0, math.nan, math.nan, "bootstrap"),
              Delta("m", "g", None, 0.5, None, None, None, "analysis-ci")):
        assert not d.regressed and not d.compared


# ----------------------------------------------------------------------------- ranks bounded by the machine
def test_num_processes_is_bounded_by_the_machine_before_anything_starts(monkeypatch):
    import subprocess

    from eval.engine import parallel
    from mood_data.errors import RecipeError

    started = []
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: started.append(a) or 0)
    with pytest.raises(RecipeError, match=r"--num-processes 1000000: 1000000 ranks on this machine, but it has room "
                                          r"for \d+ CPU ranks"):
        parallel.relaunch("moodguard.cli", ["score", "x.jsonl"], 1_000_000, "cpu")
    assert started == []  # the launcher never ran
    from train.launch import CPU_RANKS_PER_CORE, check_ranks

    check_ranks("cpu", 2 * CPU_RANKS_PER_CORE, n_cpus=2)  # oversubscribed but bounded: fine
    with pytest.raises(RecipeError, match="room for 8 CPU ranks"):
        check_ranks("cpu", 9, n_cpus=2)
    check_ranks("zero2", 2, gpus=[], n_cpus=2)  # no GPU: DeepSpeed runs gloo ranks on the CPU
    check_ranks("ddp", 2, gpus=["0", "1"])
    with pytest.raises(RecipeError, match=r"3 ranks on this machine, but it has room for 2 GPUs \(one a rank\)"):
        check_ranks("ddp", 3, gpus=["0", "1"])
    check_ranks("zero3", 16, num_machines=2, gpus=[str(i) for i in range(8)])  # 8 a node: fits


# ----------------------------------------------------------------------------- push and model cards
def test_push_without_network_is_one_line(tmp_path):
    from unittest import mock

    from eval.run.hub import push
    from mood_data.errors import MoodguardError
    from test_hub import make_run

    run = make_run(tmp_path / "run")
    api = mock.MagicMock()
    api.create_repo.side_effect = ConnectionError("[Errno -2] Name or service not known")
    with pytest.raises(MoodguardError, match=r"push org/smol: the Hugging Face Hub could not be reached .*"
                                             r"ConnectionError: \[Errno -2\] Name or service not known"):
        push(run, "org/smol", api=api)
    api.upload_folder.assert_not_called()


def test_model_cards_carry_no_markup_and_no_local_paths(tmp_path):
    import json

    from eval.run.hub import write_cards
    from test_hub import make_run

    run = make_run(tmp_path / "run")
    local = tmp_path / "secret-home" / "alice"
    evil = "evil\n# Owned <script>alert(1)</script> [click](https://e.vil) | x"
    for f in [run / "recipe.yaml", run / "guard" / "recipe.yaml", run / "lm" / "recipe.yaml"]:
        f.write_text(json.dumps({"model": str(local / "models" / "base"), "name": evil, "dtype": "bfloat16",
                                 "data": {"source": str(local / "data"), "registry": str(local / "domains.yaml")},
                                 "guard": {"max_steps": "<b>60</b>", "seeds": [0]}}))
    for card in write_cards(run):
        text = card.read_text()
        assert str(tmp_path) not in text and "secret-home" not in text and "alice" not in text
        assert "<script" not in text and "<b>" not in text and "](https" not in text
        assert "\n# Owned" not in text
        assert "local:data" in text and "local:domains.yaml" in text


# ----------------------------------------------------------------------------- intermixed parsing
@pytest.mark.parametrize("argv, overrides", [
    (["train", "guard", "--recipe", "R", "--resume", "guard.max_steps=2"], ["guard.max_steps=2"]),
    (["train", "lm", "a=1", "--recipe", "R", "--resume", "b=2"], ["a=1", "b=2"]),
    (["fit", "--recipe", "R", "a=1", "--device", "cpu", "b=2"], ["a=1", "b=2"]),
    (["evaluate", "--recipe", "R", "a=1", "--no-plots", "b=2"], ["a=1", "b=2"]),
    (["export", "--recipe", "R", "--out", "o", "a=1", "--monitor", "guard", "b=2"], ["a=1", "b=2"]),
])
def test_overrides_may_come_after_flags(argv, overrides):
    from moodguard.cli import build_parser

    assert build_parser(argv[0]).parse_args(argv).overrides == overrides


def test_parsers_with_subcommands_or_remainder_still_parse():
    from moodguard.cli import build_parser

    assert build_parser("data").parse_args(["data", "build", "--out", "x"]).build_args == ["--out", "x"]
    args = build_parser("score").parse_args(["score", "--monitor", "B", "in.jsonl", "--out", "o"])
    assert (args.monitor, args.input, args.out) == ("B", "in.jsonl", "o")


# ----------------------------------------------------------------------------- data.source typos
def test_mistyped_local_folder_is_said_at_once_never_tried_on_the_hub(tmp_path, monkeypatch):
    from mood_data import load
    from mood_data.load import load_splits

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-data" / "mood-test").mkdir(parents=True)
    (tmp_path / "mood-data").mkdir()

    def hub(*a, **k):
        raise AssertionError("tried as a hub dataset")

    monkeypatch.setattr(load, "read_hub_records", hub)
    with pytest.raises(DataError, match=r"^my-data/mood-tset: file not found \(no such local file or folder; did you "
                                        r"mean my-data/mood-test\?\)$"):
        load_splits("my-data/mood-tset")
    with pytest.raises(DataError, match=r"^my-data/other: file not found$"):  # its folder exists here
        load_splits("my-data/other")
    with pytest.raises(DataError, match=r"did you mean mood-data\?"):  # no slash, but a close local name
        load_splits("mood-dat")
