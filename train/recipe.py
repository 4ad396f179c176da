"""Recipes: one YAML file per backbone size that configures the guard, the causal-LM adapter
and the eval/detector settings.

Files inherit through a ``base:`` key (a path relative to the file)::

    recipes/_base.yaml  ->  recipes/<family>/_family.yaml  ->  recipes/<family>/<size>.yaml

Mappings are deep-merged (the child wins), lists and scalars are replaced. ``key=value``
overrides with dotted keys (``guard.learning_rate=1e-4``) are applied last; values are parsed
with ``yaml.safe_load``. The merged mapping is checked against the typed dataclasses below;
every problem raises :class:`~mood_data.errors.RecipeError` with one line naming the file
that set the key and the dotted key, e.g.
``recipes/qwen2.5/7b.yaml: key 'guard.lerning_rate': unknown key``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import yaml

from mood_data.errors import RecipeError
from mood_data.readers import YamlTooLarge, read_yaml, safe_load_bounded, short_repr

from .detector_table import NAMES, parse_monitor

# upper bounds of the size keys: a value past them asks for more memory than any machine has
# (a per-device batch of 1e26, a 1e9-token window, a LoRA rank of 1e9) and is refused when the
# recipe is read; max_length and lora.r are checked again against the model when it is loaded
MAX_TOKENS = 1 << 20  # a context window, tokens
MAX_BATCH = 1 << 16  # conversations in one forward / per-device batch
MAX_GLOBAL_BATCH = 1 << 24
MAX_LORA_R = 1 << 16
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_PROCESSES = 1 << 16
SIZE_LIMITS: dict[str, int] = {  # dotted key ("*" = guard, lm and judge) -> largest value
    "*.global_batch_size": MAX_GLOBAL_BATCH, "*.per_device_batch_size": MAX_BATCH, "*.max_length": MAX_TOKENS,
    "*.lora.r": MAX_LORA_R, "*.parallel_members": MAX_PROCESSES, "eval.batch_size": MAX_BATCH,
    "eval.max_length": MAX_TOKENS, "eval.knn.k": MAX_BATCH, "eval.knn.max_ref": 1 << 24,
    "accelerate.num_processes": MAX_PROCESSES, "accelerate.num_machines": MAX_PROCESSES,
    "judge.n_shots": 1 << 10, "judge.shot_max_chars": 1 << 24,
}

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
ACCELERATE_CONFIGS_DIR = REPO_ROOT / "accelerate_configs"

# ---------------------------------------------------------------------------------------------
# schema


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # a module-name list, or "all-linear" (peft's shortcut)
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainSection:
    """Settings shared by the guard (sequence classification) and the causal-LM adapter."""

    enabled: bool = True
    seeds: list[int] = field(default_factory=lambda: [0])
    learning_rate: float = 2e-4
    global_batch_size: int = 32
    per_device_batch_size: int = 4
    max_steps: int = -1
    num_epochs: float = 1.0
    max_length: int = 2048
    gradient_checkpointing: bool = False
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    optim: str = "adamw_torch"
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    eval_steps: int | None = None
    # model selection: evaluate on the validation slice every epoch ("epoch") or every N optimizer
    # steps, checkpoint at every evaluation, and keep the best checkpoint as the final adapter
    # (guard: highest validation AUROC; lm / judge: lowest validation loss); null = no selection
    eval_every: Literal["epoch"] | int | None = None
    # --- guard only (the causal LM and the judge have no classification head): see GUARD_ONLY
    # learning rate of the classification head (peft modules_to_save copy of score/classifier);
    # null = learning_rate
    head_learning_rate: float | None = None
    # LP-FT: "probe" starts the head from a logistic probe fitted on the frozen base's pooled features
    init_head: Literal["random", "probe"] = "random"
    probe_c: float = 1.0  # the probe's inverse L2 regularisation (sklearn C, on std-scaled features)
    # weighted cross-entropy: "balanced" (n / (2 n_c) from the train rows) or [w_safe, w_unsafe]
    class_weights: Literal["balanced"] | list[float] | None = None
    group_by_length: bool = True
    pad_to_multiple_of: int | None = 8
    # padding-free packing (DataCollatorWithFlattening + position ids); causal LM only
    packing: bool = False
    # seed members trained at once, each in its own process (own GPUs when there are enough,
    # a share of the CPU threads otherwise); 1 = one after the other in this process
    parallel_members: int = 1
    lora: LoraSection = field(default_factory=LoraSection)


# keys that only the guard may change from their defaults (the causal LM and the judge have no
# classification head); their defaults leave training as it was before the keys existed
GUARD_ONLY = ("head_learning_rate", "init_head", "probe_c", "class_weights")


@dataclass
class JudgeSection(TrainSection):
    """The instruction-tuned judge (eval/judge.py) and its optional SFT LoRA (train/judge.py).
    The training keys are those of ``guard`` / ``lm``; ``max_length`` bounds the whole prompt."""

    enabled: bool = False  # SFT training of a judge LoRA (moodguard train judge)
    model: str | None = None  # any instruct model (path / hub id); null = the recipe's model
    adapter: str | None = None  # a judge LoRA; null = <run>/judge when it exists
    alignment_rubric: str | None = None  # YAML file; null = train/rubrics/alignment.yaml
    uncertainty_rubric: str | None = None  # YAML file; null = train/rubrics/uncertainty.yaml
    train_rubrics: list[str] = field(default_factory=lambda: ["alignment", "uncertainty"])
    n_shots: int = 2  # few-shot examples from the ID train slice
    shot_seed: int = 0
    shot_max_chars: int = 600


@dataclass
class DataSection:
    source: str = "embedded"
    template: str = "mood"
    registry: str | None = None
    validation_fraction: float = 0.1
    max_train_rows: int | None = None
    # quick runs only (the demo): cap the test rows of every domain, unsafe and safe apart (seeded)
    max_test_unsafe_per_domain: int | None = None
    max_test_safe_per_domain: int | None = None


@dataclass
class AccelerateSection:
    # name of accelerate_configs/<config>.yaml, or null to run in-process
    config: str | None = None
    num_processes: int = 1  # all processes (GPUs) of the job, over every machine
    # nodes of a multi-node job (`sweep --emit slurm`, recipes/launch.slurm); num_processes / num_machines per node
    num_machines: int = 1


@dataclass
class MahalanobisSection:
    layers: list[int] = field(default_factory=lambda: [-1])
    pooling: Literal["last", "mean"] = "last"
    estimator: Literal["empirical", "ledoit_wolf", "oas"] = "empirical"
    ridge: float = 1e-6
    variant: Literal["plain", "class_conditional", "relative"] = "plain"


@dataclass
class PerplexitySection:
    assistant_only: bool = False


@dataclass
class KnnSection:
    k: int = 10
    max_ref: int = 5000


@dataclass
class EvalSection:
    # monitors: detectors of train/detector_table.py joined by '+'. ensemble-* need guard.seeds
    # with >= 2 seeds; judge* need a judge (judge.model or a trained <run>/judge)
    mahalanobis: MahalanobisSection = field(default_factory=MahalanobisSection)
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    knn: KnnSection = field(default_factory=KnnSection)
    monitors: list[str] = field(default_factory=lambda: ["guard", "guard+maha", "guard+ppl", "guard+maha+ppl"])
    fusion: Literal["lambda", "min", "mean", "rank", "logistic"] = "lambda"
    fprs: list[float] = field(default_factory=lambda: [0.005, 0.01, 0.02])
    batch_size: int = 8
    max_length: int = 2048
    # "auto": load the backbone with device_map="auto" over every visible GPU (27B/32B that do
    # not fit one GPU; one process); null: the whole model on the resolved device
    device_map: Literal["auto"] | None = None
    # where the thresholds come from: "test" = the test split's ID-safe rows (mood-bench), or
    # "validation" = the held-out ID validation slice the fusion is fitted on (docs/metrics.md)
    calibration_split: Literal["test", "validation"] = "test"


@dataclass
class Recipe:
    model: str
    name: str | None = None
    family: str | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = "bfloat16"
    attn_implementation: str | None = None
    output_dir: str | None = None
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    wandb_project: str = "moodguard"
    # config.json keyword arguments for --random-init benchmarks when the hub is unreachable
    config_shape: dict | None = None
    data: DataSection = field(default_factory=DataSection)
    accelerate: AccelerateSection = field(default_factory=AccelerateSection)
    guard: TrainSection = field(default_factory=TrainSection)
    lm: TrainSection = field(default_factory=lambda: TrainSection(group_by_length=True))
    judge: JudgeSection = field(default_factory=JudgeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    # where the recipe came from (not a YAML key)
    source_file: str | None = field(default=None, metadata={"internal": True})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source_file", None)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def section(self, kind: str) -> TrainSection:
        if kind not in ("guard", "lm", "judge"):
            raise ValueError(f"unknown section {kind!r}")
        return getattr(self, kind)


# ---------------------------------------------------------------------------------------------
# helpers


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it is below it (shorter messages)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def recipe_name(path: str | os.PathLike) -> str:
    """``recipes/qwen2.5/7b.yaml`` -> ``qwen2.5-7b``; a file elsewhere -> its stem."""
    p = Path(path).resolve()
    try:
        rel = p.relative_to(RECIPES_DIR)
        return "-".join(rel.with_suffix("").parts)
    except ValueError:
        return p.stem


def accelerate_config_path(name: str) -> Path:
    return ACCELERATE_CONFIGS_DIR / f"{name}.yaml"


def accelerate_config_names() -> list[str]:
    return sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))


def gradient_accumulation_steps(global_batch: int, per_device: int, num_processes: int, where: str = "recipe") -> int:
    """accumulation = global / (per_device * num_processes); the global batch never changes."""
    denom = per_device * num_processes
    if per_device <= 0 or num_processes <= 0 or global_batch % denom != 0:
        raise RecipeError(
            f"{where}: global_batch_size {global_batch} is not divisible by "
            f"per_device_batch_size {per_device} x num_processes {num_processes}"
        )
    return global_batch // denom


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value (dotted keys, e.g. guard.learning_rate=1e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: empty key")
    try:
        parsed = safe_load_bounded(value) if value.strip() else None
    except YamlTooLarge as err:
        raise RecipeError(f"override {short_repr(text)}: value refused ({err})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({type(err).__name__})") from None
    return key, parsed


# ---------------------------------------------------------------------------------------------
# loading + merging


def _read_yaml(path: Path, where: str) -> dict:
    if not path.is_file():
        raise RecipeError(f"{where}: recipe file not found: {display_path(path)}")
    data = read_yaml(display_path(path), RecipeError, what="recipe file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{display_path(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, child: dict, base_origin: dict, child_file: str, prefix: str = "") -> tuple[dict, dict]:
    """Deep-merge ``child`` onto ``base``; returns (merged, origin) where origin maps every
    dotted key to the file that set it."""
    merged = dict(base)
    origin = dict(base_origin)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            sub, origin = _merge(merged[key], value, origin, child_file, dotted + ".")
            merged[key] = sub
        else:
            for k in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
                del origin[k]
            merged[key] = value
        origin[dotted] = child_file
    return merged, origin


def _load_chain(path: Path, stack: tuple[Path, ...], where: str) -> tuple[dict, dict]:
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(display_path(p) for p in (*stack, path))
        raise RecipeError(f"{display_path(stack[-1])}: key 'base': inheritance cycle: {cycle}")
    data = _read_yaml(path, where)
    shown = display_path(path)
    base = data.pop("base", None)
    if base is None:
        parent, origin = {}, {}
    else:
        if not isinstance(base, str) or not base:
            raise RecipeError(f"{shown}: key 'base': expected a relative path string, got {short_repr(base)}")
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise RecipeError(f"{shown}: key 'base': base file not found: {display_path(base_path)}")
        parent, origin = _load_chain(base_path, (*stack, path), shown)
    return _merge(parent, data, origin, shown)


def resolve_mapping(path: str | os.PathLike, overrides: Iterable[str] = ()) -> tuple[dict, dict]:
    """The merged (not yet validated) mapping of a recipe and the origin of every key."""
    path = Path(path)
    merged, origin = _load_chain(path, (), "recipe")
    shown = display_path(path)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = merged
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                if nxt is not None:
                    raise RecipeError(f"{shown}: key '{'.'.join(parts[: i + 1])}': override {text!r} descends into a non-mapping")
                nxt = node[part] = {}
            node = nxt
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]], origin = _merge(node[parts[-1]], value, origin, f"{shown} (override)", key + ".")
        else:
            node[parts[-1]] = value
        origin[key] = f"{shown} (override)"
    return merged, origin


# ---------------------------------------------------------------------------------------------
# typed validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


_PLAIN: dict[Any, Any] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    dict: lambda v: isinstance(v, dict),
}


def _convert(value: Any, tp: Any, dotted: str, origin: Mapping[str, str], fallback: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return the converted value."""
    org = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch
        return _build(tp, value, dotted + ".", origin, fallback)
    if org in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg, dotted, origin, fallback)
            except _Mismatch:
                continue
        raise _Mismatch
    if org is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if org is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{dotted}[{i}]", origin, fallback) for i, v in enumerate(value)]
    if tp in _PLAIN:  # taken as they are when the YAML type matches exactly (bool is no int)
        if _PLAIN[tp](value):
            return value
        raise _Mismatch
    if tp is float:  # finite numbers only: NaN / inf (.nan, .inf, "nan", 1e999) are refused
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                out = float(value)
            except ValueError:
                raise _Mismatch from None
        else:
            raise _Mismatch
        if not math.isfinite(out):
            raise _Mismatch
        return out
    raise TypeError(f"unsupported annotation {tp!r}")  # pragma: no cover - schema bug


