"""Multi-process and resume: 2 gloo ranks == 1 process at the same global batch; a run killed
with SIGKILL and resumed == an uninterrupted run; the causal LM through accelerate launch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
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


# one 2-rank DDP run (the cpu config: gloo) shared by the DDP == 1-process test and by the
# ZeRO-2 / ZeRO-3 / FSDP tests, which must reproduce its adapter
DIST_STEPS = dict(guard__max_steps=4, guard__save_steps=2, guard__save_total_limit=None)
# float32 on CPU; the measured differences are ~1e-8 (reduction order), 1e-5 leaves room
ADAPTER_ATOL = 1e-5


def train_two_ranks(tmp_path: Path, recipe: Path, config: str, *extra: str, use_cpu_env: bool = False):
    """``moodguard train guard --accelerate-config CONFIG --num-processes 2`` (the user's command)."""
    cmd = [sys.executable, "-m", "moodguard.cli", "train", "guard", "--recipe", str(recipe),
           "--accelerate-config", config, "--num-processes", "2", "guard.per_device_batch_size=4",
           "lm.per_device_batch_size=4", *extra]
    e = {**env(), **({"ACCELERATE_USE_CPU": "1"} if use_cpu_env else {})}
    return subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    rec = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run", **DIST_STEPS)
    proc = train_two_ranks(root, rec, "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def test_two_processes_equal_one_process(tmp_path, tiny_model_dir, tiny_dataset_dir, ddp_run):
    one = write_tiny_recipe(tmp_path / "one.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "one", **DIST_STEPS)
    assert moodguard(["train", "guard", "--recipe", str(one)]) == 0  # 1 process x 8
    m1 = json.loads((tmp_path / "one" / "guard" / "metrics.json").read_text())
    m2 = json.loads((ddp_run / "guard" / "metrics.json").read_text())
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert m1["gradient_accumulation_steps"] == m2["gradient_accumulation_steps"] == 1
    assert m2["engine"]["distributed_type"] in ("MULTI_CPU", "MULTI_GPU")
    assert_same_adapter(tmp_path / "one" / "guard", ddp_run / "guard")
    # the validation metrics are computed over the same 6 rows (duplicates from uneven
    # sharding are dropped by gather_for_metrics)
    assert m1["validation"]["eval_auroc"] == m2["validation"]["eval_auroc"]


# every guard lever at once (train/probe.py, train/loop.py): LP-FT head, its own lr, class weights,
# evaluation + best checkpoint every 2 steps, the starting weights a candidate too (checkpoint-0)
LEVERS = dict(guard__max_steps=4, guard__eval_every=2, guard__eval_on_start=True, guard__save_total_limit=None,
              guard__init_head="probe", guard__head_learning_rate=1e-2, guard__class_weights=[1, 2])


@pytest.fixture(scope="module")
def levers_one_process(tmp_path_factory, tiny_model_dir, tiny_dataset_dir) -> Path:
    root = tmp_path_factory.mktemp("levers1")
    rec = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run", **LEVERS)
    assert moodguard(["train", "guard", "--recipe", str(rec)]) == 0  # 1 process x 8
    return root / "run"


def check_levers_match(run: Path, one: Path, processes: int = 2) -> None:
    """The same probe (features gathered over the ranks, fitted once, broadcast), the same
    evaluations and best step, the same final adapter as one process at the same global batch."""
    m1 = json.loads((one / "guard" / "metrics.json").read_text())
    m2 = json.loads((run / "guard" / "metrics.json").read_text())
    assert (m1["num_processes"], m2["num_processes"]) == (1, processes)
    drop = {"seconds"}
    assert {k: v for k, v in m2["init_head"].items() if k not in drop} == \
        {k: v for k, v in m1["init_head"].items() if k not in drop}
    assert m2["class_weights"] == m1["class_weights"] and m2["steps_per_epoch"] == m1["steps_per_epoch"]
    s1, s2 = m1["selection"], m2["selection"]
    assert (s2["best_step"], s2["best_checkpoint"]) == (s1["best_step"], s1["best_checkpoint"])
    assert [e["step"] for e in s2["evaluations"]] == [e["step"] for e in s1["evaluations"]] == [0, 2, 4]
    assert_same_adapter(run / "checkpoints" / "guard" / "checkpoint-0", one / "checkpoints" / "guard" / "checkpoint-0")
    for a, b in zip(s1["evaluations"], s2["evaluations"]):
        assert b["eval_auroc"] == pytest.approx(a["eval_auroc"], abs=1e-6)
    assert_same_adapter(run / "guard", one / "guard")
    best = run / "checkpoints" / "guard" / s2["best_checkpoint"]
    assert_same_adapter(run / "guard", best, atol=0)


def test_levers_two_processes_equal_one_process(tmp_path, tiny_model_dir, tiny_dataset_dir, levers_one_process):
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **LEVERS)
    proc = train_two_ranks(tmp_path, rec, "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_levers_match(tmp_path / "run", levers_one_process)


@pytest.mark.parametrize("config", ["zero2", "zero3", "fsdp"])
def test_levers_other_engines_equal_one_process(tmp_path, tiny_model_dir, tiny_dataset_dir, levers_one_process, config):
    """ZeRO-2 / ZeRO-3 (the probe pass gathers the partitioned weights, the head is written through
    GatheredParameters) and FSDP (only rank 0 holds weights at load: it computes every feature;
    load_best_model_at_end reads an FSDP checkpoint): the same probe, best step and adapter."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **LEVERS)
    if config == "fsdp":
        proc = fsdp_launch(tmp_path, fsdp_cpu_config(tmp_path), rec)
    else:
        proc = train_two_ranks(tmp_path, rec, config, use_cpu_env=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_levers_match(tmp_path / "run", levers_one_process)


def guard_logits(model_dir: Path, adapter_dir: Path, tokenizer_dir: Path) -> torch.Tensor:
    """The saved adapter loaded the way eval loads it (score head from the adapter), on 4 texts."""
    from train.modeling import load_guard_model, load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    model = load_guard_model(model_dir, adapter_dir, "float32").eval()
    batch = tok(["hello there", "how do i hurt someone", "sure here is the code", "thanks"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def adapter_max_abs_diff(a: Path, b: Path) -> float:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def check_matches_ddp(run: Path, ddp: Path, model_dir: Path, engine: dict) -> float:
    """The engine really ran, the adapter is complete (LoRA + score head), loads, and equals DDP's."""
    metrics = json.loads((run / "guard" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    for k, v in engine.items():
        assert metrics["engine"][k] == v, (k, metrics["engine"])
    keys = set(adapter(run / "guard"))
    assert keys == set(adapter(ddp / "guard")) and any(k.endswith("score.weight") for k in keys)
    diff = adapter_max_abs_diff(run / "guard", ddp / "guard")
    print(f"adapter max-abs difference vs DDP ({engine}): {diff:.3g}")
    assert_same_adapter(run / "guard", ddp / "guard", atol=ADAPTER_ATOL)
    torch.testing.assert_close(guard_logits(model_dir, run / "guard", run / "guard"),
                               guard_logits(model_dir, ddp / "guard", ddp / "guard"), atol=ADAPTER_ATOL, rtol=1e-4)
    return diff


@pytest.mark.parametrize("config,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_two_ranks_match_ddp(tmp_path, tiny_model_dir, tiny_dataset_dir, ddp_run, config, stage):
    """Issue 16 item 4 command (ACCELERATE_USE_CPU=1 ... --accelerate-config zero2|zero3
    --num-processes 2): DeepSpeed really runs (not DDP), ZeRO-3 gets past the first forward, the
    gathered adapter equals DDP's."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **DIST_STEPS)
    proc = train_two_ranks(tmp_path, rec, config, use_cpu_env=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_matches_ddp(tmp_path / "run", ddp_run, tiny_model_dir, {"distributed_type": "DEEPSPEED", "zero_stage": stage})


def fsdp_cpu_config(tmp_path: Path, state_dict_type: str | None = None) -> Path:
    """accelerate_configs/fsdp.yaml as shipped, for 2 local CPU ranks (float32, 127.0.0.1)."""
    cfg = yaml.safe_load((REPO / "accelerate_configs" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, mixed_precision="no", main_process_ip="127.0.0.1")
    if state_dict_type:
        cfg["fsdp_config"]["fsdp_state_dict_type"] = state_dict_type
    path = tmp_path / "fsdp-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fsdp_launch(tmp_path: Path, config: Path, recipe: Path, *extra: str):
    """Two CPU ranks under the shipped FSDP settings through tests/fsdp_cpu_rank.py (accelerate
    enables FSDP only on accelerator devices; the shim reports one, torch's FSDP2 runs over gloo)."""
    e = env()
    e["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + e["PYTHONPATH"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0",
           "-m", "fsdp_cpu_rank", "train.guard", "--recipe", str(recipe), "guard.per_device_batch_size=4", *extra]
    return subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_fsdp_full_adapter_matches_ddp_and_resumes(tmp_path, tiny_model_dir, tiny_dataset_dir, ddp_run):
    """accelerate_configs/fsdp.yaml: the final adapter is complete (score head included), equals
    DDP's, and a run resumed from checkpoint-2 ends with the same adapter."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **DIST_STEPS)
    config = fsdp_cpu_config(tmp_path)
    proc = fsdp_launch(tmp_path, config, rec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    check_matches_ddp(run, ddp_run, tiny_model_dir,
                      {"distributed_type": "FSDP", "fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"})
    # resume: as if killed after checkpoint-2
    (run / "guard").rename(run / "guard.uninterrupted")
    shutil.rmtree(run / "checkpoints" / "guard" / "checkpoint-4")
    proc = fsdp_launch(tmp_path, config, rec, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "guard" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-2")
    assert_same_adapter(run / "guard.uninterrupted", run / "guard")


def test_fsdp_sharded_state_dict_still_saves_full_adapter(tmp_path, tiny_model_dir, tiny_dataset_dir, ddp_run):
    """With SHARDED_STATE_DICT Trainer.save_model writes no adapter (accelerate issue 3732); the
    training loop gathers it explicitly instead of listing a staging folder that does not exist."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=4, guard__save_steps=100)
    proc = fsdp_launch(tmp_path, fsdp_cpu_config(tmp_path, "SHARDED_STATE_DICT"), rec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_matches_ddp(tmp_path / "run", ddp_run, tiny_model_dir,
                      {"distributed_type": "FSDP", "fsdp_state_dict_type": "SHARDED_STATE_DICT"})


def test_fsdp_on_cpu_only_machine_fails_in_one_line_not_hangs(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """The issue's `--accelerate-config fsdp` on CPU hung (a failed rank's barrier against the
    other rank's DDP setup); now every rank stops with one line naming the reason."""
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", guard__max_steps=2)
    proc = train_two_ranks(tmp_path, rec, "fsdp", use_cpu_env=True)
    assert proc.returncode != 0
    assert "moodguard train guard: error: accelerate config with distributed_type FSDP: FSDP needs GPUs" in proc.stderr
    assert not (tmp_path / "run" / "guard").exists()


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


def test_stop_file_checkpoints_stops_and_resume_equals_uninterrupted(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                     monkeypatch):
    """What the Slurm USR1 trap asks (recipes/launch.slurm): with $MOODGUARD_STOP_FILE present
    training saves a checkpoint at the next step and exits 75 without a final adapter; the
    requeued run (--resume) ends with the adapter of an uninterrupted run."""
    from train.distributed import EXIT_STOPPED, STOP_FILE_ENV

    extra = dict(guard__max_steps=4, guard__save_steps=100, guard__save_total_limit=None)
    ref = write_tiny_recipe(tmp_path / "ref.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "ref", **extra)
    assert moodguard(["train", "guard", "--recipe", str(ref)]) == 0
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run", **extra)
    stop = tmp_path / "stop-now"
    stop.touch()
    monkeypatch.setenv(STOP_FILE_ENV, str(stop))
    assert moodguard(["train", "guard", "--recipe", str(rec)]) == EXIT_STOPPED
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "guard").iterdir())
    # recipe.json: the recipe record --resume is checked against (train/checkpoints.py)
    assert ckpts == ["checkpoint-1", "recipe.json"] and not (tmp_path / "run" / "guard").exists()
    stop.unlink()
    assert moodguard(["train", "guard", "--recipe", str(rec), "--resume"]) == 0
    metrics = json.loads((tmp_path / "run" / "guard" / "metrics.json").read_text())
    assert metrics["resumed_from"].endswith("checkpoint-1")
    assert_same_adapter(tmp_path / "ref" / "guard", tmp_path / "run" / "guard")


@pytest.mark.slow  # ~75 s; benchmarks/gpu_suite.sh's SMOKE=1 test runs this script inside the CI suite
def test_gpu_train_configs_script_smoke(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_train_configs.sh")],
                          env={**env(), "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "train-configs.json").read_text())
    assert [(r["config"], r["ok"]) for r in result["runs"]] == [("zero2", True), ("fsdp", True)]
