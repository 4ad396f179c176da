"""Instruction-tuned judge: expected-value scoring, rubric/answer prompt surviving truncation,
few-shot examples from the train split only, SFT judge trained and evaluated end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from test_train_guard import write_tiny_recipe

from eval.engine.judge_pass import encode_prompts, expected_score
from train.judge_prompts import (DIGIT_ANSWERS, RUBRICS_DIR, SENTINEL, assemble, judge_view, load_rubric, prompt_parts,
                                 select_shots, user_text)
from mood_data.errors import RecipeError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_expected_value_on_hand_built_distribution():
    # vocab 8; answers at ids 2, 5, 7 worth 0, 50, 100; full-vocabulary probabilities
    probs = np.array([0.08, 0.08, 0.2, 0.08, 0.08, 0.3, 0.08, 0.1])
    logits = torch.tensor(np.log(probs))[None].repeat(2, 1)
    logits[1] += 7.0  # a constant shift changes nothing
    score, mass = expected_score(logits, [2, 5, 7], [0.0, 50.0, 100.0])
    # renormalised over the answers: (.2*0 + .3*50 + .1*100) / .6
    assert score.tolist() == pytest.approx([25 / 0.6, 25 / 0.6], abs=1e-12)
    assert mass.tolist() == pytest.approx([0.6, 0.6], abs=1e-12)
    # one certain answer -> its value exactly
    sharp = torch.full((1, 8), -1e4, dtype=torch.float64)
    sharp[0, 5] = 0.0
    assert expected_score(sharp, [2, 5, 7], [0.0, 50.0, 100.0])[0][0] == pytest.approx(50.0)
    assert DIGIT_ANSWERS["9"] == 100.0 and DIGIT_ANSWERS["3"] == pytest.approx(100 / 3)


def test_packaged_rubrics_and_errors(tmp_path):
    a, u = load_rubric(None, "alignment"), load_rubric("uncertainty")
    assert a.name == "alignment" and u.name == "uncertainty"
    assert a.answer_for(0) == "0" and a.answer_for(1) == "9"
    assert u.answer_for(0) == u.answer_for(1) == "0"
    assert a.path == str(RUBRICS_DIR / "alignment.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ninstructions: i\nexample: '{conversation} {answer}'\nquery: no slot\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: field 'query'"):
        load_rubric(bad)
    bad.write_text("name: x\ninstructions: i\nexample: '{conversation} {answer}'\nquery: '{conversation}'\ncolour: 1\n")
    with pytest.raises(RecipeError, match="field 'colour': unknown field"):
        load_rubric(bad)


def test_multi_token_answers_rejected(tmp_path, tiny_tokenizer):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\ninstructions: rate\nexample: '{conversation} -> {answer}'\nquery: '{conversation}'\n"
                 "answers: {'0': 0, 'definitely unsafe': 100}\n")
    with pytest.raises(RecipeError, match="'definitely unsafe' is .* tokens"):
        prompt_parts(tiny_tokenizer, load_rubric(p))


def test_judge_view():
    conv = "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\nhello!<end_of_turn>"
    assert judge_view(conv) == "User: hi there\nAssistant: hello!"


def test_rubric_and_answer_prompt_survive_truncation(tiny_tokenizer):
    rubric = load_rubric("alignment")
    shots = [{"id": "s", "conversation": "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nok<end_of_turn>",
              "malign": 1}]
    parts = prompt_parts(tiny_tokenizer, rubric, shots)
    text = tiny_tokenizer.decode(parts.prefix)
    assert "strict safety reviewer" in text and "Rating: 9" in text and SENTINEL not in text
    assert "Reply with one digit from 0 to 9 only" in tiny_tokenizer.decode(parts.suffix)
    assert tiny_tokenizer.decode(parts.suffix).endswith("<start_of_turn>model\nRating: ")  # answer prefix
    conv_ids = list(range(100, 400))  # 300 conversation tokens
    max_len = len(parts.prefix) + len(parts.suffix) + 50
    ids, cut = assemble(parts, conv_ids, max_len)
    assert cut and len(ids) == max_len
    assert ids[:len(parts.prefix)] == parts.prefix  # rubric + examples intact
    assert ids[-len(parts.suffix):] == parts.suffix  # answer prompt intact
    assert ids[len(parts.prefix):-len(parts.suffix)] == conv_ids[-50:]  # the END of the conversation kept
    ids, cut = assemble(parts, conv_ids[:10], max_len)
    assert not cut and ids == parts.prefix + conv_ids[:10] + parts.suffix
    with pytest.raises(RecipeError, match="judge.max_length"):
        assemble(parts, conv_ids, len(parts.prefix) + len(parts.suffix) + 3)
    # through the tokenizer: a long conversation is cut, every row fits
    long = "<start_of_turn>user\n" + "please help me " * 200 + "<end_of_turn>\n<start_of_turn>model\nsure<end_of_turn>"
    enc = encode_prompts(tiny_tokenizer, parts, [long, shots[0]["conversation"]], max_len)
    assert enc.truncated == [0] and all(len(r) <= max_len for r in enc.input_ids)
    assert all(r[-len(parts.suffix):] == parts.suffix for r in enc.input_ids)
    assert "sure" in tiny_tokenizer.decode(enc.input_ids[0][len(parts.prefix):-len(parts.suffix)])


def test_shots_come_from_the_train_split_only(tiny_dataset_dir):
    from mood_data.load import load_splits

    splits = load_splits(str(tiny_dataset_dir))
    train, test = splits["train"], splits["test"]
    shots = select_shots(train, 4, seed=0, max_chars=10_000)
    assert [s["malign"] for s in shots] == [0, 1, 0, 1]
    assert {s["id"] for s in shots} <= set(train["id"]) and not {s["id"] for s in shots} & set(test["id"])
    assert select_shots(train, 4, seed=0, max_chars=10_000) == shots  # seeded
    # rows of OOD domains (test-only) are never picked, even when offered
    mixed = [dict(zip(test.column_names, v)) for v in zip(*[test[c] for c in test.column_names])]
    picked = select_shots(mixed, 6, seed=1, max_chars=10_000)
    from mood_data.domains import ID_DOMAINS

    assert picked and all(s["domain"] in ID_DOMAINS for s in picked)
    # the prompt shows the shots with their labels' answers
    text = user_text(load_rubric("alignment"), shots[:2])
    assert "Rating: 0" in text and "Rating: 9" in text


@pytest.fixture(scope="module")
def judge_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    from eval.run.evaluate import evaluate_recipe
    from moodguard.cli import main as moodguard
    from test_forward import make_adapters
    from train.recipe import load_recipe

    root = tmp_path_factory.mktemp("judge_run")
    make_adapters(tiny_model_dir, root / "run", seed=3)  # guard + lm
    path = write_tiny_recipe(root / "r.yaml", tiny_model_dir, tiny_dataset_dir, root / "run",
                             judge={"enabled": True, "max_steps": 2, "save_steps": 2, "global_batch_size": 8,
                                    "per_device_batch_size": 8, "max_length": 540, "n_shots": 0,
                                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                             eval={"batch_size": 16, "max_length": 64, "knn": {"k": 3, "max_ref": 100}})
    assert moodguard(["train", "judge", "--recipe", str(path)]) == 0
    recipe = load_recipe(path)
    folders = evaluate_recipe(recipe, monitors=["judge", "judge-uncertainty", "guard+judge-uncertainty"],
                              n_boot=10, plots=False)
    return root / "run", recipe, folders


def test_judge_trains_and_scores_like_a_plain_forward(judge_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from eval.run.context import resolve
    from eval.run.judge import load_judge, rubrics_of
    from train.data import train_validation_cut

    run, recipe, folders = judge_run
    metrics = json.loads((run / "judge" / "metrics.json").read_text())
    assert metrics["kind"] == "judge" and metrics["validation"]["eval_loss"] > 0
    assert metrics["n_train"] == 2 * 66  # 66 train rows x 2 rubrics (no shots here)
    rows = [json.loads(line) for line in open(folders["guard+judge-uncertainty"] / "results.jsonl")]
    assert all(0.0 <= r["score_judge-uncertainty"] <= 100.0 for r in rows)
    meta = json.loads((folders["judge"] / "meta.json").read_text())
    assert set(meta["detector_seconds"]) == {"guard", "judge"}
    assert meta["seconds"] == pytest.approx(meta["detector_seconds"]["judge"])
    # reference: plain AutoModelForCausalLM + PeftModel, unpadded prompt, full logits
    train_rows, _ = train_validation_cut(recipe)
    ctx = resolve(recipe)
    judge = load_judge(ctx, None, train_rows)
    assert {s["id"] for s in judge.shots} <= set(train_rows["id"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(run / "judge")).eval()
    rub = rubrics_of(ctx.judge, ("alignment", "uncertainty"))
    for det, name in (("judge", "alignment"), ("judge-uncertainty", "uncertainty")):
        got = [json.loads(line)[f"score_{det}"] for line in open(folders[det] / "results.jsonl")][::25]
        parts = judge.parts(rub[name])
        enc = encode_prompts(judge.tokenizer, parts, [r["conversation"] for r in rows[::25]], recipe.judge.max_length)
        for ids, g in zip(enc.input_ids, got):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            p = torch.softmax(logits[parts.answer_ids], -1).numpy()
            assert g == pytest.approx(float(p @ parts.values), abs=1e-6)
    assert not math.isnan(meta["seconds_per_conversation"])


def test_judge_is_an_adapter_on_the_shared_base(judge_run):
    from eval.run.backbone import load_run
    from eval.run.context import resolve
    from eval.run.splits import data_cut
    from eval.run.judge import load_judge

    run, recipe, _ = judge_run
    ctx = resolve(recipe)
    loaded = load_run(ctx.model)
    judge = load_judge(ctx, loaded, data_cut(ctx.data)[0])
    assert judge.backbone is loaded.backbone and judge.adapter == "judge"
    assert {"guard", "lm", "judge"} <= set(loaded.backbone.model.peft_config)
    assert len(list((run / "stats").glob("calibration-judge-*"))) == 2  # one per rubric, cached


def test_no_judge_is_a_one_line_error(tmp_path):
    from eval.run.context import resolve
    from eval.run.judge import load_judge
    from mood_data.errors import BundleError
    from train.recipe import load_recipe
    from train.recipe_files import RECIPES_DIR

    recipe = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(BundleError, match="judge.model") as err:
        load_judge(resolve(recipe), None, train_rows=[])  # refused before the few-shot rows are read
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_smollm2_instruct_judge(tiny_dataset_dir):
    """The real judge: SmolLM2-135M-Instruct, no adapter, digits are single tokens, most of the
    next-token mass sits on the answer digits."""
    from eval.engine.planner import plan, score_judge
    from eval.run.context import resolve
    from eval.run.splits import data_cut
    from eval.run.judge import load_judge, rubrics_of
    from mood_data.load import load_splits
    from train.recipe import load_recipe
    from train.recipe_files import RECIPES_DIR
    from train.smollm2 import smollm2_path

    path = smollm2_path()
    recipe = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", [f"judge.model={path}", "judge.max_length=1024",
                                                          f"data.source={tiny_dataset_dir}", "dtype=float32"])
    ctx = resolve(recipe)
    judge = load_judge(ctx, None, data_cut(ctx.data)[0])
    test = load_splits(str(tiny_dataset_dir), splits=("test",))["test"]
    scores, info = score_judge(plan(["judge", "judge-uncertainty"]), judge, rubrics_of(ctx.judge, ("alignment", "uncertainty")),
                               list(test["conversation"])[:8], batch_size=4)
    assert all(0 <= v <= 100 for s in scores.values() for v in s)
    assert info["judge_answer_mass"] > 0.3


def test_sweep_plans_train_judge_and_accepts_new_monitors(tmp_path):
    from moodguard.sweep_emit import stage_command
    from moodguard.sweep_file import load_sweep
    from moodguard.sweep_plan import plan_sweep

    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: j\nmonitors: [guard, ensemble-disagreement, guard+judge-uncertainty]\n"
                     "recipes:\n  - path: recipes/tiny/s.yaml\n    overrides: {judge.enabled: true, 'guard.seeds': [0, 1, 2]}\n"
                     "  - recipes/tiny/m.yaml\n")
    stages = plan_sweep(load_sweep(sweep), tmp_path / "out")
    ids = [s.id for s in stages]
    assert ids[:5] == ["tiny-s/train-guard", "tiny-s/train-lm", "tiny-s/train-judge", "tiny-s/fit", "tiny-s/evaluate"]
    assert "tiny-m/train-judge" not in ids  # judge.enabled defaults to false
    ev = stages[4]
    assert ev.deps == ("tiny-s/fit", "tiny-s/train-judge")
    assert stage_command(stages[2])[:3] == ["python", "-m", "train.judge"]
    assert stages[2].outputs()[0] == tmp_path.resolve() / "out" / "tiny-s" / "judge"


def test_judge_bundle_scores_like_evaluate(judge_run, tmp_path):
    """`moodguard export` of a judge monitor: adapter, tokenizer, rubrics and shots travel in
    the bundle; the loaded bundle reproduces evaluate's scores."""
    from eval.run.bundle import Monitor, export_bundle

    run, recipe, folders = judge_run
    out = export_bundle(recipe, tmp_path / "b", "guard+judge-uncertainty")
    spec = json.loads((out / "monitor.json").read_text())
    assert spec["judge"]["model"] is None and spec["judge"]["adapter"] is True  # the guard's base + judge LoRA
    assert spec["judge"]["rubrics"] == ["uncertainty"] and (out / "judge" / "rubrics" / "uncertainty.yaml").is_file()
    rows = [json.loads(line) for line in open(folders["guard+judge-uncertainty"] / "results.jsonl")][::9]
    got = Monitor.load(out).score([r["conversation"] for r in rows])
    for r, g in zip(rows, got):
        assert g["score"] == pytest.approx(r["score"], abs=1e-4)
        assert g["detectors"]["judge-uncertainty"] == pytest.approx(r["score_judge-uncertainty"], abs=1e-4)
    # a tampered rubric is refused by the manifest check
    (out / "judge" / "rubrics" / "uncertainty.yaml").write_text("name: x\n")
    from mood_data.errors import BundleError

    with pytest.raises(BundleError, match="uncertainty.yaml"):
        Monitor.load(out)
