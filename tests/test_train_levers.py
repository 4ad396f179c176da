"""The guard trainer's levers (issue 21 part 2): a head learning rate of its own, the LP-FT head
(``init_head: probe``), model selection on validation AUROC (``eval_every``), class-weighted
cross-entropy, and steps sized to the data (``max_steps: -1`` + ``num_epochs``). Tiny random 'xs'
Llama, a few steps, CPU."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moodguard.cli import main as moodguard
from test_train_guard import write_tiny_recipe
from train.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- helpers
class Spy:
    """Filled by a callback inside the real trainer: the trainable head at train begin and end,
    the optimizer's groups (initial lr, parameter names)."""

    head_begin: torch.Tensor | None = None
    head_end: torch.Tensor | None = None
    groups: list | None = None


def spy_on_trainer(monkeypatch, auroc_by_step: dict[int, float] | None = None) -> Spy:
    """Patch ``train.loop.make_trainer_class`` so that the trainer ``train_adapter`` builds carries
    a spying callback; ``auroc_by_step`` replaces the validation AUROC at those global steps."""
    from transformers import TrainerCallback

    from train import loop
    from train.probe import trainable_head

    spy = Spy()

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            spy.head_begin = trainable_head(model).weight.detach().clone()
            names = {id(p): n for n, p in model.named_parameters()}
            spy.groups = [(g.get("initial_lr", g["lr"]), [names[id(p)] for p in g["params"]])
                          for g in optimizer.param_groups]

        def on_train_end(self, args, state, control, model=None, **kwargs):
            spy.head_end = trainable_head(model).weight.detach().clone()

    make = loop.make_trainer_class

    def patched():
        class Spied(make()):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.add_callback(Watch())
                if auroc_by_step:
                    real = self.compute_metrics

                    def fake(pred):
                        out = real(pred)
                        if self.state.global_step in auroc_by_step:
                            out["auroc"] = auroc_by_step[self.state.global_step]
                        return out

                    self.compute_metrics = fake

        return Spied

    monkeypatch.setattr(loop, "make_trainer_class", patched)
    return spy


def head_of(adapter_dir: Path) -> torch.Tensor:
    sd = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return next(v for k, v in sd.items() if k.endswith("score.weight"))


def train(recipe: Path, *extra: str) -> None:
    assert moodguard(["train", "guard", "--recipe", str(recipe), *extra]) == 0


def metrics_of(run: Path, name: str = "guard") -> dict:
    return json.loads((run / name / "metrics.json").read_text())


