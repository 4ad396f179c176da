"""Engine decisions of the training loop without launching anything: ZeRO-3 makes every peft
build pass ``autocast_adapter_dtype=False`` (DeepSpeed issue 8072), the CPU placement rules
that let DeepSpeed/FSDP ranks start, and the FSDP refusal on CPU-only machines."""
from __future__ import annotations

import pytest

from mood_data.errors import RecipeError
from train import distributed as D
from train.recipe import load_recipe
from test_train_guard import write_tiny_recipe


@pytest.fixture
def ds_config():
    """Hold transformers' DeepSpeed config (what TrainingArguments creates under a DeepSpeed launch)."""
    from transformers.integrations import HfDeepSpeedConfig

    held = []

    def make(stage: int):
        held.append(HfDeepSpeedConfig({"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1}))

    yield make
    held.clear()


@pytest.fixture
def peft_spy(monkeypatch, tiny_model_dir):
    """Record the keyword arguments of every get_peft_model call; the backbones are loaded
    before the DeepSpeed config is held (no zero.Init: no process group in this test)."""
    import copy

    import peft

    from train import modeling

    calls = []
    real = peft.get_peft_model

    def spy(model, config, **kwargs):
        calls.append(kwargs)
        return real(model, config, **kwargs)

    monkeypatch.setattr(peft, "get_peft_model", spy)
    guard = modeling.load_guard_model(tiny_model_dir, None, "float32")
    lm = modeling.load_causal_lm(tiny_model_dir, None, "float32")
    monkeypatch.setattr(modeling, "load_guard_model", lambda *a, **kw: copy.deepcopy(guard))
    monkeypatch.setattr(modeling, "load_causal_lm", lambda *a, **kw: copy.deepcopy(lm))
    return calls


@pytest.mark.parametrize("stage,expected", [(None, {}), (2, {}), (3, {"autocast_adapter_dtype": False})])
def test_zero3_passes_autocast_adapter_dtype_false_to_every_peft_build(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                        ds_config, peft_spy, stage, expected):
    from train.guard import build_guard_model
    from train.judge import build_judge_model
    from train.lm import build_lm_model
    from train.modeling import load_tokenizer

    recipe = load_recipe(write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run"))
    tok = load_tokenizer(tiny_model_dir)
    if stage is not None:
        ds_config(stage)
    assert D.zero3_active() is (stage == 3)
    for build in (build_guard_model, build_lm_model, build_judge_model):
        build(recipe, tok)
    assert peft_spy == [expected] * 3


def test_launched_engine_from_accelerate_environment():
    assert D.launched_engine({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}) == "deepspeed"
    assert D.launched_engine({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}) == "fsdp"
    assert D.launched_engine({"WORLD_SIZE": "2"}) == "ddp"
    assert D.launched_engine({}) == "none"


def test_accelerate_placement_rules():
    P = D.AcceleratePlacement
    # CPU-only machine: DeepSpeed/FSDP ranks must not start accelerate with cpu=True (it then
    # never selects the engine); DDP ranks keep cpu=True + gloo; a single process needs no backend
    assert D.accelerate_placement(True, 2, "deepspeed") == P(cpu=False, backend="gloo")
    assert D.accelerate_placement(True, 2, "fsdp") == P(cpu=False, backend="gloo")
    assert D.accelerate_placement(True, 2, "ddp") == P(cpu=True, backend="gloo")
    assert D.accelerate_placement(True, 1, "none") == P(cpu=True, backend=None)
    # GPUs: accelerate chooses (NCCL)
    for engine in ("deepspeed", "fsdp", "ddp", "none"):
        assert D.accelerate_placement(False, 8, engine) == P(cpu=False, backend=None)


def test_enter_cpu_engine_drops_accelerate_use_cpu_only_for_deepspeed_and_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    D.enter_cpu_engine(True)
    assert D.os.environ.get("ACCELERATE_USE_CPU") == "1"  # DDP keeps it
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    D.enter_cpu_engine(True)
    assert "ACCELERATE_USE_CPU" not in D.os.environ


def test_fsdp_refused_where_accelerate_would_run_ddp():
    for dt in ("NO", "MULTI_CPU", "DistributedType.MULTI_CPU"):
        with pytest.raises(RecipeError, match="FSDP needs GPUs"):
            D.check_engine_available(dt, "fsdp")
    D.check_engine_available("MULTI_GPU", "fsdp")
    D.check_engine_available("MULTI_CPU", "ddp")
    D.check_engine_available("NO", "deepspeed")


def test_training_device_environment():
    env = D.training_device_environment
    assert env(None, 1, 0) == {} and env("auto", 8, 8) == {}
    assert env("cpu", 2, 8) == {"ACCELERATE_USE_CPU": "1"}
    assert env("cuda", 8, 8) == {} and env("cuda:3", 1, 8) == {"CUDA_VISIBLE_DEVICES": "3"}
    for requested, procs, count, msg in (("cuda", 1, 0, "no CUDA device"), ("cuda:0", 1, 0, "no CUDA device"),
                                         ("cuda:8", 1, 8, "N < 8"), ("cuda:1", 2, 8, "one GPU for 2 processes"),
                                         ("tpu", 1, 0, "expected auto, cpu, cuda or cuda:N")):
        with pytest.raises(RecipeError, match=msg):
            env(requested, procs, count)


def test_train_device_and_dtype_reach_the_model(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys, monkeypatch):
    """`moodguard train --device cpu` with the recipe's dtype: metrics.json records where and in
    which dtype the model trained; `--device cuda` here is a one-line error (exit 2)."""
    import json

    from moodguard.cli import main as moodguard

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    rec = write_tiny_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run",
                            guard__max_steps=1, dtype="bfloat16")
    assert moodguard(["train", "guard", "--recipe", str(rec), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "run" / "guard" / "metrics.json").read_text())
    assert (metrics["device"], metrics["dtype"]) == ("cpu", "bfloat16")
    import torch

    if not torch.cuda.is_available():
        assert moodguard(["train", "guard", "--recipe", str(rec), "--device", "cuda"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == "moodguard train: error: device 'cuda': no CUDA device is visible here (use --device cpu)"
