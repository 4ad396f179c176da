"""The one device policy (train/device.py) reaches the model in every stage.

No GPU here, so the wiring is proven with what a CPU can show: every stage runs with
``--device cpu`` and the recipe's dtype set to bfloat16 (not the float32 the tiny recipes use)
while spies record (a) what reached the resolver (a stage that drops ``--device`` asks for
``None``), (b) the keyword arguments that reached ``AutoModelForCausalLM.from_pretrained``
(``device_map={"": "cpu"}`` + ``dtype=bfloat16``: a stage that loads without the placement
shows neither) and (c) the base parameters and guard head of the model the stage ran: all
bfloat16 on the CPU (peft keeps LoRA weights in float32). A stage that loaded the model its own way, or forgot the dtype, fails here.
"""
from __future__ import annotations

import json

import pytest
import torch

import train.device as device_policy
from moodguard.cli import main as moodguard
from mood_data.errors import RecipeError
from test_interrupts import adapters, new_run  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- the policy itself
def test_resolve_device_and_dtype_rules(monkeypatch):
    assert device_policy.resolve_device("cpu") == torch.device("cpu")
    assert device_policy.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert device_policy.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    for bad in ("gpu", "cuda:x", "tpu:0"):
        with pytest.raises(RecipeError, match="expected auto, cpu, cuda or cuda:N"):
            device_policy.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="no CUDA device is visible here"):
            device_policy.resolve_device("cuda:0")
        assert device_policy.resolve_device(None) == torch.device("cpu")  # auto = PartialState's device
    # the one parser behind resolve_device and `moodguard train --device` (pure: no GPU needed)
    parse = device_policy.parse_device
    assert parse(None, 0) == ("auto", None) and parse(" CPU ", 4) == ("cpu", None)
    assert parse("cuda", 2) == ("cuda", None) and parse("cuda:1", 2) == ("cuda", 1)
    with pytest.raises(RecipeError, match=r"only 2 CUDA device\(s\) visible \(expected cuda:N with N < 2\)"):
        parse("cuda:2", 2)
    p = device_policy.placement("bfloat16", "cpu")
    assert p.load_kwargs() == {"dtype": torch.bfloat16, "device_map": {"": "cpu"}}
    assert device_policy.placement("float32", "cpu", "auto").load_kwargs()["device_map"] == "auto"
    with pytest.raises(RecipeError, match="device_map"):
        device_policy.placement("float32", "cpu", "balanced")

    class TwoRanks:
        num_processes = 2
        device = torch.device("cpu")

    monkeypatch.setattr(device_policy, "_state", lambda cpu: TwoRanks())
    with pytest.raises(RecipeError, match="device_map 'auto'"):
        device_policy.placement("float32", "cpu", "auto")


def test_recipe_key_eval_device_map_is_validated(tmp_path, tiny_model_dir, tiny_dataset_dir):
    from train.recipe import load_recipe
    from test_monitor import write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    assert load_recipe(path, ["eval.device_map=auto"]).eval.device_map == "auto"
    assert load_recipe(path).eval.device_map is None
    with pytest.raises(RecipeError, match="device_map"):
        load_recipe(path, ["eval.device_map=balanced"])


# ----------------------------------------------------------------------------- spies
class Spy:
    def __init__(self, monkeypatch):
        from transformers import AutoModelForCausalLM

        from eval.engine.forward import SharedBackbone

        self.requests: list = []
        self.loads: list[dict] = []
        self.backbones: list = []
        real_resolve = device_policy.resolve_device
        real_load = AutoModelForCausalLM.from_pretrained.__func__
        real_backbone = SharedBackbone.from_pretrained.__func__

        def resolve(requested=None):
            self.requests.append(requested)
            return real_resolve(requested)

        def load(cls, *args, **kwargs):
            self.loads.append(dict(kwargs))
            return real_load(cls, *args, **kwargs)

        def backbone(cls, *args, **kwargs):
            out = real_backbone(cls, *args, **kwargs)
            self.backbones.append(out)
            return out

        monkeypatch.setattr(device_policy, "resolve_device", resolve)
        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(load))
        monkeypatch.setattr(SharedBackbone, "from_pretrained", classmethod(backbone))

    def check(self, stage: str) -> None:
        """Every model this stage loaded got the placement: asked for 'cpu', loaded bf16 on cpu."""
        assert self.requests and all(r == "cpu" for r in self.requests), (stage, self.requests)
        assert self.loads, f"{stage}: no model loaded"
        for kw in self.loads:
            assert kw.get("dtype") is torch.bfloat16 and kw.get("device_map") == {"": "cpu"}, (stage, kw)
        assert self.backbones, f"{stage}: no SharedBackbone"
        for b in self.backbones:
            # the base in the recipe's dtype (peft keeps LoRA weights in float32 by design)
            params = [(n, p) for n, p in b.model.named_parameters() if "lora_" not in n]
            assert params and all(p.device.type == "cpu" for _, p in b.model.named_parameters()), stage
            assert all(p.dtype is torch.bfloat16 for _, p in params), (stage, {p.dtype for _, p in params})
            assert b.head.weight.dtype is torch.bfloat16 and b.head.weight.device.type == "cpu", stage
            assert b.placement == device_policy.Placement(torch.device("cpu"), torch.bfloat16, None), stage
        self.requests.clear()
        self.loads.clear()
        self.backbones.clear()