def frozen_last_token_features(model_dir: Path, recipe_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Independent of train/probe.py: the bare backbone (AutoModel, no head, no peft), one train row
    at a time (no padding), the final hidden state at the last position, float64."""
    from transformers import AutoModel

    from train.data import tokenize_guard, train_validation_cut
    from train.modeling import load_tokenizer

    recipe = load_recipe(recipe_path)
    train_rows, _ = train_validation_cut(recipe)
    enc = tokenize_guard(train_rows, load_tokenizer(model_dir), recipe.guard.max_length)
    base = AutoModel.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        x = [base(input_ids=torch.tensor([ids])).last_hidden_state[0, -1].double().numpy() for ids in enc["input_ids"]]
    return np.stack(x), np.asarray(enc["labels"])


def probe_pass_features(recipe_path: Path) -> np.ndarray:
    """The train rows' features as the training's probe pass computes them (train/probe.py on a
    freshly built guard model: the frozen base, padded batches)."""
    from train.guard import build_guard_datasets, build_guard_model, guard_collator
    from train.modeling import load_tokenizer
    from train.probe import assemble, pooled_features

    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(recipe.model)
    rows = build_guard_datasets(recipe, tok)["train"]
    model = build_guard_model(recipe, tok)
    parts = pooled_features(model, rows, guard_collator(recipe, tok), recipe.guard.per_device_batch_size, "cpu")
    return assemble(parts, rows["length"])


# ----------------------------------------------------------------------------- (a) LP-FT
def test_probe_head_starts_equal_to_the_fitted_probe(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    spy = spy_on_trainer(monkeypatch)
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=2, guard__save_steps=10, guard__init_head="probe", guard__probe_c=0.5)
    train(rec)
    # the probe's feature is the frozen base's last-position hidden state (an independent
    # computation: bare AutoModel, one unpadded row at a time; float32 noise apart)
    x_ref, y = frozen_last_token_features(tiny_model_dir, rec)
    x = probe_pass_features(rec)
    np.testing.assert_allclose(x, x_ref, atol=1e-5, rtol=0)
    # sklearn fitted here on those features (std-scaled, no intercept: the tiny Llama's score has no bias)
    scale = x.std(axis=0)
    clf = LogisticRegression(C=0.5, fit_intercept=False, tol=1e-10, max_iter=10_000).fit(x / scale, y)
    w = clf.coef_[0] / scale
    expected = torch.tensor(np.stack([-w / 2, w / 2]), dtype=torch.float32)
    torch.testing.assert_close(spy.head_begin, expected, atol=1e-6, rtol=0)
    # the guard score at step 0 (logit[1] - logit[0]) is the probe's decision function
    score0 = x @ (spy.head_begin[1] - spy.head_begin[0]).double().numpy()
    np.testing.assert_allclose(score0, clf.decision_function(x / scale), atol=1e-4)
    record = metrics_of(tmp_path / "run")["init_head"]
    assert record["method"] == "probe" and record["c"] == 0.5 and record["intercept"] is False
    assert record["n_train"] == 66 and record["n_features"] == x.shape[1]
    assert record["train_auroc"] == pytest.approx(roc_auc_score(y, x @ w), abs=1e-9)
    card = (tmp_path / "run" / "guard" / "README.md").read_text()
    assert f"logistic probe on the frozen base's features (LP-FT; C 0.5): train AUROC {record['train_auroc']:.3f}" in card
    # the saved adapter holds the head that trained on from the probe (not peft's random one)
    saved = head_of(tmp_path / "run" / "guard")
    torch.testing.assert_close(saved, spy.head_end)
    assert not torch.equal(saved, spy.head_begin) and float((saved - spy.head_begin).abs().max()) < 0.05


def test_random_head_is_not_the_probe(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """The default (init_head: random) leaves peft's head alone and records no probe."""
    spy = spy_on_trainer(monkeypatch)
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=1, guard__save_steps=10)
    train(rec)
    x, y = frozen_last_token_features(tiny_model_dir, rec)
    from train.probe import fit_probe, head_rows

    probe_w = torch.tensor(head_rows(fit_probe(x, y, 1.0))[0], dtype=torch.float32)
    assert float((spy.head_begin - probe_w).abs().max()) > 1e-2
    assert metrics_of(tmp_path / "run")["init_head"] is None


def test_fit_probe_with_intercept_and_head_rows():
    """A head with a bias: standardised features + intercept, folded back: the head's logit
    difference equals sklearn's decision function on the standardised features."""
    from sklearn.linear_model import LogisticRegression

    from train.probe import assemble, fit_probe, head_rows

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [0.5, 2.0, 10.0, 1.0], size=(200, 4))
    y = (x @ [1.0, -0.3, 0.05, 0.0] + rng.normal(0, 0.5, 200) > 2.4).astype(int)
    probe = fit_probe(x, y, c=0.3, intercept=True)
    mu, sd = x.mean(0), x.std(0)
    ref = LogisticRegression(C=0.3, tol=1e-10, max_iter=10_000).fit((x - mu) / sd, y)
    np.testing.assert_allclose(probe.decision(x), ref.decision_function((x - mu) / sd), atol=1e-8)
    weight, bias = head_rows(probe)
    logits = x @ weight.T + bias
    np.testing.assert_allclose(logits[:, 1] - logits[:, 0], probe.decision(x), atol=1e-10)
    # batch-indexed parts (decreasing length) come back in dataset order
    lengths = [3, 9, 5, 9, 1]
    order = [1, 3, 2, 0, 4]  # by length descending, ties by index
    feats = np.arange(5.0)[:, None]
    parts = {0: feats[order[:2]], 1: feats[order[2:4]], 2: feats[order[4:]]}
    np.testing.assert_array_equal(assemble(parts, lengths), feats)


