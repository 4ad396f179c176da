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

    from eval.runfolder import write_run
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
