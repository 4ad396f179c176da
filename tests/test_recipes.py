"""Recipes: inheritance, overrides, every validation error, the recipes CLI, the sampler."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moodguard.cli import main as moodguard
from mood_data.errors import RecipeError
from train.data import SeededLengthGroupedSampler, batches_of, padding_fraction, train_validation_split
from train.recipe import load_recipe
from train.recipe_checks import gradient_accumulation_steps
from train.recipe_files import RECIPES_DIR, display_path, list_recipes

TINY_FAMILY = RECIPES_DIR / "tiny" / "_family.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(path, overrides=()) -> str:
    """The one-line error of loading a recipe as every command does (values, then monitor names)."""
    from moodguard.cli_common import load_checked_recipe

    with pytest.raises(RecipeError) as exc:
        load_checked_recipe(path, overrides)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_every_shipped_recipe_is_valid_and_covers_the_families():
    names = {load_recipe(p).name for p in list_recipes()}
    expected = {"gemma2-2b", "gemma2-9b", "gemma2-27b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b",
                "qwen2.5-14b", "qwen2.5-32b", "llama3-3.2-1b", "llama3-3.2-3b", "llama3-3.1-8b", "tiny-xxs", "tiny-s", "tiny-m", "tiny-l",
                "smollm2-135m", "gemma3-270m"}
    assert expected <= names


def test_inheritance_base_family_size():
    r = load_recipe(RECIPES_DIR / "qwen2.5" / "7b.yaml")
    assert r.model == "Qwen/Qwen2.5-7B-Instruct"
    assert r.guard.learning_rate == 1e-4            # size file
    assert r.guard.global_batch_size == 64           # family file
    assert r.guard.warmup_ratio == 0.03              # global base
    assert r.guard.lora.r == 16                      # base, lora mapping deep-merged
    assert r.guard.lora.target_modules[-1] == "down_proj"  # family
    assert r.accelerate.config == "zero2" and r.accelerate.num_processes == 8
    assert r.family == "qwen2.5" and r.name == "qwen2.5-7b"
    assert r.output_dir == str(Path("runs") / "qwen2.5-7b")
    assert r.eval.mahalanobis.layers == [-1] and r.eval.fprs == [0.005, 0.01, 0.02]
    # 64 = 4 per device x 8 processes x 2 accumulation
    assert gradient_accumulation_steps(64, 4, 8) == 2
    tiny = load_recipe(RECIPES_DIR / "tiny" / "s.yaml")
    assert tiny.model == "embedded:tiny-s" and tiny.data.source == "embedded"
    assert tiny.guard.max_length == 256 and tiny.guard.max_steps <= 300 and tiny.accelerate.config is None


def test_overrides_dotted_and_yaml_parsed():
    r = load_recipe(RECIPES_DIR / "tiny" / "s.yaml",
                    ["guard.learning_rate=1e-4", "guard.lora.r=4", "guard.seeds=[1, 2]", "eval.mahalanobis.pooling=mean"])
    assert r.guard.learning_rate == 1e-4 and isinstance(r.guard.learning_rate, float)
    plain = load_recipe(RECIPES_DIR / "tiny" / "s.yaml").guard.lora
    assert plain.r != 4 and r.guard.lora.r == 4  # the override took
    assert (r.guard.lora.alpha, r.guard.lora.target_modules) == (plain.alpha, plain.target_modules)  # siblings kept
    assert r.guard.seeds == [1, 2] and r.eval.mahalanobis.pooling == "mean"
    assert load_recipe(RECIPES_DIR / "tiny" / "s.yaml").guard.lora == plain  # files untouched


def test_resolved_yaml_round_trips(tmp_path):
    r = load_recipe(RECIPES_DIR / "gemma2" / "27b.yaml")
    out = write(tmp_path / "resolved.yaml", r.to_yaml())
    again = load_recipe(out)
    assert again.to_dict() == {**r.to_dict(), "name": r.name, "output_dir": r.output_dir}


def test_gradient_accumulation_constant_global_batch():
    assert gradient_accumulation_steps(8, 8, 1) == 1
    assert gradient_accumulation_steps(8, 4, 2) == 1
    assert gradient_accumulation_steps(32, 4, 2) == 4
    with pytest.raises(RecipeError, match="not divisible"):
        gradient_accumulation_steps(10, 4, 2)


@pytest.fixture()
def rdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_unknown_key_names_file_and_key(rdir):
    p = write(rdir / "r.yaml", f"base: {TINY_FAMILY}\nmodel: x\nguard: {{lerning_rate: 1.0}}\n")
    assert error_of(p) == "r.yaml: key 'guard.lerning_rate': unknown key"


def test_unknown_key_in_base_names_the_base_file(rdir):
    write(rdir / "fam" / "_family.yaml", f"base: {TINY_FAMILY}\nlm: {{bogus: 1}}\n")
    p = write(rdir / "fam" / "s.yaml", "base: _family.yaml\nmodel: x\n")
    assert error_of(p) == "fam/_family.yaml: key 'lm.bogus': unknown key"


def test_unknown_top_level_and_override_key(rdir):
    p = write(rdir / "r.yaml", f"base: {TINY_FAMILY}\nmodel: x\nmodle: y\n")
    assert error_of(p) == "r.yaml: key 'modle': unknown key"
    ok = write(rdir / "ok.yaml", f"base: {TINY_FAMILY}\nmodel: x\n")
    assert error_of(ok, ["eval.knn.kk=3"]) == "ok.yaml (override): key 'eval.knn.kk': unknown key"


@pytest.mark.parametrize("body, key, expect", [
    ("guard: {max_steps: ten}", "guard.max_steps", "expected int, got 'ten'"),
    ("guard: {learning_rate: fast}", "guard.learning_rate", "expected float, got 'fast'"),
    ("guard: {gradient_checkpointing: 1}", "guard.gradient_checkpointing", "expected bool, got 1"),
    ("guard: {seeds: [0, x]}", "guard.seeds", "expected list of int, got [0, 'x']"),
    ("guard: {lora: 3}", "guard.lora", "expected mapping, got 3"),
    ("eval: {mahalanobis: {pooling: max}}", "eval.mahalanobis.pooling", "expected 'last' | 'mean', got 'max'"),
    ("eval: {mahalanobis: {estimator: shrunk}}", "eval.mahalanobis.estimator", "got 'shrunk'"),
    ("eval: {fusion: vote}", "eval.fusion", "got 'vote'"),
    ("report_to: mlflow", "report_to", "got 'mlflow'"),
])
def test_wrong_types(rdir, body, key, expect):
    p = write(rdir / "r.yaml", f"base: {TINY_FAMILY}\nmodel: x\n{body}\n")
    msg = error_of(p)
    assert msg.startswith(f"r.yaml: key '{key}': ") and expect in msg


def test_float_accepts_yaml11_exponent_strings(rdir):
    p = write(rdir / "r.yaml", f"base: {TINY_FAMILY}\nmodel: x\nguard: {{learning_rate: 3e-4}}\n")
    assert load_recipe(p).guard.learning_rate == pytest.approx(3e-4)


def test_missing_required_key(rdir):
    p = write(rdir / "r.yaml", f"base: {TINY_FAMILY}\n")
    assert error_of(p) == "r.yaml: key 'model': missing required key"


def test_base_cycle_and_missing_base(rdir):
    write(rdir / "a.yaml", "base: b.yaml\nmodel: x\n")
    write(rdir / "b.yaml", "base: a.yaml\n")
    msg = error_of(rdir / "a.yaml")
    assert "key 'base': inheritance cycle" in msg and "a.yaml -> b.yaml -> a.yaml" in msg
    p = write(rdir / "c.yaml", "base: nowhere.yaml\nmodel: x\n")
    assert error_of(p) == "c.yaml: key 'base': base file not found: nowhere.yaml"
    assert "recipe file not found" in error_of(rdir / "missing.yaml")


def test_bad_accelerate_config_and_batch_divisibility(rdir):
    p = write(rdir / "r.yaml", f"base: {TINY_FAMILY}\nmodel: x\naccelerate: {{config: tpu-pod}}\n")
    msg = error_of(p)
    assert msg.startswith("r.yaml: key 'accelerate.config': unknown accelerate config 'tpu-pod'")
    assert "'cpu'" in msg and "'zero3'" in msg
    p = write(rdir / "r2.yaml", f"base: {TINY_FAMILY}\nmodel: x\naccelerate: {{num_processes: 3}}\n")
    # names the file that set the offending batch size (the tiny family file)
    assert error_of(p) == (f"{TINY_FAMILY}: key 'guard.global_batch_size': 16 is not divisible by "
                           "per_device_batch_size 8 x accelerate.num_processes 3")


@pytest.mark.parametrize("override, key", [
    ("eval.fprs=[0.01, 1.5]", "eval.fprs[1]"),
    ("eval.monitors=[guard+maha, guard+bogus]", "eval.monitors[1]"),
    ("guard.packing=true", "guard.packing"),
    ("lm.lora.target_modules=all", "lm.lora.target_modules"),
    ("data.validation_fraction=0", "data.validation_fraction"),
    ("guard.seeds=[1, 1]", "guard.seeds"),
])
def test_value_checks(override, key):
    msg = error_of(RECIPES_DIR / "tiny" / "s.yaml", [override])
    assert f"key '{key}'" in msg and msg.startswith(display_path(RECIPES_DIR / "tiny" / "s.yaml"))


@pytest.mark.parametrize("override, key, expect", [
    ("guard.head_learning_rate=0", "guard.head_learning_rate", "must be > 0, or null (= learning_rate)"),
    ("guard.head_learning_rate=fast", "guard.head_learning_rate", "expected float or null, got 'fast'"),
    ("guard.init_head=linear", "guard.init_head", "expected 'random' | 'probe', got 'linear'"),
    ("guard.probe_c=-1", "guard.probe_c", "must be > 0"),
    ("guard.class_weights=[1]", "guard.class_weights", "two weights [safe, unsafe], got 1 values"),
    ("guard.class_weights=[1, 0]", "guard.class_weights", "weights must be > 0, got [1.0, 0.0]"),
    ("guard.class_weights=equal", "guard.class_weights", "got 'equal'"),
    ("guard.eval_every=0", "guard.eval_every", "must be 'epoch', a number of steps >= 1, or null"),
    ("guard.eval_every=epochs", "guard.eval_every", "expected 'epoch' or int or null, got 'epochs'"),
    ("guard.eval_every=true", "guard.eval_every", "got True"),
    ("guard.eval_on_start=true", "guard.eval_on_start", "model-selection candidate: needs eval_every"),
    ("lm.eval_on_start=yes please", "lm.eval_on_start", "expected bool"),
    ("lm.init_head=probe", "lm.init_head", "guard only (the lm has no classification head); leave it at 'random'"),
    ("lm.head_learning_rate=1e-2", "lm.head_learning_rate", "guard only (the lm has no classification head)"),
    ("lm.class_weights=balanced", "lm.class_weights", "guard only (the lm has no classification head); leave it at null"),
    ("judge.probe_c=0.1", "judge.probe_c", "guard only (the judge has no classification head)"),
])
def test_trainer_lever_checks(override, key, expect):
    """One line naming the file and the key for every bad value of the guard's training levers."""
    msg = error_of(RECIPES_DIR / "tiny" / "s.yaml", [override])
    assert msg.startswith(f"{display_path(RECIPES_DIR / 'tiny' / 's.yaml')} (override): key '{key}': ") and expect in msg


