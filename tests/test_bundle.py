"""export -> score round trip; tampered or missing bundle files -> one-line BundleError."""
from __future__ import annotations

import json

import pytest



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_export_layout_and_round_trip(bundle):
    from eval.run.bundle import Monitor

    folder, eval_dir, _ = bundle
    manifest = json.loads((folder / "manifest.json").read_text())
    for rel in ("guard/adapter_model.safetensors", "lm/adapter_config.json", "stats/maha-layer-1.safetensors",
                "stats/maha-layer-1.json", "fusion.json", "thresholds.json", "recipe.yaml", "monitor.json"):
        assert rel in manifest["files"], rel
    assert not any(r.startswith("stats/knn") for r in manifest["files"])  # only this monitor's detectors
    analysis = json.loads((eval_dir / "analysis.json").read_text())
    thresholds = json.loads((folder / "thresholds.json").read_text())["thresholds"]
    assert thresholds == analysis["thresholds"]
    # the model card: YAML metadata + the monitor's figures and thresholds, covered by the manifest
    from huggingface_hub import ModelCard

    assert "README.md" in manifest["files"]
    card = ModelCard.load(folder / "README.md")
    assert "moodguard" in card.data.tags and card.data.pipeline_tag == "text-classification"
    tpr = next(r.metric_value for r in card.data.eval_results if r.metric_type == "tpr_at_0.01_fpr")
    assert tpr == pytest.approx(analysis["overall"]["tpr"]["0.01"])
    assert f"FPR 0.01: {analysis['thresholds']['0.01']:.4f}" in card.text and "## Limits" in card.text

    rows = [json.loads(line) for line in open(eval_dir / "results.jsonl")][::7]
    mon = Monitor.load(folder)
    out = mon.score([r["conversation"] for r in rows])
    assert len(out) == len(rows)
    for r, o in zip(rows, out):  # the bundle reproduces the evaluation's scores exactly
        assert o["score"] == pytest.approx(r["score"], rel=1e-6, abs=1e-6)
        for det in ("guard", "maha", "ppl"):
            assert o["detectors"][det] == pytest.approx(r[f"score_{det}"], rel=1e-6, abs=1e-6)
        assert sum(o["contributions"].values()) == pytest.approx(o["score"], rel=1e-9, abs=1e-9)
        assert o["flags"] == {k: o["score"] > t for k, t in thresholds.items()}
        assert o["latency_s"] > 0


def test_cli_score_messages_and_conversation_rows(bundle, tmp_path, capsys):
    from moodguard.cli import main
    from mood_data.render import render

    folder, _, _ = bundle
    msgs = [{"role": "user", "content": "please help me"}, {"role": "assistant", "content": "sure here is"}]
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "messages": msgs}) + "\n" + json.dumps({"conversation": render(msgs)}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["score", "--monitor", str(folder), str(inp), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["a", 2]
    assert rows[0]["score"] == pytest.approx(rows[1]["score"])  # messages are rendered the MOOD way
    assert "ms per conversation" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["score", "--monitor", str(folder), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moodguard score: error: {bad}: row 1: field 'conversation': expected a string (or a 'messages' list)"]


def test_tampered_or_missing_files_raise_bundle_error(bundle, tmp_path, capsys):
    import shutil

    from eval.run.bundle import Monitor
    from moodguard.cli import main
    from mood_data.errors import BundleError

    folder, _, _ = bundle
    copy = tmp_path / "b"
    shutil.copytree(folder, copy)
    stats = copy / "stats" / "maha-layer-1.safetensors"
    data = bytearray(stats.read_bytes())
    data[-1] ^= 0xFF
    stats.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="maha-layer-1.safetensors: sha256 does not match manifest.json"):
        Monitor.load(copy)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"conversation": "<start_of_turn>user\nhi<end_of_turn>\n"}) + "\n")
    assert main(["score", "--monitor", str(copy), str(inp)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moodguard score: error: ") and "tampered" in err[0]
    shutil.copy2(folder / "stats" / "maha-layer-1.safetensors", stats)
    (copy / "fusion.json").unlink()
    with pytest.raises(BundleError, match="fusion.json: file listed in manifest.json is missing"):
        Monitor.load(copy)
    with pytest.raises(BundleError, match="manifest.json: file not found"):
        Monitor.load(tmp_path)


def test_a_bundle_whose_guard_lora_adapts_the_embedding_table_loads(tiny_model_dir, tmp_path):
    """The tiny recipes put LoRA on embed_tokens: the vocabulary check reads the wrapped table's
    rows (it failed with an AttributeError, so such a bundle, the demo's, could not be scored)."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from eval.engine.adapters import check_vocab
    from eval.engine.forward import SharedBackbone

    torch.manual_seed(0)
    guard = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    cfg = LoraConfig(task_type=TaskType.SEQ_CLS, r=2, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    get_peft_model(guard, cfg).save_pretrained(tmp_path / "guard")
    backbone = SharedBackbone.from_pretrained(tiny_model_dir, tmp_path / "guard")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    check_vocab(tmp_path, tok, backbone.model, str(tiny_model_dir))  # no error: every id has a row
