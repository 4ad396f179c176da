"""Multi-process and resume: 2 gloo ranks == 1 process at the same global batch; a run killed
with SIGKILL and resumed == an uninterrupted run; the causal LM through accelerate launch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from moodguard.cli import main as moodguard
from test_train_guard import write_tiny_recipe

REPO = Path(__file__).resolve().parents[1]

# multi-process / subprocess runs: 10-15 s each on a 2-core CPU; part of the CI suite


def adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, atol=1e-5):
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=1e-4, msg=k)


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, tiny_dataset_dir):
    one = write_tiny_recipe(tmp_path / "one.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "one", guard__max_steps=4)
    two = write_tiny_recipe(tmp_path / "two.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "two", guard__max_steps=4)
    assert moodguard(["train", "guard", "--recipe", str(one)]) == 0  # 1 process x 8
    cmd = [sys.executable, "-m", "moodguard.cli", "train", "guard", "--recipe", str(two),
           "--accelerate-config", "cpu", "--num-processes", "2", "guard.per_device_batch_size=4",
           "lm.per_device_batch_size=4"]
    proc = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "guard" / "metrics.json").read_text())
    m2 = json.loads((tmp_path / "two" / "guard" / "metrics.json").read_text())
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert m1["gradient_accumulation_steps"] == m2["gradient_accumulation_steps"] == 1
    assert_same_adapter(tmp_path / "one" / "guard", tmp_path / "two" / "guard")
    # the validation metrics are computed over the same 6 rows (duplicates from uneven
    # sharding are dropped by gather_for_metrics)
    assert m1["validation"]["eval_auroc"] == m2["validation"]["eval_auroc"]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_dataset_dir):
    extra = dict(guard__max_steps=8, guard__save_steps=2, guard__save_total_limit=None)
    ref = write_tiny_recipe(tmp_path / "ref.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "ref", **extra)
    assert moodguard(["train", "guard", "--recipe", str(ref)]) == 0
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **extra)
    ckpts = tmp_path / "run" / "checkpoints" / "guard"
    proc = subprocess.Popen([sys.executable, "-m", "train.guard", "--recipe", str(rec)], env=env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (ckpts / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None, "training ended before the first checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "guard").exists()  # killed before the final save
    assert moodguard(["train", "guard", "--recipe", str(rec), "--resume"]) == 0
    metrics = json.loads((tmp_path / "run" / "guard" / "metrics.json").read_text())
    assert metrics["resumed_from"] is not None and "checkpoint-" in metrics["resumed_from"]
    assert_same_adapter(tmp_path / "ref" / "guard", tmp_path / "run" / "guard")


def test_lm_through_accelerate_launch_two_ranks(tmp_path, tiny_model_dir, tiny_dataset_dir):
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            lm__max_steps=2, lm__per_device_batch_size=4)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu.yaml"),
           "--main_process_port", "0", "-m", "train.lm", "--recipe", str(rec)]
    proc = subprocess.run(cmd, env={**env(), "ACCELERATE_USE_CPU": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "lm" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["train"]["train_loss"] > 0
    assert (tmp_path / "run" / "lm" / "adapter_model.safetensors").is_file()