# ----------------------------------------------------------------------------- (b) model selection
def test_final_adapter_is_the_best_checkpoint_not_the_last(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    spy_on_trainer(monkeypatch, auroc_by_step={2: 0.9, 4: 0.6, 6: 0.7})
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=6, guard__eval_every=2, guard__save_total_limit=None)
    train(rec)
    run = tmp_path / "run"
    ckpts = run / "checkpoints" / "guard"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    final = load_file(str(run / "guard" / "adapter_model.safetensors"))
    best = load_file(str(ckpts / "checkpoint-2" / "adapter_model.safetensors"))
    last = load_file(str(ckpts / "checkpoint-6" / "adapter_model.safetensors"))
    assert final.keys() == best.keys() == last.keys()
    for k in final:
        assert torch.equal(final[k], best[k]), k
    assert any(not torch.equal(final[k], last[k]) for k in final)
    sel = metrics_of(run)["selection"]
    assert (sel["metric"], sel["best_step"], sel["best_value"], sel["best_checkpoint"], sel["last_step"]) == \
        ("eval_auroc", 2, 0.9, "checkpoint-2", 6)
    assert [(e["step"], e["eval_auroc"]) for e in sel["evaluations"]] == [(2, 0.9), (4, 0.6), (6, 0.7)]
    card = (run / "guard" / "README.md").read_text()
    assert "- Selected checkpoint: step 2 of 6 (auroc 0.900, the best of 3 validation evaluations)" in card


def test_selection_survives_a_resume(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """Resumed from checkpoint-4 (best so far: step 2), the run ends with checkpoint-2's adapter,
    like the uninterrupted run: the best metric and step come back from trainer_state.json."""
    from test_train_distributed import assert_same_adapter

    spy_on_trainer(monkeypatch, auroc_by_step={2: 0.9, 4: 0.6, 6: 0.7})
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=6, guard__eval_every=2, guard__save_total_limit=None)
    train(rec)
    run = tmp_path / "run"
    (run / "guard").rename(run / "guard.uninterrupted")
    shutil.rmtree(run / "checkpoints" / "guard" / "checkpoint-6")  # as if killed after checkpoint-4
    train(rec, "--resume")
    m = metrics_of(run)
    assert m["resumed_from"].endswith("checkpoint-4")
    assert m["selection"]["best_step"] == 2 and m["selection"]["best_value"] == 0.9
    assert_same_adapter(run / "guard.uninterrupted", run / "guard", atol=0)
    assert_same_adapter(run / "checkpoints" / "guard" / "checkpoint-2", run / "guard", atol=0)


def lora_b_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items() if "lora_B" in k}


def test_starting_weights_are_a_candidate_and_kept_when_no_step_beats_them(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                          monkeypatch):
    """eval_on_start: the LP-FT starting point (LoRA B at zero, the probe head) is evaluated before
    step 1 and saved as checkpoint-0; when no later evaluation beats it, it is the final adapter,
    and the checkpoint rotation keeps it (save_total_limit 2) while newer ones rotate out."""
    spy = spy_on_trainer(monkeypatch, auroc_by_step={0: 0.95, 2: 0.6, 4: 0.7, 6: 0.9})
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=6, guard__eval_every=2, guard__eval_on_start=True,
                            guard__save_total_limit=2, guard__init_head="probe")
    train(rec)
    run = tmp_path / "run"
    ckpts = run / "checkpoints" / "guard"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-0", "checkpoint-6"]
    sel = metrics_of(run)["selection"]
    assert (sel["best_step"], sel["best_value"], sel["best_checkpoint"], sel["last_step"]) == (0, 0.95, "checkpoint-0", 6)
    assert [(e["step"], e["eval_auroc"]) for e in sel["evaluations"]] == [(0, 0.95), (2, 0.6), (4, 0.7), (6, 0.9)]
    final = run / "guard"
    # the final adapter is the untrained start: the probe head, every LoRA B still zero
    torch.testing.assert_close(head_of(final), spy.head_begin, atol=0, rtol=0)
    torch.testing.assert_close(spy.head_end, spy.head_begin, atol=0, rtol=0)  # loaded back at the end of training
    assert not torch.equal(head_of(ckpts / "checkpoint-6"), spy.head_begin)  # training did move the head
    b = lora_b_tensors(final)
    assert b and all(float(v.abs().max()) == 0.0 for v in b.values())
    assert any(float(v.abs().max()) > 0 for v in lora_b_tensors(ckpts / "checkpoint-6").values())
    card = (final / "README.md").read_text()
    assert "- Selected checkpoint: step 0 (the starting weights, before any update) of 6 (auroc 0.950, the best of 4" in card