def _non_finite(value: Any) -> bool:
    try:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool) and not math.isfinite(float(value))
    except (ValueError, OverflowError):
        return False


def _where(dotted: str, origin: Mapping[str, str], fallback: str) -> str:
    key = dotted.split("[", 1)[0]
    while key:
        if key in origin:
            return origin[key]
        key = key.rsplit(".", 1)[0] if "." in key else ""
    return fallback


def _build(cls: type, data: Mapping[str, Any], prefix: str, origin: Mapping[str, str], fallback: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}{key}"
            raise RecipeError(f"{_where(dotted, origin, fallback)}: key '{dotted}': unknown key")
    kwargs = {}
    for name, f in fields.items():
        dotted = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecipeError(f"{fallback}: key '{dotted}': missing required key")
            continue
        value = data[name]
        try:
            kwargs[name] = _convert(value, hints[name], dotted, origin, fallback)
        except _Mismatch:
            raise RecipeError(
                f"{_where(dotted, origin, fallback)}: key '{dotted}': expected {_type_name(hints[name])}, "
                f"got {short_repr(value)}{' (NaN/inf refused: a finite number)' if _non_finite(value) else ''}"
            ) from None
    return cls(**kwargs)


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


def _dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check(recipe: Recipe, origin: Mapping[str, str], fallback: str) -> None:
    def fail(dotted: str, message: str):
        raise RecipeError(f"{_where(dotted, origin, fallback)}: key '{dotted}': {message}")

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
            value = _dotted(recipe, dotted)
            if value is not None and value > limit:
                fail(dotted, f"{short_repr(value)} is too large (at most {limit:,})")
    for kind in ("guard", "lm", "judge"):
        for i, seed in enumerate(recipe.section(kind).seeds):
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
    for i, mon in enumerate(ev.monitors):
        try:
            parse_monitor(mon)
        except RecipeError:
            fail(f"eval.monitors[{i}]", f"unknown monitor {mon!r}; combine {list(NAMES)} with '+'")
    if not ev.mahalanobis.layers:
        fail("eval.mahalanobis.layers", "needs at least one layer")
    if ev.mahalanobis.ridge < 0:
        fail("eval.mahalanobis.ridge", "must be >= 0")
    for key in ("batch_size", "max_length"):
        if getattr(ev, key) < 1:
            fail(f"eval.{key}", "must be >= 1")
    if ev.knn.k < 1 or ev.knn.max_ref < ev.knn.k:
        fail("eval.knn.k", "need 1 <= k <= max_ref")


