"""The custom-domain walk-through of docs/data.md, run as written: validate -> train -> fit ->
evaluate with --domains on a small synthetic dataset (tiny-s, a few steps)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import make_rows, write_jsonl
from moodguard.cli import main

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "data.md"
FAST = ["guard.max_steps=4", "eval.max_length=64", "eval.batch_size=16", "guard.max_length=64"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def walkthrough() -> tuple[str, list[list[str]]]:
    section = DOC.read_text(encoding="utf-8").split("## Worked example: your own domains")[1]
    yaml_block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    commands = [shlex.split(line) for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
                if line.startswith("moodguard ")]
    return yaml_block, commands


def custom_rows(split: str) -> list[dict]:
    """make_rows' synthetic rows with one built-in ID domain renamed to support-chats and, in
    test, the jailbroken rows renamed to refund-fraud (the user's new failure mode)."""
    rows = make_rows(16, split=split)
    out = []
    for r in rows:
        if r["domain"] == "hh-rlhf-helpful":
            r = {**r, "domain": "support-chats"}
        elif r["domain"] == "jailbroken":
            r = {**r, "domain": "refund-fraud"}
        out.append(r)
    return out


def test_docs_walkthrough_runs(tmp_path, monkeypatch, capsys):
    yaml_block, commands = walkthrough()
    assert [c[1] for c in commands] == ["data", "train", "fit", "evaluate"]
    assert all("--domains" in c for c in commands)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_domains.yaml").write_text(yaml_block)
    write_jsonl(tmp_path / "my_data" / "train.jsonl", [r for r in custom_rows("train")])
    write_jsonl(tmp_path / "my_data" / "test.jsonl", custom_rows("test"))

    # without --domains the data is refused with the documented one-line error
    assert main(["data", "validate", "my_data"]) == 2
    assert "unknown domain 'support-chats' (declare it in a domains YAML, --domains)" in capsys.readouterr().err

    for argv in commands:
        argv = [str(REPO / a) if a.startswith("recipes/") else a for a in argv[1:]]
        if argv[0] != "data":
            argv += FAST
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    assert out.startswith("OK my_data: train") and "refund-fraud" in out

    run = tmp_path / "runs" / "support"
    assert (run / "guard" / "adapter_model.safetensors").is_file()
    recipe = (run / "guard" / "recipe.yaml").read_text()
    assert str(tmp_path / "my_domains.yaml") in recipe  # --domains == data.registry
    for monitor in ("guard", "guard+maha"):
        analysis = json.loads((run / "eval" / monitor / "analysis.json").read_text())
        assert analysis["groups"]["refund-fraud"] == {**analysis["groups"]["refund-fraud"], "kind": "ood", "n_unsafe": 16}
        assert "refund-fraud" in analysis["overall"]["domains"]
        assert analysis["n_id_safe"] == 3 * 16  # support-chats safe rows are negatives too
        rows = [json.loads(line) for line in open(run / "eval" / monitor / "results.jsonl")]
        assert sum(r["domain"] == "support-chats" for r in rows) == 32
    assert not (run / "lm").exists()  # no ppl monitor: no LM adapter needed
    assert not any((run / "stats").glob("*/knn.*"))  # fit fitted only what the monitors use
