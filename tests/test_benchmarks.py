"""Throughput-benchmark helpers: conversation-like lengths, micro-batch row chunks (same
gradient as the whole micro-batch), and the benchmarks' imports without ``datasets``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import lognormal_lengths, realistic_rows
from train.data import guard_collator, split_micro_batch

REPO = Path(__file__).resolve().parents[1]


def test_lognormal_lengths_median_clip_and_seed():
    a = lognormal_lengths(4001, 450, 2048, sigma=0.5, seed=3)
    assert a.dtype == np.int64 and a.min() >= 16 and a.max() <= 2048
    assert abs(np.median(a) - 450) < 20  # median of LogNormal(log 450, 0.5)
    assert np.array_equal(a, lognormal_lengths(4001, 450, 2048, sigma=0.5, seed=3))
    clipped = lognormal_lengths(1000, 450, 300, sigma=0.5, seed=3)
    assert clipped.max() == 300 and (clipped == 300).mean() > 0.7  # P(L >= 300) = P(z >= -0.81) = 0.79


def test_realistic_rows_lengths_suffix_and_label():
    pool = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    labels = [0, 1, 0]
    rows, out = realistic_rows(pool, labels, 50, median=6, max_length=9, sigma=0.6, seed=1)
    targets = lognormal_lengths(50, 6, 9, sigma=0.6, seed=1)
    assert [len(r) for r in rows] == targets.tolist()
    for r, y in zip(rows, out):
        last = next(j for j, p in enumerate(pool) if r[-len(p):] == p or (len(r) < len(p) and p[-len(r):] == r))
        assert y == labels[last]  # the label of the conversation the row ends with


def _left_batch(lengths, width, pad=0):
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.arange(1, n + 1) + 100 * i
        mask[i, width - n:] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = torch.tensor([0, 1, 1, 0])[:len(lengths)]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def test_split_micro_batch_by_hand():
    batch = _left_batch([8, 3, 2, 5], 8)
    assert split_micro_batch(batch, 32) == [batch]  # within budget: untouched
    a, b = split_micro_batch(batch, 16)  # 16 // 8 = 2 rows per chunk
    assert a["input_ids"].shape == (2, 8) and a["labels"].tolist() == [0, 1]
    # second chunk: rows of 2 and 5 tokens -> width 5 (pad multiple 1), the trailing columns kept
    assert b["input_ids"].tolist() == [[0, 0, 0, 201, 202], [301, 302, 303, 304, 305]]
    assert b["attention_mask"].tolist() == [[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 0, 1], [0, 1, 2, 3, 4]]
    assert b["labels"].tolist() == [1, 0]
    c = split_micro_batch(batch, 16, multiple=4)[1]
    assert c["input_ids"].shape == (2, 8)  # width 5 rounded up to 8
    one = split_micro_batch(batch, 3)  # budget below one row: one row per chunk
    assert [x["input_ids"].shape[1] for x in one] == [8, 3, 2, 5]


def test_chunked_training_step_gives_the_same_gradient(tiny_model_dir, tiny_tokenizer, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from train.loop import make_trainer_class

    tok = tiny_tokenizer
    tok.padding_side = "left"
    texts = ["please help me write a note", "sure here is how", "call the function with arguments city name",
             "thanks", "how do i hurt someone sorry i cannot help"]
    feats = [{**tok(t), "labels": i % 2} for i, t in enumerate(texts)]
    batch = guard_collator(tok, None)(feats)
    assert len(split_micro_batch(batch, 2 * batch["input_ids"].shape[1])) == 3  # rows 2 + 2 + 1
    grads = []
    for budget in (None, 2 * batch["input_ids"].shape[1]):  # None vs chunks of 2 rows
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
        model.config.pad_token_id = tok.pad_token_id
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=5)
        trainer = make_trainer_class()(model=model, args=args, lengths=[1], group_size=1, group_by_length=False,
                                       mean_loss=True, max_tokens_per_forward=budget)
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(model, dict(batch))
        grads.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, ga), (loss_b, gb) = grads
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6)


def test_benchmarks_import_without_datasets():
    """The GPU box has no datasets / deepspeed / wandb / evaluate: the benchmarks must not need them."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('datasets', 'deepspeed', 'wandb', 'evaluate'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.path.insert(0, 'benchmarks')\n"
        "import benchmarks.train_throughput, benchmarks.score_throughput\n"
        "from benchmarks.common import load_rows\n"
        "texts, labels = load_rows('train')\n"
        "import train.launch, train.guard, eval.run.evaluate\n"
        "print(len(texts), sum(labels) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    n, has_unsafe = out.stdout.split()
    assert int(n) > 100 and has_unsafe == "True"


def test_gpu_suite_smoke_runs_every_part(tmp_path):
    """``SMOKE=1 bash benchmarks/gpu_suite.sh`` (the GPU suite's own script on CPU, tiny shapes):
    the end-to-end part runs all six stages on the device the policy resolves (the CPU here)
    and the throughput parts finish with equal scores. The zero2/fsdp part is left out here
    (SKIP_TRAIN_CONFIGS: the training side's tests run those configs on CPU). (~32 s of CPU;
    the wall time depends on the machine's load.)"""
    import json
    import os

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "SKIP_TRAIN_CONFIGS": "1"}
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_suite.sh")], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    e2e = json.loads((tmp_path / "e2e.json").read_text())
    assert e2e["ok"] and e2e["evaluate_devices"] == ["cpu"] and e2e["scored_rows"] == 16
    assert [s["stage"] for s in e2e["stages"]] == ["train guard", "train lm", "fit", "evaluate", "export", "score"]
    assert all(s["rc"] == 0 and s["seconds"] > 0 for s in e2e["stages"])
    score = json.loads((tmp_path / "score-tiny-s.json").read_text())
    assert all(score["scores_equal"].values())
    assert (tmp_path / "train-tiny-s.json").is_file()
    assert "[train-configs] skipped: SKIP_TRAIN_CONFIGS is set" in proc.stdout
    summary = (tmp_path / "summary.md").read_text()
    assert "| e2e (" in summary and "all stages ok on cpu" in summary
