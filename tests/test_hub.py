"""Model cards and `moodguard push` against a mocked HfApi (no network)."""
from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
from huggingface_hub import ModelCard

from eval.run.hub import files_to_upload, push, write_cards
from moodguard.cli import main
from test_sweep_fixtures import make_eval_folder

BASE = "HuggingFaceTB/SmolLM2-135M"


def make_run(root: Path) -> Path:
    recipe = (f"model: {BASE}\nname: smol-s\ndtype: bfloat16\n"
              "data: {source: my-data, registry: domains.yaml, max_train_rows: 500}\n"
              "guard: {enabled: true, max_steps: 60, learning_rate: 0.0002, seeds: [0]}\n"
              "lm: {enabled: true, max_steps: 30, seeds: [0]}\n")
    (root / "recipe.yaml").parent.mkdir(parents=True)
    (root / "recipe.yaml").write_text(recipe)
    for kind in ("guard", "lm"):
        d = root / kind
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        (d / "adapter_model.safetensors").write_bytes(b"weights")
        (d / "recipe.yaml").write_text(recipe)
        (d / "README.md").write_text("[More Information Needed]\n")  # peft's empty card
        (d / "metrics.json").write_text(json.dumps({"kind": kind, "n_train": 450, "n_validation": 50,
                                                    "validation": {"eval_auroc": 0.91, "eval_loss": 0.3}}))
    for junk in ("checkpoints/guard/checkpoint-10/optimizer.pt", "stats/abc/maha.safetensors"):
        (root / junk).parent.mkdir(parents=True)
        (root / junk).write_bytes(b"x")
    for m in ("guard", "guard+ppl"):
        make_eval_folder(root / "eval" / m, m, "tiny-s", 1000, 0)
    return root


def test_cards_are_filled(tmp_path):
    run = make_run(tmp_path / "run")
    written = write_cards(run)
    assert {p.relative_to(run).as_posix() for p in written} == {"README.md", "guard/README.md", "lm/README.md"}
    analysis = json.loads((run / "eval" / "guard+ppl" / "analysis.json").read_text())
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == BASE and "moodguard" in card.data.tags
    tprs = {r.metric_name: r.metric_value for r in card.data.eval_results if r.metric_type == "tpr_at_0.01_fpr"}
    assert tprs["guard+ppl: overall OOD tpr at 0.01 fpr"] == pytest.approx(analysis["overall"]["tpr"]["0.01"])
    text = card.text
    for needle in ("`my-data`", "domains.yaml", "Train rows: 450", "60 steps", "## Intended use", "## Limits",
                   "| guard+ppl | 0.01 |"):
        assert needle in text, needle
    guard = ModelCard.load(run / "guard" / "README.md")
    assert guard.data.library_name == "peft" and "More Information Needed" not in guard.text
    assert "| auroc | 0.910 |" in guard.text
    lm = ModelCard.load(run / "lm" / "README.md")  # the LM adapter's card lists only the ppl monitors
    assert "| guard+ppl |" in lm.text and "| guard | 0.01" not in lm.text


def test_push_uploads_the_run_through_hfapi(tmp_path):
    run = make_run(tmp_path / "run")
    api = mock.MagicMock()
    api.create_repo.return_value = mock.Mock(url="https://huggingface.co/org/smol")
    res = push(run, "org/smol", api=api)
    api.create_repo.assert_called_once_with("org/smol", private=False, exist_ok=True, repo_type="model")
    kw = api.upload_folder.call_args.kwargs
    assert kw["repo_id"] == "org/smol" and kw["folder_path"] == str(run.resolve())
    assert res.kind == "run" and res.url == "https://huggingface.co/org/smol"
    assert res.files == files_to_upload(run.resolve(), "run")
    assert {"README.md", "guard/adapter_model.safetensors", "lm/README.md", "eval/guard/analysis.json"} <= set(res.files)
    # never checkpoints, cached statistics or the test conversations
    assert not [f for f in res.files if f.startswith(("checkpoints/", "stats/")) or f.endswith("results.jsonl")]


def test_cli_push_and_errors(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    run = make_run(tmp_path / "run")
    api = mock.MagicMock()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    assert main(["push", str(run / "guard"), "--repo-id", "org/guard", "--private"]) == 0
    api.create_repo.assert_called_once_with("org/guard", private=True, exist_ok=True, repo_type="model")
    assert "pushed adapter" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), "--repo-id", "org/x"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    bundle = tmp_path / "old-bundle"
    bundle.mkdir()
    (bundle / "monitor.json").write_text(json.dumps({"monitor": "guard"}))
    assert main(["push", str(bundle), "--repo-id", "org/x"]) == 2
    assert "no README.md model card" in capsys.readouterr().err
    assert api.upload_folder.call_count == 1  # only the adapter was uploaded
