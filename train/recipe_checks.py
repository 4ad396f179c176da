"""The value checks of a typed recipe (ranges, combinations, size bounds), each a one-line
:class:`~mood_data.errors.RecipeError` naming the file that set the key and the dotted key.
Detector names are not known here (train sits below the detectors): the evaluation parses
``eval.monitors`` once when it resolves its context (:func:`eval.run.context.parse_recipe_monitors`),
and every ``moodguard`` command that loads a recipe runs that parse at once."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Mapping

from mood_data.errors import RecipeError
from mood_data.readers import short_repr

from .recipe_files import accelerate_config_names, accelerate_config_path
from .recipe_schema import GUARD_ONLY, Recipe, TrainSection
from .recipe_typing import where

# upper bounds of the size keys: a value past them asks for more memory than any machine has
# (a per-device batch of 1e26, a 1e9-token window, a LoRA rank of 1e9) and is refused when the
# recipe is read; max_length and lora.r are checked again against the model when it is loaded
MAX_TOKENS = 1 << 20  # a context window, tokens
MAX_BATCH = 1 << 16  # conversations in one forward / per-device batch
MAX_GLOBAL_BATCH = 1 << 24
MAX_LORA_R = 1 << 16
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_PROCESSES = 1 << 16
MAX_GRID = 4096  # band cuts per edge of a cascade grid search (the search evaluates up to grid^2 bands)
SIZE_LIMITS: dict[str, int] = {  # dotted key ("*" = guard, lm and judge) -> largest value
    "*.global_batch_size": MAX_GLOBAL_BATCH, "*.per_device_batch_size": MAX_BATCH, "*.max_length": MAX_TOKENS,
    "*.lora.r": MAX_LORA_R, "*.parallel_members": MAX_PROCESSES, "eval.batch_size": MAX_BATCH,
    "eval.max_length": MAX_TOKENS, "eval.knn.k": MAX_BATCH, "eval.knn.max_ref": 1 << 24,
    "accelerate.num_processes": MAX_PROCESSES, "accelerate.num_machines": MAX_PROCESSES,
    "judge.n_shots": 1 << 10, "judge.shot_max_chars": 1 << 24,
}


def gradient_accumulation_steps(global_batch: int, per_device: int, num_processes: int, where: str = "recipe") -> int:
    """accumulation = global / (per_device * num_processes); the global batch never changes."""
    denom = per_device * num_processes
    if per_device <= 0 or num_processes <= 0 or global_batch % denom != 0:
        raise RecipeError(
            f"{where}: global_batch_size {global_batch} is not divisible by "
            f"per_device_batch_size {per_device} x num_processes {num_processes}"
        )
    return global_batch // denom


def _missing_model(name: str | None) -> str | None:
    """Why ``name`` (model / tokenizer) cannot exist, for a missing ``embedded:`` model or a
    missing path that is surely local (absolute, ``./``, ``~``, or more than one ``/``); hub
    ids (``owner/name``) are left to the loader."""
    if name is None:
        return None
    text = str(name)
    if text.startswith("converted:"):  # converted on demand (moodguard models convert --packaged)
        from train.convert import PACKAGED

        short = text.split(":", 1)[1]
        return None if short in PACKAGED else f"unknown converted model {short!r} (known: {', '.join(PACKAGED)})"
    if text.startswith("embedded:"):
        from mood_data.embedded import model_path
        from mood_data.errors import DataError

        try:
            model_path(text)
        except DataError as exc:
            return str(exc)
        return None
    local = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1
    if local and not Path(text).expanduser().exists():
        return f"model folder not found: {text}"
    return None


def check_recipe(recipe: Recipe, origin: Mapping[str, str], fallback: str) -> None:
    """Every value check of a typed recipe; ``origin``: which file set each key."""
    def fail(dotted: str, message: str):
        raise RecipeError(f"{where(dotted, origin, fallback)}: key '{dotted}': {message}")

    for key in ("model", "tokenizer"):
        problem = _missing_model(getattr(recipe, key))
        if problem:
            fail(key, problem)
    acc = recipe.accelerate
    if acc.config is not None and not accelerate_config_path(acc.config).is_file():
        fail("accelerate.config", f"unknown accelerate config {acc.config!r}; choose from {accelerate_config_names()}")
    if acc.num_processes < 1:
        fail("accelerate.num_processes", "must be >= 1")
    if acc.num_machines < 1:
        fail("accelerate.num_machines", "must be >= 1")
    elif acc.num_processes % acc.num_machines:
        fail("accelerate.num_machines", f"accelerate.num_processes {acc.num_processes} is not a multiple of "
                                        f"num_machines {acc.num_machines} (processes per node must be equal)")
    elif acc.num_machines > 1 and acc.config is None:
        fail("accelerate.num_machines", "a multi-node job needs accelerate.config (ddp, zero2, zero3 or fsdp)")
    for kind in ("guard", "lm", "judge"):
        sec: TrainSection = getattr(recipe, kind)
        for key in ("global_batch_size", "per_device_batch_size", "max_length", "save_steps", "logging_steps"):
            if getattr(sec, key) < 1:
                fail(f"{kind}.{key}", "must be >= 1")
        if sec.learning_rate <= 0:
            fail(f"{kind}.learning_rate", "must be > 0")
        if not 0.0 <= sec.warmup_ratio < 1.0:  # TrainingArguments.warmup_steps reads a float in [0, 1) as a ratio
            fail(f"{kind}.warmup_ratio", "must be in [0, 1)")
        if sec.max_steps == 0 or sec.max_steps < -1:
            fail(f"{kind}.max_steps", "must be -1 (use num_epochs) or >= 1")
        if not sec.seeds:
            fail(f"{kind}.seeds", "needs at least one seed")
        if len(set(sec.seeds)) != len(sec.seeds):
            fail(f"{kind}.seeds", "seeds must be distinct")
        if sec.lora.r < 1:
            fail(f"{kind}.lora.r", "must be >= 1")
        if not 0.0 <= sec.lora.dropout < 1.0:
            fail(f"{kind}.lora.dropout", "must be in [0, 1)")
        if isinstance(sec.lora.target_modules, str) and sec.lora.target_modules != "all-linear":
            fail(f"{kind}.lora.target_modules", "expected a list of module names or 'all-linear'")
        if sec.pad_to_multiple_of is not None and sec.pad_to_multiple_of < 1:
            fail(f"{kind}.pad_to_multiple_of", "must be >= 1 or null")
        _check_selection_and_head(kind, sec, fail)
        if sec.init_adapter is not None:
            _check_init_adapter(kind, sec, fail)
        try:
            gradient_accumulation_steps(sec.global_batch_size, sec.per_device_batch_size, acc.num_processes)
        except RecipeError:
            fail(
                f"{kind}.global_batch_size",
                f"{sec.global_batch_size} is not divisible by per_device_batch_size {sec.per_device_batch_size} "
                f"x accelerate.num_processes {acc.num_processes}",
            )
    for pattern, limit in SIZE_LIMITS.items():
        for dotted in ([pattern.replace("*", k) for k in ("guard", "lm", "judge")] if "*" in pattern else [pattern]):
            value = functools.reduce(getattr, dotted.split("."), recipe)
            if value is not None and value > limit:
                fail(dotted, f"{short_repr(value)} is too large (at most {limit:,})")
    for kind in ("guard", "lm", "judge"):
        for i, seed in enumerate(getattr(recipe, kind).seeds):
            if not 0 <= seed <= MAX_SEED:
                fail(f"{kind}.seeds[{i}]", f"{short_repr(seed)} is not a seed in [0, {MAX_SEED}]")
    if recipe.guard.packing:
        fail("guard.packing", "packing is only supported for the causal LM (lm.packing)")
    if recipe.judge.packing:
        fail("judge.packing", "packing is not supported for the judge")
    if recipe.judge.n_shots < 0:
        fail("judge.n_shots", "must be >= 0")
    bad = [r for r in recipe.judge.train_rubrics if r not in ("alignment", "uncertainty")]
    if bad or not recipe.judge.train_rubrics:
        fail("judge.train_rubrics", "expected a non-empty list of 'alignment' / 'uncertainty'")
    if not 0.0 < recipe.data.validation_fraction < 1.0:
        fail("data.validation_fraction", "must be in (0, 1)")
    if recipe.data.registry is not None:  # its domain names checked now, before any work
        from mood_data.domains import load_registry
        from mood_data.errors import DataError

        try:
            load_registry(recipe.data.registry)
        except DataError as exc:
            fail("data.registry", str(exc))
    ev = recipe.eval
    for i, fpr in enumerate(ev.fprs):
        if not 0.0 < fpr < 1.0:
            fail(f"eval.fprs[{i}]", f"must be in (0, 1), got {fpr}")
    if not ev.monitors:
        fail("eval.monitors", "needs at least one monitor")
    if not ev.mahalanobis.layers:
        fail("eval.mahalanobis.layers", "needs at least one layer")
    if ev.mahalanobis.ridge < 0:
        fail("eval.mahalanobis.ridge", "must be >= 0")
    for key in ("batch_size", "max_length"):
        if getattr(ev, key) < 1:
            fail(f"eval.{key}", "must be >= 1")
    if ev.knn.k < 1 or ev.knn.max_ref < ev.knn.k:
        fail("eval.knn.k", "need 1 <= k <= max_ref")
    _check_cascade(recipe.cascade, fail)


def _check_cascade(cas, fail) -> None:
    """The cascade section's values (its monitors are parsed by the evaluation: eval.run.cascade)."""
    if not cas.stages:
        return
    if len(cas.stages) < 2:
        fail("cascade.stages", f"a cascade needs at least two stages, got {len(cas.stages)}")
    if cas.max_escalation_rate is None and cas.max_cost_per_conversation is None:
        fail("cascade.stages", "a cascade needs a budget: set cascade.max_escalation_rate or "
                               "cascade.max_cost_per_conversation")
    if cas.max_escalation_rate is not None and not 0.0 <= cas.max_escalation_rate <= 1.0:
        fail("cascade.max_escalation_rate", f"must be in [0, 1], got {cas.max_escalation_rate}")
    if cas.max_cost_per_conversation is not None and cas.max_cost_per_conversation <= 0:
        fail("cascade.max_cost_per_conversation", f"must be > 0 seconds, got {cas.max_cost_per_conversation}")
    if not 0.0 < cas.fpr < 1.0:
        fail("cascade.fpr", f"must be in (0, 1), got {cas.fpr}")
    if not 2 <= cas.grid_size <= MAX_GRID:
        fail("cascade.grid_size", f"must be in [2, {MAX_GRID}], got {cas.grid_size}")
    if not cas.name or cas.name.strip() != cas.name or "/" in cas.name or cas.name.startswith("."):
        fail("cascade.name", f"{short_repr(cas.name)} is not a folder name (no '/', no leading '.' or blanks)")