def test_starting_weights_compete_and_lose_like_any_step(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """A later step that beats the start wins; step 0 is in the record and checkpoint-0 rotates out."""
    spy_on_trainer(monkeypatch, auroc_by_step={0: 0.5, 2: 0.8, 4: 0.7})
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=4, guard__eval_every=2, guard__eval_on_start=True, guard__save_total_limit=2)
    train(rec)
    run = tmp_path / "run"
    ckpts = run / "checkpoints" / "guard"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    sel = metrics_of(run)["selection"]
    assert (sel["best_step"], sel["best_value"]) == (2, 0.8)
    assert [e["step"] for e in sel["evaluations"]] == [0, 2, 4]
    final = load_file(str(run / "guard" / "adapter_model.safetensors"))
    best = load_file(str(ckpts / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in final)


def test_a_resumed_run_keeps_the_starting_weights_as_the_uninterrupted_one_does(tmp_path, tiny_model_dir,
                                                                                tiny_dataset_dir, monkeypatch):
    """Killed after checkpoint-4 with step 0 the best so far: the resumed run does not evaluate its
    resume point again, records the same evaluations, and ends with checkpoint-0's adapter."""
    from test_train_distributed import assert_same_adapter

    spy_on_trainer(monkeypatch, auroc_by_step={0: 0.95, 2: 0.6, 4: 0.7, 6: 0.9})
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=6, guard__eval_every=2, guard__eval_on_start=True,
                            guard__save_total_limit=None, guard__init_head="probe")
    train(rec)
    run = tmp_path / "run"
    first = metrics_of(run)["selection"]
    (run / "guard").rename(run / "guard.uninterrupted")
    shutil.rmtree(run / "checkpoints" / "guard" / "checkpoint-6")
    train(rec, "--resume")
    m = metrics_of(run)
    assert m["resumed_from"].endswith("checkpoint-4")
    assert m["selection"] == first and first["best_step"] == 0
    assert_same_adapter(run / "guard.uninterrupted", run / "guard", atol=0)
    assert_same_adapter(run / "checkpoints" / "guard" / "checkpoint-0", run / "guard", atol=0)