def test_trainer_lever_defaults_and_values():
    """_base.yaml keeps today's training (no selection, random head at the shared lr, plain CE) for
    the guard and, through the anchor, the lm; the levers parse."""
    for kind in ("guard", "lm", "judge"):
        sec = getattr(load_recipe(RECIPES_DIR / "tiny" / "s.yaml"), kind)
        assert (sec.eval_every, sec.head_learning_rate, sec.init_head, sec.probe_c, sec.class_weights) == \
            (None, None, "random", 1.0, None)
    r = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", ["guard.eval_every=epoch", "guard.head_learning_rate=1e-2",
                                                      "guard.init_head=probe", "guard.class_weights=[1, 4]",
                                                      "lm.eval_every=50"])
    assert (r.guard.eval_every, r.guard.head_learning_rate, r.guard.init_head, r.guard.class_weights, r.lm.eval_every) \
        == ("epoch", 1e-2, "probe", [1.0, 4.0], 50)
    assert load_recipe(RECIPES_DIR / "tiny" / "s.yaml", ["guard.class_weights=balanced"]).guard.class_weights == "balanced"
    msg = error_of(RECIPES_DIR / "tiny" / "s.yaml", ["guard.eval_every=10", "guard.eval_steps=5"])
    assert "key 'guard.eval_every': set either eval_every" in msg and "not both (eval_steps is 5)" in msg