def _check_selection_and_head(kind: str, sec: TrainSection, fail) -> None:
    """eval_every, and the guard-only keys (head learning rate, head init, class weights)."""
    if isinstance(sec.eval_every, int) and sec.eval_every < 1:
        fail(f"{kind}.eval_every", "must be 'epoch', a number of steps >= 1, or null")
    if sec.eval_every is not None and sec.eval_steps is not None:
        fail(f"{kind}.eval_every", f"set either eval_every (evaluate and keep the best checkpoint) or eval_steps "
                                   f"(evaluate only), not both (eval_steps is {sec.eval_steps})")
    if sec.eval_on_start and sec.eval_every is None:
        fail(f"{kind}.eval_on_start", "makes the starting weights a model-selection candidate: needs eval_every")
    if kind != "guard":
        defaults = {f.name: f.default for f in dataclasses.fields(TrainSection)}
        for key in GUARD_ONLY:
            if getattr(sec, key) != defaults[key]:
                shown = "null" if defaults[key] is None else short_repr(defaults[key])
                fail(f"{kind}.{key}", f"guard only (the {kind} has no classification head); leave it at {shown}")
        return
    if sec.head_learning_rate is not None and sec.head_learning_rate <= 0:
        fail(f"{kind}.head_learning_rate", "must be > 0, or null (= learning_rate)")
    if sec.probe_c <= 0:
        fail(f"{kind}.probe_c", "must be > 0")
    cw = sec.class_weights
    if isinstance(cw, list):
        if len(cw) != 2:
            fail(f"{kind}.class_weights", f"expected 'balanced', null or two weights [safe, unsafe], got {len(cw)} values")
        if any(w <= 0 for w in cw):
            fail(f"{kind}.class_weights", f"weights must be > 0, got {cw}")


