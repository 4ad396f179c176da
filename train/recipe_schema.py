"""The recipe's typed schema: one dataclass per section, every field with its help text.

Like TRL's config dataclasses, every field carries ``metadata={"help": ...}``: ``moodguard recipes
show R --explain`` prints each resolved value with that help and the file that set it
(:func:`train.recipe.explain`). The schema is plain data (no torch, no detector names): the
values are checked by :mod:`train.recipe_checks`, monitor names by the evaluation layer when it
resolves its context (:mod:`eval.run.context`).

The ``eval:`` section is part of the file format (training writes the whole resolved recipe into
every adapter folder), so its keys are declared here; the settings the evaluation works with
(detector settings, the evaluation context) are eval's own, resolved once from these values.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import yaml


def recipe_yaml(doc: dict) -> str:
    """The YAML text of a resolved recipe mapping (``recipe.yaml`` of run folders and bundles)."""
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)


def setting(default: Any = dataclasses.MISSING, help: str = "", added: str | None = None,  # noqa: A002 - TRL's name
            **kwargs) -> Any:
    """A recipe field with its help text (a mutable default goes in ``default_factory``). ``added``:
    the date of a key that arrived after recipes were in use, with a default that keeps the
    behaviour from before it existed; at that default it is left out of ``Recipe.identity`` (a
    sweep's stage keys), so a sweep folder written before the key existed still resumes."""
    return dataclasses.field(default=default, metadata={"help": help, **({"added": added} if added else {})}, **kwargs)


def _without_added_defaults(obj: Any, doc: dict) -> dict:
    """``doc`` (``obj`` as a dict) without the ``added`` fields that hold their default, recursively."""
    for f in dataclasses.fields(obj):
        if f.name not in doc:
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            doc[f.name] = _without_added_defaults(value, doc[f.name])
        elif f.metadata.get("added") and value == (f.default if f.default is not dataclasses.MISSING
                                                   else f.default_factory()):
            del doc[f.name]
    return doc


def factory(make, help: str = "") -> Any:  # noqa: A002
    """A recipe field whose default is built by ``make()`` (lists, sections)."""
    return dataclasses.field(default_factory=make, metadata={"help": help})


@dataclass
class LoraSection:
    r: int = setting(16, "LoRA rank of every adapted module")
    alpha: int = setting(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = setting(0.05, "dropout on the LoRA input, in [0, 1)")
    target_modules: list[str] | str = factory(lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                              "module names the LoRA adapts, or 'all-linear' (peft's shortcut)")


@dataclass
class TrainSection:
    """Settings shared by the guard (sequence classification) and the causal-LM adapter."""

    enabled: bool = setting(True, "train this adapter in a sweep (false: skip the stage)")
    seeds: list[int] = factory(lambda: [0], "one adapter per seed; several seeds make an ensemble "
                                            "(<run>/<kind>-seed<S>/)")
    learning_rate: float = setting(2e-4, "peak learning rate of the LoRA weights (> 0)")
    global_batch_size: int = setting(32, "conversations per optimizer step over all processes (accumulation "
                                         "makes up the rest)")
    per_device_batch_size: int = setting(4, "conversations per forward on one device")
    max_steps: int = setting(-1, "optimizer steps; -1 = num_epochs decides")
    num_epochs: float = setting(1.0, "epochs over the train slice when max_steps is -1")
    max_length: int = setting(2048, "training context in tokens (longer conversations keep their end)")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass (less memory)")
    warmup_ratio: float = setting(0.03, "share of the steps with a linear warm-up, in [0, 1)")
    weight_decay: float = setting(0.0, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = setting(
        "cosine", "learning-rate schedule after the warm-up")
    optim: str = setting("adamw_torch", "transformers optimizer name")
    save_steps: int = setting(500, "checkpoint every N optimizer steps (resumable with --resume)")
    save_total_limit: int | None = setting(2, "checkpoints kept; null = all")
    logging_steps: int = setting(10, "log the loss every N steps")
    eval_steps: int | None = setting(None, "evaluate the validation loss every N steps (no model selection); "
                                           "null = never")
    eval_every: Literal["epoch"] | int | None = setting(
        None, "model selection: evaluate on the validation slice every epoch or every N steps, checkpoint at each "
              "evaluation and keep the best as the final adapter (guard: AUROC, lm / judge: loss); null = off")
    eval_on_start: bool = setting(False, "model selection: also evaluate the starting weights (LoRA at zero, the head "
                                         "as initialised: the LP-FT probe, a warm start's adapter) and keep them as a "
                                         "candidate (checkpoint-0); needs eval_every", added="2026-12-03")
    # --- guard only (the causal LM and the judge have no classification head): see GUARD_ONLY
    head_learning_rate: float | None = setting(None, "guard only: learning rate of the classification head; "
                                                     "null = learning_rate")
    init_head: Literal["random", "probe"] = setting("random", "guard only: 'probe' starts the head from a logistic "
                                                              "probe on the frozen base's features (LP-FT)")
    probe_c: float = setting(1.0, "guard only: the probe's inverse L2 regularisation (sklearn C, std-scaled features)")
    class_weights: Literal["balanced"] | list[float] | None = setting(
        None, "guard only: weighted cross-entropy, 'balanced' (n / (2 n_c)) or [w_safe, w_unsafe]; null = plain")
    group_by_length: bool = setting(True, "batch conversations of similar length (seeded, process-independent)")
    pad_to_multiple_of: int | None = setting(8, "pad batches to a multiple of this many tokens; null = no rounding")
    packing: bool = setting(False, "causal LM only: padding-free packing (flattened batches with position ids)")
    parallel_members: int = setting(1, "seed members trained at once, one process each; 1 = one after the other")
    init_adapter: str | None = setting(None, "warm start: an adapter folder of this kind (adapter_config.json + "
                                             "adapter_model.safetensors; a guard's with its head) whose weights the "
                                             "training continues from (moodguard refresh --mode continue); its LoRA "
                                             "shape must equal lora below; null = a fresh LoRA")
    lora: LoraSection = factory(LoraSection, "the LoRA adapter")


# keys that only the guard may change from their defaults (the causal LM and the judge have no
# classification head); their defaults leave training as it was before the keys existed
GUARD_ONLY = ("head_learning_rate", "init_head", "probe_c", "class_weights")


@dataclass
class JudgeSection(TrainSection):
    """The instruction-tuned judge (eval/engine/judge_pass.py) and its optional SFT LoRA
    (train/judge.py). The training keys are those of ``guard`` / ``lm``; ``max_length`` bounds
    the whole prompt."""

    enabled: bool = setting(False, "train a judge SFT LoRA (moodguard train judge)")
    model: str | None = setting(None, "the judge's instruct model (path / hub id); null = the recipe's model")
    adapter: str | None = setting(None, "a judge LoRA folder; null = <run>/judge when it exists")
    alignment_rubric: str | None = setting(None, "rubric YAML of the 'judge' detector; null = the packaged "
                                                 "train/rubrics/alignment.yaml")
    uncertainty_rubric: str | None = setting(None, "rubric YAML of 'judge-uncertainty'; null = the packaged "
                                                   "train/rubrics/uncertainty.yaml")
    train_rubrics: list[str] = factory(lambda: ["alignment", "uncertainty"], "rubrics the judge LoRA is trained on")
    n_shots: int = setting(2, "few-shot examples from the ID train slice in every judge prompt")
    shot_seed: int = setting(0, "seed of the few-shot choice")
    shot_max_chars: int = setting(600, "longest conversation (characters) used as a few-shot example")


@dataclass
class DataSection:
    source: str = setting("embedded", "'embedded', a folder with train.* / test.* files, a single file or a hub id")
    template: str = setting("mood", "how messages are rendered: 'mood' or a tokenizer (path) whose chat template "
                                    "is used")
    registry: str | None = setting(None, "domains YAML declaring custom ID / OOD domains (--domains); null = the "
                                         "MOOD domains")
    validation_fraction: float = setting(0.1, "share of the ID train split held out (seeded, stratified) for "
                                              "model selection and fusion, in (0, 1)")
    validation_groups: Literal["row", "prompt"] = setting(
        "row", "how the validation slice is drawn: 'row' (rows, stratified by domain and label) or 'prompt' "
               "(whole prompt groups, the first user turn: no request on both sides, as in the benchmark's "
               "train / test split)", added="2026-12-03")
    max_train_rows: int | None = setting(None, "use at most this many train rows (seeded); null = all")
    max_test_unsafe_per_domain: int | None = setting(None, "quick runs only: at most this many unsafe test rows "
                                                           "per domain (seeded); null = all")
    max_test_safe_per_domain: int | None = setting(None, "quick runs only: at most this many safe test rows per "
                                                         "domain (seeded); null = all")


@dataclass
class AccelerateSection:
    config: str | None = setting(None, "accelerate_configs/<config>.yaml for training; null = in-process")
    num_processes: int = setting(1, "all processes (GPUs) of the training job, over every machine")
    num_machines: int = setting(1, "nodes of a multi-node job (sweep --emit slurm); num_processes / num_machines "
                                   "per node")


@dataclass
class MahalanobisSection:
    layers: list[int] = factory(lambda: [-1], "hidden-state layers whose pooled features Mahalanobis and kNN read "
                                              "(-1 = the final normed state, the head's input)")
    pooling: Literal["last", "mean"] = setting("last", "feature pooling: the last real token or the mean over tokens")
    estimator: Literal["empirical", "ledoit_wolf", "oas"] = setting("empirical", "covariance estimator")
    ridge: float = setting(1e-6, "added to the covariance diagonal (>= 0)")
    variant: Literal["plain", "class_conditional", "relative"] = setting(
        "plain", "one Gaussian of the safe rows, class-conditional (tied covariance) or relative (minus a "
                 "background Gaussian)")


@dataclass
class PerplexitySection:
    assistant_only: bool = setting(False, "perplexity over the assistant turns only (else the whole conversation)")


@dataclass
class KnnSection:
    k: int = setting(10, "the k-th nearest safe train feature gives the distance")
    max_ref: int = setting(5000, "at most this many reference rows (seeded subsample)")


@dataclass
class EvalSection:
    mahalanobis: MahalanobisSection = factory(MahalanobisSection, "Mahalanobis detector (and the feature layers)")
    perplexity: PerplexitySection = factory(PerplexitySection, "perplexity detector")
    knn: KnnSection = factory(KnnSection, "k-nearest-neighbour detector")
    monitors: list[str] = factory(lambda: ["guard", "guard+maha", "guard+ppl", "guard+maha+ppl"],
                                  "monitors: detectors joined by '+', the first is the fusion anchor (moodguard "
                                  "evaluate --help lists them); ensemble-* need guard.seeds with >= 2 seeds, judge* "
                                  "a judge")
    fusion: Literal["lambda", "min", "mean", "rank", "logistic"] = setting(
        "lambda", "how a monitor fuses its detectors' scores (fitted on ID validation rows)")
    fprs: list[float] = factory(lambda: [0.005, 0.01, 0.02], "false-positive rates of the thresholds, each in (0, 1)")
    batch_size: int = setting(8, "conversations per scoring forward")
    max_length: int = setting(2048, "scoring context in tokens (longer conversations keep their end)")
    device_map: Literal["auto"] | None = setting(
        None, "'auto': spread the backbone over every visible GPU (models that do not fit one); null = one device")
    calibration_split: Literal["test", "validation"] = setting(
        "test", "where thresholds come from: the test split's ID-safe rows (mood-bench) or the held-out ID "
                "validation slice")


@dataclass
class CascadeStage:
    monitor: str = setting(help="the stage's monitor: detectors joined by '+' (as in eval.monitors)")
    recipe: str | None = setting(None, "the recipe whose run scores this stage (another backbone); null = this recipe; "
                                       "a relative path is read from the folder of the file that set it")
    run: str | None = setting(None, "that recipe's run folder; null = its output_dir")


@dataclass
class CascadeSection:
    """A cascade monitor (docs/cascade.md): ordered stages, each an existing monitor; a stage passes a
    conversation on when its score lies in an escalation band fitted on ID validation rows for a
    budget. Evaluated by ``moodguard evaluate`` (``<run>/eval/<name>/``), exported by ``export --cascade``."""

    stages: list[CascadeStage] = factory(list, "the stages in order (at least two); empty = no cascade")
    name: str = setting("cascade", "the cascade's name: its eval folder <run>/eval/<name>/")
    max_escalation_rate: float | None = setting(None, "budget: at most this share of the ID validation rows leaves "
                                                      "the first stage, in [0, 1]")
    max_cost_per_conversation: float | None = setting(None, "budget: at most this many seconds per conversation "
                                                            "(the stages' measured seconds on this device)")
    fill_budget: bool = setting(False, "spend the budget: only the bands escalating the most it allows compete "
                                       "(else a narrower band wins when it has the same ID recall)")
    fpr: float = setting(0.01, "the FPR whose ID recall the band fit maximises, in (0, 1)")
    search: Literal["exact", "grid"] = setting("exact", "band search: every cut between distinct ID validation "
                                                        "scores, or grid_size quantiles of them")
    grid_size: int = setting(64, "cuts per band edge of the grid search (>= 2)")


@dataclass
class Recipe:
    model: str = setting(help="base model: a hub id, a local folder, embedded:<name> or converted:<name>")
    name: str | None = setting(None, "run name; null = from the file path (recipes/qwen2.5/7b.yaml -> qwen2.5-7b)")
    family: str | None = setting(None, "model family (for reports)")
    tokenizer: str | None = setting(None, "tokenizer; null = the adapter's copy, else the model's")
    trust_remote_code: bool = setting(False, "ignored unless --trust-remote-code is given (a recipe never turns it on)")
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = setting("bfloat16", "weights dtype")
    attn_implementation: str | None = setting(None, "transformers attention implementation; null = its default")
    output_dir: str | None = setting(None, "the run folder; null = runs/<name>")
    report_to: Literal["none", "wandb", "tensorboard"] = setting("none", "training logs")
    wandb_project: str = setting("moodguard", "wandb project when report_to is wandb")
    config_shape: dict | None = setting(None, "config.json keyword arguments for --random-init benchmarks when the "
                                              "hub is unreachable")
    data: DataSection = factory(DataSection, "the benchmark data")
    accelerate: AccelerateSection = factory(AccelerateSection, "how training is launched")
    guard: TrainSection = factory(TrainSection, "the guard classifier's LoRA training")
    lm: TrainSection = factory(lambda: TrainSection(group_by_length=True), "the causal-LM adapter's training")
    judge: JudgeSection = factory(JudgeSection, "the judge scorer and its optional LoRA")
    eval: EvalSection = factory(EvalSection, "detectors, monitors, fusion and thresholds")
    # left out of the resolved recipe while it has no stages (stage keys and recipe.yaml files unchanged)
    cascade: CascadeSection = dataclasses.field(default_factory=CascadeSection, metadata={
        "help": "a cascade monitor over this and other recipes' monitors (docs/cascade.md)", "omit_empty": "stages"})
    # where the recipe came from and which file set each key (not YAML keys)
    source_file: str | None = dataclasses.field(default=None, metadata={"internal": True})
    origins: dict = dataclasses.field(default_factory=dict, metadata={"internal": True}, repr=False)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.metadata.get("internal") or (f.metadata.get("omit_empty")
                                              and not out[f.name][f.metadata["omit_empty"]]):
                out.pop(f.name, None)
        return out

    def identity(self) -> dict:
        """``to_dict`` without the keys added later that still hold their behaviour-keeping default
        (``setting(added=...)``): what a sweep's stage keys hash, stable when such a key arrives."""
        return _without_added_defaults(self, self.to_dict())

    def to_yaml(self) -> str:
        return recipe_yaml(self.to_dict())

    def section(self, kind: str) -> TrainSection:
        if kind not in ("guard", "lm", "judge"):
            raise ValueError(f"unknown section {kind!r}")
        return getattr(self, kind)


__all__ = ["AccelerateSection", "CascadeSection", "CascadeStage", "DataSection", "EvalSection", "GUARD_ONLY",
           "JudgeSection", "KnnSection", "LoraSection", "MahalanobisSection", "PerplexitySection", "Recipe", "TrainSection",
           "factory", "recipe_yaml", "setting"]
