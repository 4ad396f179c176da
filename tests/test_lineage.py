"""Every bundle records where it came from (lineage.json, issue 24): an exported bundle is a root
(no parent) with the fingerprints of the slices it was fitted on and the code version; the card
shows the chain; ``moodguard lineage`` prints it and checks values in one line."""
from __future__ import annotations

import json
import shutil

import pytest

from moodguard.cli import main as moodguard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_exported_bundle_is_a_root_with_data_and_code(bundle, capsys):
    from eval.run.cache import fingerprint
    from eval.run.lineage import read_lineage
    from mood_data.readers import sha256_file
    from train.data import validation_cut
    from train.recipe import load_recipe

    folder, _, recipe_path = bundle
    manifest = json.loads((folder / "manifest.json").read_text())
    assert "lineage.json" in manifest["files"]
    lin = read_lineage(folder)
    assert lin["mode"] == "export" and lin["parent"] is None and lin["ancestors"] == [] and lin["gate"] is None
    assert lin["monitor"] == "guard+maha+ppl"
    d = load_recipe(recipe_path).data
    train, val = validation_cut(d.source, fraction=d.validation_fraction)
    assert lin["data"]["train"] == {"rows": len(train), "sha256": fingerprint(train["id"], train["conversation"])}
    assert lin["data"]["validation"]["rows"] == len(val)
    assert lin["code"]["moodguard"] and (lin["code"]["git"] is None or len(lin["code"]["git"]) == 40)
    assert "## Lineage" in (folder / "README.md").read_text() and "| 1 | this bundle | export |" in (folder / "README.md").read_text()
    capsys.readouterr()
    assert moodguard(["lineage", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"1. {sha256_file(folder / 'manifest.json')[:16]}  export  guard+maha+ppl" in out
    assert f"data train: {len(train)} rows" in out


def test_lineage_command_refuses_bad_bundles_in_one_line(bundle, tmp_path, capsys):
    from eval.run.bundle import write_manifest

    folder, _, _ = bundle
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    (copy / "lineage.json").write_text(json.dumps({**json.loads((copy / "lineage.json").read_text()), "mode": "magic"}))
    cases = [(copy, "lineage.json: sha256 does not match manifest.json")]
    for path, pattern in cases:
        capsys.readouterr()
        assert moodguard(["lineage", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and pattern in err, err
    write_manifest(copy)  # re-manifested: now the value check speaks
    capsys.readouterr()
    assert moodguard(["lineage", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "lineage.json: field 'mode': expected one of export, continue, retrain, stats, got 'magic'" in err
    (copy / "lineage.json").unlink()
    write_manifest(copy)
    assert moodguard(["lineage", str(copy)]) == 2
    assert "lineage.json: file not found (a bundle exported before lineages were recorded" in capsys.readouterr().err