# ----------------------------------------------------------------------------- (5) epochs
def test_epochs_size_the_steps_and_select_per_epoch(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys):
    """max_steps -1 + num_epochs 2: 66 train rows at global batch 8 = 9 steps an epoch, 18 steps;
    evaluated and saved at the end of each epoch, the best epoch's weights are the adapter, and
    the final validation AUROC is the selected one's."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=-1, guard__num_epochs=2, guard__eval_every="epoch",
                            guard__save_total_limit=None)
    train(rec)
    assert "moodguard: guard: 66 train rows, global batch 8: 9 steps per epoch; 18 steps = 2 epochs" in capsys.readouterr().err
    run = tmp_path / "run"
    m = metrics_of(run)
    assert (m["steps_per_epoch"], m["max_steps"], m["epochs"]) == (9, 18, 2.0)
    ckpts = run / "checkpoints" / "guard"
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-18", "checkpoint-9"]
    sel = m["selection"]
    values = [e["eval_auroc"] for e in sel["evaluations"]]
    assert [e["step"] for e in sel["evaluations"]] == [9, 18]
    assert sel["best_step"] == [9, 18][int(np.argmax(values))] and sel["best_value"] == max(values)
    assert m["validation"]["eval_auroc"] == pytest.approx(sel["best_value"], abs=1e-12)
    best = load_file(str(ckpts / f"checkpoint-{sel['best_step']}" / "adapter_model.safetensors"))
    final = load_file(str(run / "guard" / "adapter_model.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in final)


# ----------------------------------------------------------------------------- (c) head learning rate
def test_head_learning_rate_is_a_group_of_its_own(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    moved = {}
    for label, extra in (("shared", {}), ("head", {"guard__head_learning_rate": 2e-2})):
        spy = spy_on_trainer(monkeypatch)
        rec = write_tiny_recipe(tmp_path / f"{label}.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / label,
                                guard__max_steps=3, guard__save_steps=10, guard__warmup_ratio=0.0,
                                guard__learning_rate=1e-3, **extra)  # pinned: the recipes' lr may change
        train(rec)
        moved[label] = float((head_of(tmp_path / label / "guard") - spy.head_begin).norm())
        if label == "shared":
            assert len(spy.groups) == 2 and {lr for lr, _ in spy.groups} == {1e-3}  # Trainer's own two groups
            continue
        by_lr = {lr: names for lr, names in spy.groups if names}
        assert sorted(by_lr) == [1e-3, 2e-2]
        assert by_lr[2e-2] and all(".modules_to_save." in n and "score" in n for n in by_lr[2e-2])
        assert by_lr[1e-3] and all("lora_" in n for n in by_lr[1e-3])
        assert metrics_of(tmp_path / label)["head_learning_rate"] == 2e-2
    # Adam steps scale with the lr: 20x the lr moves the head several times farther
    assert moved["head"] > 5 * moved["shared"] > 0


def test_optimizer_groups_keep_trainers_weight_decay_rule():
    from torch import nn

    from train.loop import optimizer_groups

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)
            self.norm = nn.LayerNorm(3)
            self.score = nn.ModuleDict({"modules_to_save": nn.ModuleDict({"default": nn.Linear(3, 2)})})
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

    m = Tiny()
    named = list(m.named_parameters())
    decay = [n for n, _ in named if "bias" not in n and "norm" not in n]
    ids = {id(p): n for n, p in named}
    groups = optimizer_groups(named, decay, 0.1, 5e-3)
    got = [(g.get("lr"), g["weight_decay"], sorted(ids[id(p)] for p in g["params"])) for g in groups]
    assert got == [
        (None, 0.1, ["proj.weight"]),
        (None, 0.0, ["norm.bias", "norm.weight", "proj.bias"]),
        (5e-3, 0.1, ["score.modules_to_save.default.weight"]),
        (5e-3, 0.0, ["score.modules_to_save.default.bias"]),
    ]
    # without a head lr: Trainer's two groups, head included in them
    assert [len(g["params"]) for g in optimizer_groups(named, decay, 0.1, None)] == [2, 4]


# ----------------------------------------------------------------------------- (d) class weights
def test_class_weights_give_weighted_cross_entropy(tiny_model_dir, tiny_tokenizer, tmp_path):
    """compute_loss = mean_i w[y_i] * CE_i, computed by hand from the model's logits; a micro-batch
    run as row chunks gives the same loss and gradient (the chunking weights stay right)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from train.data import guard_collator, split_micro_batch
    from train.loop import make_trainer_class

    tok = tiny_tokenizer
    tok.padding_side = "left"
    texts = ["please help me write a note", "sure here is how", "call the function with arguments city name",
             "thanks", "how do i hurt someone sorry i cannot help", "secret password code"]
    labels = [0, 1, 1, 0, 1, 1]
    batch = guard_collator(tok, None)([{**tok(t), "labels": y} for t, y in zip(texts, labels)])
    weights = [0.5, 2.0]
    results = []
    for budget in (None, 2 * batch["input_ids"].shape[1]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        model.config.pad_token_id = tok.pad_token_id
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=6)
        trainer = make_trainer_class()(model=model, args=args, lengths=[1], group_size=1, group_by_length=False,
                                       mean_loss=True, max_tokens_per_forward=budget, class_weights=weights)
        trainer.current_gradient_accumulation_steps = 1
        if budget is None:
            with torch.no_grad():
                loss = trainer.compute_loss(model, dict(batch))
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
                plain = model(**batch).loss  # the model's own unweighted mean CE
            y = batch["labels"]
            ce = torch.logsumexp(logits, -1) - logits[torch.arange(len(y)), y]
            by_hand = (torch.tensor(weights, dtype=torch.float64)[y] * ce).mean()
            assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)
            assert abs(float(loss) - float(plain)) > 1e-3  # the weights change the loss
        else:
            assert len(split_micro_batch(batch, budget)) == 3
        loss = trainer.training_step(model, dict(batch))
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, ga), (loss_b, gb) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6)


def test_class_weight_vector():
    from mood_data.errors import DataError
    from train.loop import class_weight_vector

    labels = [0] * 30 + [1] * 10
    assert class_weight_vector(None, labels) is None
    assert class_weight_vector("balanced", labels) == pytest.approx([40 / 60, 40 / 20])
    # a given pair keeps its ratio, rescaled to mean 1 over the train rows: (30 a + 10 3a) / 40 = 1
    assert class_weight_vector([1.0, 3.0], labels) == pytest.approx([2 / 3, 2.0])
    with pytest.raises(DataError, match="needs both classes"):
        class_weight_vector("balanced", [0, 0, 0])