def test_every_stage_runs_where_the_policy_says(tmp_path, tiny_model_dir, tiny_dataset_dir, adapters,  # noqa: F811
                                                monkeypatch):
    recipe, run = new_run(tmp_path, "dev", tiny_model_dir, tiny_dataset_dir, adapters)
    spy = Spy(monkeypatch)
    common = ["--device", "cpu", "dtype=bfloat16"]
    assert moodguard(["fit", "--recipe", str(recipe), *common]) == 0
    spy.check("fit")
    assert moodguard(["evaluate", "--recipe", str(recipe), "--monitors", "guard+maha,guard+ppl", "--n-boot", "10",
                      "--no-plots", *common]) == 0
    spy.check("evaluate")
    assert json.loads((run / "eval" / "guard+maha" / "meta.json").read_text())["device"] == "cpu"
    bundle = tmp_path / "bundle"
    assert moodguard(["export", "--recipe", str(recipe), "--monitor", "guard+maha+ppl", "--out", str(bundle),
                      *common]) == 0
    spy.check("export")
    assert json.loads((bundle / "monitor.json").read_text())["dtype"] == "bfloat16"
    assert moodguard(["score", "--monitor", str(bundle), str(tiny_dataset_dir / "test.jsonl"), "--out",
                      str(tmp_path / "s.jsonl"), "--device", "cpu"]) == 0
    spy.check("score")


def test_judge_on_its_own_base_gets_the_placement(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    import shutil

    from eval.run.context import resolve
    from eval.run.judge import load_judge
    from train.recipe import load_recipe
    from test_monitor import write_recipe

    other = tmp_path / "judge-base"  # another path: the judge loads its own base
    shutil.copytree(tiny_model_dir, other)
    path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, tiny_dataset_dir, tmp_path / "run")
    recipe = load_recipe(path, [f"judge.model={other}", "dtype=bfloat16"])
    spy = Spy(monkeypatch)
    from eval.run.splits import data_cut

    ctx = resolve(recipe, device="cpu")
    judge = load_judge(ctx, None, data_cut(ctx.data)[0])
    assert spy.requests == ["cpu"] and len(spy.loads) == 1
    assert spy.loads[0]["dtype"] is torch.bfloat16 and spy.loads[0]["device_map"] == {"": "cpu"}
    assert all(p.dtype is torch.bfloat16 for n, p in judge.backbone.model.named_parameters() if "lora_" not in n)


def test_device_map_auto_reaches_from_pretrained(tmp_path, tiny_model_dir, tiny_dataset_dir, adapters,  # noqa: F811
                                                 monkeypatch):
    """eval.device_map: auto loads with device_map='auto' (on this CPU-only machine accelerate
    puts every module on the CPU; the multi-GPU spread itself has never run here)."""
    from eval.engine.planner import plan, score_shared
    from eval.run.backbone import load_run
    from eval.run.context import resolve
    from train.recipe import load_recipe

    path, _ = new_run(tmp_path, "dm", tiny_model_dir, tiny_dataset_dir, adapters)
    recipe = load_recipe(path, ["eval.device_map=auto"])
    spy = Spy(monkeypatch)
    ctx = resolve(recipe, device="cpu")
    loaded = load_run(ctx.model)
    assert [kw["device_map"] for kw in spy.loads] == ["auto"]
    assert loaded.backbone.placement.sharded and loaded.backbone.device.type == "cpu"
    scores, _ = score_shared(plan(["guard", "ppl"]), loaded.backbone, loaded.tokenizer,
                             ["user: hi\nassistant: hello"] * 3, {}, ctx.score)
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in scores.values())