# the peft task type of each kind's adapter (a warm start must continue an adapter of its own kind)
TASK_TYPES = {"guard": "SEQ_CLS", "lm": "CAUSAL_LM", "judge": "CAUSAL_LM"}


def _check_init_adapter(kind: str, sec: TrainSection, fail) -> None:
    """``<kind>.init_adapter``: an adapter folder of this kind whose LoRA shape is the recipe's,
    one seed, and no probe head (the warm-started head would be replaced)."""
    from pathlib import Path

    from mood_data.errors import MoodguardError
    from mood_data.readers import read_json

    key = f"{kind}.init_adapter"
    folder = Path(sec.init_adapter)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            fail(key, f"{folder}: no {name} (expected a {kind} adapter folder)")
    try:
        cfg = read_json(folder / "adapter_config.json", RecipeError)
    except MoodguardError as exc:
        fail(key, str(exc))
    if cfg.get("task_type") != TASK_TYPES[kind]:
        fail(key, f"{folder}: a {cfg.get('task_type')} adapter, not a {kind} ({TASK_TYPES[kind]}) adapter")
    lo = sec.lora
    targets = lo.target_modules if isinstance(lo.target_modules, str) else sorted(lo.target_modules)
    theirs = cfg.get("target_modules")
    theirs = sorted(theirs) if isinstance(theirs, list) else theirs
    for name, mine, other in (("r", lo.r, cfg.get("r")), ("alpha", lo.alpha, cfg.get("lora_alpha")),
                              ("target_modules", targets, theirs)):
        if mine != other:
            fail(key, f"{folder}: its LoRA {name} is {short_repr(other)} but {kind}.lora.{name} is {short_repr(mine)} "
                      "(a warm start continues the same adapter shape)")
    if len(sec.seeds) != 1:
        fail(key, f"a warm start continues one adapter; {kind}.seeds must hold one seed, got {sec.seeds}")
    if kind == "guard" and sec.init_head != "random":
        fail(key, "the warm-started head would be replaced by guard.init_head: probe; leave init_head at random")


__all__ = ["MAX_BATCH", "MAX_GLOBAL_BATCH", "MAX_LORA_R", "MAX_PROCESSES", "MAX_SEED", "MAX_TOKENS", "SIZE_LIMITS",
           "check_recipe", "gradient_accumulation_steps"]