def test_class_weights_recorded_end_to_end(tmp_path, tiny_model_dir, tiny_dataset_dir):
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=1, guard__save_steps=10, guard__class_weights=[1, 3])
    train(rec)
    # 66 train rows, 33 of each class: [1, 3] rescaled to mean 1
    assert metrics_of(tmp_path / "run")["class_weights"] == pytest.approx([0.5, 1.5])


def test_lm_selects_on_validation_loss(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """eval_every on the causal LM: the best checkpoint is the one with the lowest validation loss."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            lm__max_steps=3, lm__eval_every=1, lm__save_total_limit=None)
    assert moodguard(["train", "lm", "--recipe", str(rec)]) == 0
    m = metrics_of(tmp_path / "run", "lm")
    sel = m["selection"]
    losses = [e["eval_loss"] for e in sel["evaluations"]]
    assert sel["metric"] == "eval_loss" and sel["greater_is_better"] is False and len(losses) == 3
    assert sel["best_step"] == 1 + int(np.argmin(losses)) and sel["best_value"] == min(losses)
    assert m["validation"]["eval_loss"] == pytest.approx(min(losses), rel=1e-6)


def test_checkpoints_from_before_the_levers_still_resume(tmp_path):
    """A checkpoint record written before the lever keys existed resumes with a recipe that leaves
    them at their defaults (the behaviour that run had), and is refused with a non-default one."""
    from mood_data.errors import RecipeError
    from train.checkpoints import RECIPE_FILE, resume_point
    from train.recipe_files import RECIPES_DIR

    recipe = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", [f"output_dir={tmp_path}"])
    ckpt = tmp_path / "checkpoints" / "guard"
    assert resume_point(recipe, "guard", ckpt, resume=False) is None
    record = json.loads((ckpt / RECIPE_FILE).read_text())
    for key in ("eval_every", "head_learning_rate", "init_head", "probe_c", "class_weights"):
        del record["guard"][key]  # what the old code wrote
    (ckpt / RECIPE_FILE).write_text(json.dumps(record))
    step = ckpt / "checkpoint-2"
    step.mkdir()
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    assert resume_point(recipe, "guard", ckpt, resume=True) == str(step)
    (ckpt / RECIPE_FILE).write_text(json.dumps(record))
    probe = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", [f"output_dir={tmp_path}", "guard.init_head=probe"])
    with pytest.raises(RecipeError, match="key 'guard.init_head': 'random' in the checkpoints, 'probe' now"):
        resume_point(probe, "guard", ckpt, resume=True)


def test_an_embedding_lora_adapter_holds_the_factors_not_the_table(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """The tiny recipes put a LoRA on embed_tokens: the saved adapter (final and checkpoints)
    holds its lora_embedding factors and the head, never a copy of the frozen embedding table,
    and loads back onto the base to the trained model's logits."""
    from train.modeling import load_guard_model, load_tokenizer

    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=2, guard__save_steps=1,
                            guard__lora__target_modules=["embed_tokens", "q_proj", "v_proj"])
    train(rec)
    saved = [tmp_path / "run" / "guard", *sorted((tmp_path / "run").rglob("checkpoint-*"))]
    assert len(saved) >= 2
    for folder in saved:
        keys = set(load_file(str(folder / "adapter_model.safetensors")))
        assert any("lora_embedding_A" in k for k in keys) and any(k.endswith("score.weight") for k in keys), folder
        assert not [k for k in keys if "embed_tokens" in k and "lora_" not in k], folder
    tok = load_tokenizer(tiny_model_dir)
    batch = tok(["user: hello\nassistant: hi there"], return_tensors="pt")
    model = load_guard_model(tiny_model_dir, tmp_path / "run" / "guard").eval()
    bare = load_guard_model(tiny_model_dir).eval()
    with torch.no_grad():
        moved = model.get_base_model().model.embed_tokens(batch["input_ids"])
        plain = bare.model.embed_tokens(batch["input_ids"])
    assert not torch.allclose(moved, plain)  # the embedding LoRA was loaded and acts