def test_bad_override_syntax():
    assert "expected key=value" in error_of(RECIPES_DIR / "tiny" / "s.yaml", ["guard.learning_rate"])


def test_cli_validate_and_show(rdir, capsys):
    assert moodguard(["recipes", "validate"]) == 0
    assert "recipes valid" in capsys.readouterr().out
    bad = write(rdir / "bad.yaml", f"base: {TINY_FAMILY}\nmodel: x\nguard: {{lerning_rate: 1}}\n")
    assert moodguard(["recipes", "validate", str(bad), str(RECIPES_DIR / "tiny" / "s.yaml")]) == 2
    captured = capsys.readouterr()
    assert "moodguard recipes: error: bad.yaml: key 'guard.lerning_rate': unknown key" in captured.err
    assert "1/2 recipes valid" in captured.out
    assert moodguard(["recipes", "show", str(RECIPES_DIR / "qwen2.5" / "0.5b.yaml"), "guard.lora.r=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["guard"]["lora"]["r"] == 4 and shown["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert shown["config_shape"]["hidden_size"] == 896
    assert moodguard(["recipes", "show", str(rdir / "nope.yaml")]) == 2


def test_sampler_seeded_grouped_and_independent_of_processes():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(64)]
    s = SeededLengthGroupedSampler(lengths, group_size=4, seed=3)
    a, b = list(s), list(SeededLengthGroupedSampler(lengths, group_size=4, seed=3))
    assert a == b and sorted(a) == list(range(64))
    s.set_epoch(1)
    assert list(s) != a and sorted(s) == list(range(64))
    grouped = padding_fraction(lengths, batches_of(a, 4))
    plain = padding_fraction(lengths, batches_of(list(SeededLengthGroupedSampler(lengths, 4, 3, group_by_length=False)), 4))
    assert grouped < plain


def test_padding_fraction_hand_computed():
    # batches [2, 4] -> width 4, [6] -> width 6: real 12 of 14 padded slots
    assert padding_fraction([2, 4, 6], batches_of([0, 1, 2], 2)) == pytest.approx(1 - 12 / 14)
    # pad to multiple of 8: widths 8 and 8 -> 12 / 24
    assert padding_fraction([2, 4, 6], batches_of([0, 1, 2], 2), multiple=8) == pytest.approx(0.5)


def test_validation_split_stratified_and_id_only():
    import datasets

    rows = [{"id": f"{d}-{m}-{i}", "conversation": "x", "domain": d, "malign": m}
            for d in ("hh-rlhf-helpful", "function-calling") for m in (0, 1) for i in range(10)]
    split = train_validation_split(datasets.Dataset.from_list(rows), 0.2, seed=0)
    assert len(split["validation"]) == 8 and len(split["train"]) == 32
    cells = {(r["domain"], r["malign"]) for r in split["validation"]}
    assert len(cells) == 4
    assert not set(split["train"]["id"]) & set(split["validation"]["id"])
    again = train_validation_split(datasets.Dataset.from_list(rows), 0.2, seed=0)
    assert again["validation"]["id"] == split["validation"]["id"]


def test_every_recipe_field_has_help():
    """TRL-style: every schema field (sections recursed) carries a help text."""
    import dataclasses

    from train.recipe_schema import Recipe

    missing, todo = [], [(Recipe, "")]
    while todo:
        cls, prefix = todo.pop()
        for f in dataclasses.fields(cls):
            if f.metadata.get("internal"):
                continue
            if not f.metadata.get("help"):
                missing.append(prefix + f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default):
                todo.append((type(default), f"{prefix}{f.name}."))
    assert not missing, f"recipe fields without help: {missing}"


def test_recipes_show_explain(capsys):
    """Each resolved value with its help and the file (or override) that set it."""
    path = RECIPES_DIR / "tiny" / "s.yaml"
    assert moodguard(["recipes", "show", str(path), "guard.max_steps=3", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    values = {ln.split(":", 1)[0]: ln for ln in lines if not ln.startswith(" ")}
    assert values["guard.max_steps"] == f"guard.max_steps: 3    # {display_path(path)} (override)"
    assert values["model"] == f"model: embedded:tiny-s    # {display_path(path)}"
    assert values["dtype"].endswith(f"# {display_path(TINY_FAMILY)}")  # set by the family file
    assert values["eval.knn.k"] == "eval.knn.k: 10    # default"
    assert values["eval.monitors"].startswith("eval.monitors: [guard, guard+maha, guard+ppl, guard+maha+ppl]")
    # the line after each value is its help text
    i = lines.index(values["eval.knn.k"])
    assert lines[i + 1].strip() == "the k-th nearest safe train feature gives the distance"
    from train.recipe import explain

    assert len(values) == len(explain(load_recipe(path))) and "guard.lora.r" in values


def test_prompt_grouped_validation_keeps_every_request_on_one_side():
    """``data.validation_groups: prompt``: a request with several replies (a harmful and a refusing
    one, a call and its corrupted twin) is held out whole, every (domain, labels) cell of groups
    is represented, the cut is seeded, and the row cut (the default) is unchanged by the option."""
    import datasets

    from mood_data.errors import DataError
    from train.data import prompt_group

    def conv(prompt, reply):
        return f"<start_of_turn>user\n{prompt}<end_of_turn>\n<start_of_turn>model\n{reply}<end_of_turn>\n"

    rows = []
    for i in range(10):  # harmless: each prompt has a harmful (1) and a refusing (0) reply
        rows += [{"id": f"h{i}-{m}", "conversation": conv(f"How do I do bad thing {i}?", f"reply {m}"),
                  "domain": "hh-rlhf-harmless", "malign": m} for m in (0, 1)]
    for i in range(10):  # helpful: one safe reply per prompt
        rows.append({"id": f"s{i}", "conversation": conv(f"Tell me about topic {i}", "ok"),
                     "domain": "hh-rlhf-helpful", "malign": 0})
    ds = datasets.Dataset.from_list(rows)
    rowcut = train_validation_split(ds, 0.2, seed=0)
    shared = {prompt_group(c) for c in rowcut["train"]["conversation"]} & \
             {prompt_group(c) for c in rowcut["validation"]["conversation"]}
    assert shared  # the row cut splits some request's replies across the two sides (what the option fixes)
    split = train_validation_split(ds, 0.2, seed=0, groups="prompt")
    train_groups = {prompt_group(c) for c in split["train"]["conversation"]}
    val_groups = {prompt_group(c) for c in split["validation"]["conversation"]}
    assert not train_groups & val_groups
    assert len(val_groups) == 4  # 2 of the 10 harmless groups, 2 of the 10 helpful ones
    assert {(r["domain"], r["malign"]) for r in split["validation"]} == {
        ("hh-rlhf-harmless", 0), ("hh-rlhf-harmless", 1), ("hh-rlhf-helpful", 0)}
    assert len(split["train"]) + len(split["validation"]) == len(rows)
    assert train_validation_split(ds, 0.2, seed=0, groups="prompt")["validation"]["id"] == split["validation"]["id"]
    assert train_validation_split(ds, 0.2, seed=0, groups="row")["validation"]["id"] == rowcut["validation"]["id"]
    # whitespace and case do not make a new request; text without the MOOD turn markers is its own group
    assert prompt_group(conv("How  do I\ndo BAD thing 1?", "x")) == prompt_group(conv("how do i do bad thing 1?", "y"))
    assert prompt_group("plain text") == "plain text"
    with pytest.raises(DataError, match="data.validation_groups"):
        train_validation_split(ds, 0.2, groups="domain")


def test_validation_groups_is_a_recipe_key():
    r = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", ["data.validation_groups=prompt"])
    assert r.data.validation_groups == "prompt"
    assert load_recipe(RECIPES_DIR / "tiny" / "s.yaml").data.validation_groups == "row"
    with pytest.raises(RecipeError, match="validation_groups"):
        load_recipe(RECIPES_DIR / "tiny" / "s.yaml", ["data.validation_groups=domain"])


def test_prompt_groups_reach_training_and_evaluation_alike_and_end_the_leak(tmp_path):
    """Training's cut (train.data.train_validation_cut) and evaluation's (eval.run.splits.data_cut
    of the resolved context) are the same rows with ``data.validation_groups: prompt``, and on the
    embedded benchmark no validation request is then also a train request (the row cut shares many)."""
    from eval.run.context import resolve
    from eval.run.splits import data_cut
    from train.data import prompt_group, train_validation_cut

    overrides = [f"output_dir={tmp_path / 'run'}"]
    row = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", overrides)
    grouped = load_recipe(RECIPES_DIR / "tiny" / "s.yaml", overrides + ["data.validation_groups=prompt"])
    tr, va = train_validation_cut(grouped)
    etr, eva = data_cut(resolve(grouped, ["guard"]).data)
    assert tr["id"] == etr["id"] and va["id"] == eva["id"]

    def shared(train, validation):
        seen = {prompt_group(c) for c in train["conversation"]}
        return sum(prompt_group(c) in seen for c in validation["conversation"])

    assert shared(tr, va) == 0
    rtr, rva = train_validation_cut(row)
    assert shared(rtr, rva) > 0.3 * len(rva)
    assert abs(len(va) - len(rva)) < 0.25 * len(rva)
