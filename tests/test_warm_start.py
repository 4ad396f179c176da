"""Warm start (``<kind>.init_adapter``, the ``continue`` mode of ``moodguard refresh``): training
continues from an adapter's weights (the guard's head included) instead of a fresh LoRA."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from moodguard.cli import main as moodguard
from test_train_guard import write_tiny_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def first(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    root = tmp_path_factory.mktemp("warm")
    recipe = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run", guard__max_steps=4,
                               guard__save_steps=4, lm__save_steps=2)
    assert moodguard(["train", "guard", "--recipe", str(recipe)]) == 0
    assert moodguard(["train", "lm", "--recipe", str(recipe)]) == 0
    return root, recipe


def _weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("kind", ["guard", "lm"])
def test_warm_start_continues_from_the_adapter(first, tmp_path, kind):
    root, recipe = first
    start = root / "run" / kind
    # one step at a vanishing learning rate: a warm start stays at the adapter's weights, a fresh
    # LoRA (B = 0, a new random head) cannot be there
    args = ["train", kind, "--recipe", str(recipe), f"output_dir={tmp_path / 'warm'}", f"{kind}.max_steps=1",
            f"{kind}.learning_rate=1e-12", f"{kind}.save_steps=1", f"{kind}.warmup_ratio=0"]
    assert moodguard([*args, f"{kind}.init_adapter={start}"]) == 0
    assert moodguard([*args, f"output_dir={tmp_path / 'fresh'}"]) == 0
    a, warm, fresh = _weights(start), _weights(tmp_path / "warm" / kind), _weights(tmp_path / "fresh" / kind)
    assert set(a) == set(warm)
    for k in a:
        np.testing.assert_allclose(warm[k], a[k], atol=1e-6, err_msg=k)
    moved = [k for k in a if not np.allclose(fresh[k], a[k], atol=1e-4)]
    assert moved, "a fresh adapter should differ from the trained one"
    if kind == "guard":
        assert any("score" in k for k in moved)  # the head was trained: the warm start kept it
    rec = json.loads((tmp_path / "warm" / "checkpoints" / kind / "recipe.json").read_text())
    assert rec[kind]["init_adapter"] == str(start)  # a resume is checked against the warm start too


def test_warm_start_refusals_are_one_line(first, tmp_path, capsys):
    root, recipe = first
    guard, lm = root / "run" / "guard", root / "run" / "lm"
    cases = [
        ([f"guard.init_adapter={tmp_path}"], "key 'guard.init_adapter'.*no adapter_config.json"),
        ([f"guard.init_adapter={guard}", "guard.lora.r=8"], "its LoRA r is 4 but guard.lora.r is 8"),
        ([f"guard.init_adapter={lm}"], "a CAUSAL_LM adapter, not a guard"),
        ([f"guard.init_adapter={guard}", "guard.init_head=probe"], "replaced by guard.init_head: probe"),
        ([f"guard.init_adapter={guard}", "guard.seeds=[0,1]"], "must hold one seed"),
    ]
    for extra, pattern in cases:
        capsys.readouterr()
        rc = moodguard(["train", "guard", "--recipe", str(recipe), f"output_dir={tmp_path / 'x'}", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(pattern, err), err
    assert not (tmp_path / "x" / "guard").exists()


def test_one_class_training_rows_finish_with_a_null_auroc(tmp_path, tiny_model_dir, capsys):
    """Training on unsafe rows only (a refresh on an incident's rows without replay): the
    validation AUROC is undefined; metrics.json records null instead of the run failing at the
    very end on a NaN it may not write."""
    from conftest import make_rows, write_jsonl

    rows = [r for r in make_rows(12, split="train") if r["malign"] == 1]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tmp_path / "data", tmp_path / "run",
                               guard__max_steps=2, guard__save_steps=2)
    capsys.readouterr()
    assert moodguard(["train", "guard", "--recipe", str(recipe)]) == 0
    metrics = json.loads((tmp_path / "run" / "guard" / "metrics.json").read_text())
    assert metrics["validation"]["eval_auroc"] is None and metrics["validation"]["eval_loss"] > 0
    assert "validation eval_auroc is nan (a validation slice with one class?): recorded as null" in capsys.readouterr().err