def _check_selection_and_head(kind: str, sec: TrainSection, fail) -> None:
    """eval_every, and the guard-only keys (head learning rate, head init, class weights)."""
    if isinstance(sec.eval_every, int) and sec.eval_every < 1:
        fail(f"{kind}.eval_every", "must be 'epoch', a number of steps >= 1, or null")
    if sec.eval_every is not None and sec.eval_steps is not None:
        fail(f"{kind}.eval_every", f"set either eval_every (evaluate and keep the best checkpoint) or eval_steps "
                                   f"(evaluate only), not both (eval_steps is {sec.eval_steps})")
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


_WARNED_TRUST: set[str] = set()


def apply_trust_remote_code(recipe: Recipe, asked: bool, where: str) -> None:
    """``trust_remote_code`` is on only when the person running the command asks for it
    (``--trust-remote-code``); a recipe key alone never turns it on. A recipe that sets it gets
    ONE warning per file and process: ignored without the flag, or a reminder that the
    model's own Python code will run."""
    requested = recipe.trust_remote_code
    recipe.trust_remote_code = bool(asked)
    if requested and where not in _WARNED_TRUST:
        _WARNED_TRUST.add(where)
        if asked:
            note = "the model's own Python code will run (--trust-remote-code given)"
        else:
            note = "ignored: a recipe never turns it on; pass --trust-remote-code to run the model's own code"
        print(f"moodguard: warning: {where}: key 'trust_remote_code': {note}", file=sys.stderr)


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = (), *, trust_remote_code: bool = False) -> Recipe:
    """Resolve inheritance and overrides, validate, and return the typed :class:`Recipe`.

    ``trust_remote_code`` is the caller's explicit consent (the CLI's ``--trust-remote-code``);
    the recipe's own ``trust_remote_code`` key only triggers a warning (see
    :func:`apply_trust_remote_code`)."""
    path = Path(path)
    merged, origin = resolve_mapping(path, list(overrides))
    shown = display_path(path)
    recipe = _build(Recipe, merged, "", origin, shown)
    _check(recipe, origin, shown)
    apply_trust_remote_code(recipe, trust_remote_code, _where("trust_remote_code", origin, shown))
    if recipe.name is None:
        recipe.name = recipe_name(path)
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / recipe.name)
    recipe.source_file = str(path.resolve())
    return recipe


def list_recipes(root: str | os.PathLike = RECIPES_DIR) -> list[Path]:
    """Every concrete recipe under ``root`` (files starting with ``_`` are bases; sweeps are
    another format)."""
    root = Path(root)
    return sorted(
        p for p in root.rglob("*.yaml")
        if not p.name.startswith("_") and "sweeps" not in p.relative_to(root).parts
    )
