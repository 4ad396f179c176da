"""Offline: with HF_HUB_OFFLINE=1 and every proxy pointing at a closed port, commands on local
models and data work, and ``report_to: wandb`` falls back to offline logging without hanging."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from test_train_guard import write_tiny_recipe

REPO = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, every connection is refused


def offline_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # WANDB_MODE unset
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               HTTP_PROXY=DEAD, HTTPS_PROXY=DEAD, http_proxy=DEAD, https_proxy=DEAD, ALL_PROXY=DEAD, NO_PROXY="")
    env.pop("TRANSFORMERS_OFFLINE", None)  # HF_HUB_OFFLINE alone must be enough
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def moodguard_offline(argv: list[str], cwd: Path, timeout: int = 240) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moodguard.cli", *argv], cwd=cwd, env=offline_env(),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - t0


def test_hub_offline_flag(monkeypatch):
    from train.loop import hub_offline

    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    assert hub_offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert hub_offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_offline() is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "true")
    assert hub_offline() is True


def test_train_with_wandb_falls_back_offline(tmp_path, tiny_model_dir, tiny_dataset_dir):
    recipe = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                               report_to="wandb", guard__max_steps=1, guard__save_steps=1)
    proc, seconds = moodguard_offline(["train", "guard", "--recipe", str(recipe)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "guard" / "adapter_model.safetensors").is_file()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # logged locally for `wandb sync`, no network attempt hung the run
    assert seconds < 180


def test_data_and_embedded_tokenizer_offline(tmp_path, tiny_dataset_dir):
    proc, _ = moodguard_offline(["data", "validate", str(tiny_dataset_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"OK {tiny_dataset_dir}: train 72 rows")
    proc, _ = moodguard_offline(["data", "stats", str(tiny_dataset_dir), "--tokenizer", "embedded:tiny-s"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tokens_p50" in proc.stdout.splitlines()[0]


def test_hub_id_offline_is_a_one_line_error(tmp_path):
    proc, seconds = moodguard_offline(["data", "validate", "mood-bench/not-cached-anywhere"], tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moodguard data: error: mood-bench/not-cached-anywhere")
    assert "Traceback" not in proc.stderr
    assert seconds < 60
