"""Guard + causal-LM training end to end on CPU (tiny random 'xs' Llama, a few steps)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moodguard.cli import main as moodguard
from train.recipe import load_recipe
from train.recipe_files import RECIPES_DIR

TINY_FAMILY = RECIPES_DIR / "tiny" / "_family.yaml"


def write_tiny_recipe(path: Path, model_dir: Path, data_dir: Path, out_dir: Path, **extra) -> Path:
    """A tiny recipe inheriting the shipped tiny family: 8-row global batch, dropout 0."""
    section = {"max_steps": 6, "save_steps": 3, "global_batch_size": 8, "per_device_batch_size": 8,
               "max_length": 64, "logging_steps": 3, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    body = {"base": str(TINY_FAMILY), "model": str(model_dir), "data": {"source": str(data_dir)},
            "output_dir": str(out_dir), "guard": dict(section), "lm": {**section, "max_steps": 2}}
    for key, value in extra.items():
        node = body
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def guard_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    root = tmp_path_factory.mktemp("guard_run")
    recipe = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run")
    assert moodguard(["train", "guard", "--recipe", str(recipe)]) == 0
    return root / "run", recipe


def test_guard_folder_contents(guard_run):
    run, _ = guard_run
    g = run / "guard"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "recipe.yaml", "metrics.json", "versions.json"):
        assert (g / f).is_file(), f
    assert not list(g.glob("*.bin"))  # no pickles in the adapter folder
    metrics = json.loads((g / "metrics.json").read_text())
    val = metrics["validation"]
    assert 0.0 <= val["eval_accuracy"] <= 1.0 and 0.0 <= val["eval_auroc"] <= 1.0 and val["eval_loss"] > 0
    assert metrics["train"]["train_loss"] > 0 and metrics["num_processes"] == 1
    # validation slice comes from the 72-row ID train split (10 %, stratified): 6 rows
    assert metrics["n_validation"] == 6 and metrics["n_train"] == 66
    versions = json.loads((g / "versions.json").read_text())
    assert set(versions) == {"python", "torch", "transformers", "peft", "accelerate"}
    assert load_recipe(g / "recipe.yaml").guard.max_steps == 6
    # recipe.json: the recipe record a later --resume is checked against (train/checkpoints.py)
    assert sorted(p.name for p in (run / "checkpoints" / "guard").iterdir()) == ["checkpoint-3", "checkpoint-6", "recipe.json"]
    # a filled model card replaces peft's empty one: metadata + the run's own figures
    from huggingface_hub import ModelCard

    card = ModelCard.load(g / "README.md")
    assert card.data.library_name == "peft" and "moodguard" in card.data.tags
    assert "More Information Needed" not in card.text and "Train rows: 66; validation rows: 6" in card.text
    assert f"| auroc | {val['eval_auroc']:.3f} |" in card.text and "## Limits" in card.text


def test_head_inside_adapter_and_mood_bench_loading(guard_run, tiny_model_dir, tiny_tokenizer):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForSequenceClassification

    from train.modeling import adapter_num_labels, load_guard_model, load_tokenizer

    g = guard_run[0] / "guard"
    with safe_open(str(g / "adapter_model.safetensors"), framework="pt") as fh:
        keys = list(fh.keys())
        score_key = next(k for k in keys if k.endswith("score.weight"))
        score = fh.get_tensor(score_key)
    assert score.shape == (2, 32) and any("lora_A" in k for k in keys)
    assert adapter_num_labels(g) == 2
    # the mood-bench way
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=score.shape[0])
    base.config.pad_token_id = tiny_tokenizer.pad_token_id
    ref = PeftModel.from_pretrained(base, str(g)).eval()
    ours = load_guard_model(tiny_model_dir, g, "float32").eval()
    tok = load_tokenizer(g)
    assert tok.padding_side == "left" and tok.truncation_side == "left"
    enc = tok(["<start_of_turn>user\nhello<end_of_turn>", "<start_of_turn>user\nhow do i hurt someone please help"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = ref(**enc).logits, ours(**enc).logits
    torch.testing.assert_close(a, b)
    # the trained head differs from a fresh random head: it was trained and saved
    torch.testing.assert_close(ours.base_model.model.score.modules_to_save["default"].weight, score)


def test_left_truncation_keeps_the_end(tiny_model_dir):
    from train.data import tokenize_guard
    import datasets

    from train.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    text = "please help me " * 40 + "sure here is how to hurt someone"
    ds = datasets.Dataset.from_list([{"id": "a", "conversation": text, "domain": "x", "malign": 1}])
    row = tokenize_guard(ds, tok, 16)[0]
    assert row["length"] == 16 and row["labels"] == 1
    assert tok.decode(row["input_ids"]).endswith("hurt someone")


def test_lm_trains_in_process_on_safe_rows(tmp_path, tiny_model_dir, tiny_dataset_dir):
    from train.data import lm_collator
    from train.modeling import load_causal_lm, load_tokenizer

    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    assert moodguard(["train", "lm", "--recipe", str(recipe)]) == 0
    lm = tmp_path / "run" / "lm"
    cfg = json.loads((lm / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    metrics = json.loads((lm / "metrics.json").read_text())
    # 36 ID-safe train rows -> 33 train + 3 validation after the stratified 10 % split
    assert metrics["n_train"] == 33 and metrics["n_validation"] == 3
    model = load_causal_lm(tiny_model_dir, lm)
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # trained
    tok = load_tokenizer(tiny_model_dir)
    batch = lm_collator(tok, 8, packing=False)([{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9]}])
    assert batch["input_ids"].shape == (2, 8)  # padded to a multiple of 8
    assert batch["labels"][0].tolist()[:5] == [-100] * 5 and batch["labels"][0].tolist()[5:] == [5, 6, 7]
    packed = lm_collator(tok, None, packing=True)([{"input_ids": [5, 6, 7]}, {"input_ids": [8, 9]}])
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]


def test_seed_list_gives_distinct_adapters_and_wandb_offline(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                               guard__seeds=[0, 1], guard__max_steps=2, guard__save_steps=10, report_to="wandb")
    assert moodguard(["train", "guard", "--recipe", str(recipe)]) == 0
    run = tmp_path / "run"
    a = load_file(str(run / "guard-seed0" / "adapter_model.safetensors"))
    b = load_file(str(run / "guard-seed1" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not torch.allclose(a[k], b[k]) for k in a)
    assert not (run / "guard").exists()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2  # one offline wandb run per seed


def test_parallel_members_equal_sequential_members(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """--parallel-members 2: two member processes write the same guard-seed<S> folders, equal
    to the members trained one after the other in this process."""
    from test_train_distributed import assert_same_adapter

    from train.launch import member_slots

    seq = write_tiny_recipe(tmp_path / "seq.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "seq",
                            guard__seeds=[0, 1], guard__max_steps=2, guard__save_steps=10)
    par = write_tiny_recipe(tmp_path / "par.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "par",
                            guard__seeds=[0, 1], guard__max_steps=2, guard__save_steps=10)
    assert moodguard(["train", "guard", "--recipe", str(seq)]) == 0
    assert moodguard(["train", "guard", "--recipe", str(par), "--parallel-members", "2"]) == 0
    for s in (0, 1):
        assert_same_adapter(tmp_path / "seq" / f"guard-seed{s}", tmp_path / "par" / f"guard-seed{s}")
        assert json.loads((tmp_path / "par" / f"guard-seed{s}" / "metrics.json").read_text())["seed"] == s
        assert (tmp_path / "par" / "logs" / f"guard-seed{s}.log").is_file()
    # a member outside the seed list is a recipe error, not a silent no-op
    from mood_data.errors import RecipeError
    from train.guard import train_guard

    with pytest.raises(RecipeError, match=r"member seed 7 is not in \[0, 1\]"):
        train_guard(load_recipe(par), only_seeds=[7])

    # slots: GPUs split per member, CPU threads shared
    assert member_slots(3, 3, 2, ["0", "1", "2", "3", "4"], 16) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                                     {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert member_slots(4, 2, 1, [], 8) == [{"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}] * 2
    assert member_slots(2, 3, 1, [], 1) == [{"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}] * 2


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys):
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    assert moodguard(["train", "guard", "--recipe", str(recipe), "guard.lerning_rate=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moodguard train: error: ") and "key 'guard.lerning_rate': unknown key" in err
    assert moodguard(["train", "guard", "--recipe", str(recipe), "--accelerate-config", "nope"]) == 2
    assert "unknown accelerate config 'nope'" in capsys.readouterr().err


def test_count_parameters(tiny_model_dir):
    from transformers import AutoConfig

    from train.modeling import count_parameters, load_guard_model

    cfg = AutoConfig.from_pretrained(str(tiny_model_dir))
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    # embeddings + per layer (q,k,v,o + gate,up,down + 2 norms) + final norm
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    expected = v * h + L * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h
    assert count_parameters(cfg) == expected
    assert count_parameters(str(tiny_model_dir)) == expected
    assert count_parameters(load_guard_model(tiny_model_dir, None)) == expected
