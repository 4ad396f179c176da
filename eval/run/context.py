"""The evaluation's configuration, resolved ONCE from a recipe into plain values.

The command line (or a public API call: ``evaluate_recipe``, ``fit_detectors``,
``export_bundle``) loads the recipe and calls :func:`resolve`; everything below receives the
:class:`EvalContext` (or a part of it) and never the :class:`~train.recipe_schema.Recipe`. This is
also where the monitors are parsed, once: a recipe's ``eval.monitors`` with a one-line error
naming the file (or override) that set them.

* :class:`ModelSpec` -- the base model and where the run's adapters are (``<run>/guard``, ``lm``,
  the seed members), dtype, device placement, remote code;
* :class:`DataSpec` -- the data source and its cut (train / validation slice, test caps);
* :class:`JudgeSpec` -- the judge (model, adapter, rubrics, few-shot examples);
* the monitors (name -> detectors), the settings of the fitted detectors, the feature layers,
  the pass settings (:class:`~eval.engine.planner.ScoreSettings`), fusion and thresholds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mood_data.errors import RecipeError
from train.recipe_typing import where

from ..engine.detectors.knn import KNNSettings
from ..engine.detectors.mahalanobis import MahalanobisSettings
from ..engine.planner import Plan, ScoreSettings, plan
from ..engine.table import DETECTORS, NAMES, fitted, needed, parse_monitor, parse_monitors


@dataclass(frozen=True)
class ModelSpec:
    """The backbone of a run: the base (as the recipe names it) and its adapters' run folder."""

    base: str
    run_root: Path
    tokenizer: str | None = None
    dtype: str = "bfloat16"
    device_map: str | None = None
    trust_remote_code: bool = False
    device: str | None = None  # --device
    guard_seeds: tuple[int, ...] = (0,)  # several: an ensemble (<run>/guard-seed<S>, the first anchors)


@dataclass(frozen=True)
class DataSpec:
    """Where the rows come from and how they are cut."""

    source: str  # --source, else the recipe's data.source
    recipe_source: str  # the recipe's data.source (named in meta.json settings)
    template: str = "mood"
    registry: str | None = None
    validation_fraction: float = 0.1
    validation_groups: str = "row"
    max_train_rows: int | None = None
    max_test_unsafe_per_domain: int | None = None
    max_test_safe_per_domain: int | None = None


@dataclass(frozen=True)
class JudgeSpec:
    model: str | None = None  # null: the recipe's model
    adapter: str | None = None  # null: <run>/judge when it holds an adapter
    alignment_rubric: str | None = None
    uncertainty_rubric: str | None = None
    n_shots: int = 2
    shot_seed: int = 0
    shot_max_chars: int = 600
    max_length: int = 2048


@dataclass(frozen=True)
class StageSpec:
    """One stage of a cascade: a monitor of this run (``own``) or of another run, with the context
    of its run resolved once for that one monitor (what exporting the stage needs)."""

    monitor: str  # canonical monitor name
    detectors: tuple[str, ...]
    run_root: Path
    label: str  # the monitor (this run) or "<run name>:<monitor>"
    context: "EvalContext"
    own: bool = True


@dataclass(frozen=True)
class CascadeSpec:
    """The recipe's ``cascade:`` section, resolved (docs/cascade.md)."""

    name: str
    stages: tuple[StageSpec, ...]
    max_escalation_rate: float | None
    max_cost_per_conversation: float | None
    fill_budget: bool = False
    fpr: float = 0.01
    search: str = "exact"
    grid_size: int = 64


@dataclass(frozen=True)
class EvalContext:
    """Everything fit / evaluate / export need, resolved once."""

    name: str  # the recipe's name (meta.json)
    model: ModelSpec
    data: DataSpec
    judge: JudgeSpec
    monitors: dict[str, tuple[str, ...]]  # canonical monitor name -> its detectors (first = anchor)
    needed: tuple[str, ...]  # every detector the monitors use, table order
    plan: Plan  # the passes that score them (eval.engine.planner)
    stats_root: Path  # <run>/stats: fitted statistics and cached ID-validation scores
    score: ScoreSettings  # how the passes read the model
    layers: tuple[int, ...]  # the hidden-state layers the feature detectors read
    detector_settings: dict[str, Any] = field(default_factory=dict)  # of every fitted detector
    fusion: str = "lambda"
    fprs: tuple[float, ...] = (0.005, 0.01, 0.02)
    calibration_split: str = "test"
    steps: dict[str, int | None] = field(default_factory=dict)  # guard / lm training steps (meta.json)
    recipe_doc: Mapping[str, Any] = field(default_factory=dict, repr=False)  # the resolved recipe, copied into bundles
    cascade: CascadeSpec | None = None  # the recipe's cascade (its stages' monitors of this run are in monitors)


def parse_recipe_monitors(recipe) -> dict[str, tuple[str, ...]]:
    """THE parse of a recipe's ``eval.monitors``: ``{canonical name: detectors}``; an unknown
    detector is a one-line RecipeError naming the file that set the key and ``eval.monitors[i]``."""
    from train.recipe_files import display_path

    fallback = display_path(recipe.source_file) if recipe.source_file else "recipe"
    out: dict[str, tuple[str, ...]] = {}
    for i, mon in enumerate(recipe.eval.monitors):
        try:
            parts = parse_monitor(mon)
        except RecipeError:
            raise RecipeError(f"{where(f'eval.monitors[{i}]', recipe.origins, fallback)}: key 'eval.monitors[{i}]': "
                              f"unknown monitor {mon!r}; combine {list(NAMES)} with '+'") from None
        out["+".join(parts)] = parts
    for i, stage in enumerate(recipe.cascade.stages):  # the cascade's monitors are checked with them
        stage_monitor(recipe.origins, fallback, i, stage.monitor)
    return out


def stage_monitor(origins: Mapping[str, str], fallback: str, i: int, name: str) -> tuple[str, ...]:
    """The detectors of ``cascade.stages[i].monitor`` (one-line RecipeError naming the file)."""
    key = f"cascade.stages[{i}].monitor"
    try:
        return parse_monitor(name)
    except RecipeError:
        raise RecipeError(f"{where(key, origins, fallback)}: key '{key}': unknown monitor {name!r}; combine "
                          f"{list(NAMES)} with '+'") from None


def resolve_cascade(recipe, device: str | None = None, predict_safe: bool = False) -> CascadeSpec | None:
    """The recipe's cascade with every stage resolved once: a stage of another run gets its own
    context (from ``recipe:``, or from the run folder's own resolved ``recipe.yaml`` when only
    ``run:`` is given). Relative paths are read from the folder of the file that set the stages
    (the working folder for a command-line override)."""
    from train.recipe import load_recipe
    from train.recipe_files import display_path

    cas = recipe.cascade
    if not cas.stages:
        return None
    fallback = display_path(recipe.source_file) if recipe.source_file else "recipe"
    try:  # its eval folder is <run>/eval/<name>/: never a monitor's
        parse_monitor(cas.name)
    except RecipeError:
        pass
    else:
        raise RecipeError(f"{where('cascade.name', recipe.origins, fallback)}: key 'cascade.name': {cas.name!r} is a "
                          "monitor's name (its eval folder); name the cascade otherwise")
    origin = where("cascade.stages", recipe.origins, fallback)
    here = Path.cwd() if origin.endswith("(override)") or not Path(origin).is_file() else Path(origin).resolve().parent
    stages = []
    for i, st in enumerate(cas.stages):
        parts = stage_monitor(recipe.origins, fallback, i, st.monitor)
        name = "+".join(parts)
        if st.recipe is None and st.run is None:
            ctx = resolve(recipe, [name], predict_safe=predict_safe, device=device, cascade=False)
            stages.append(StageSpec(name, parts, ctx.model.run_root, name, ctx))
            continue
        run = None if st.run is None else (here / st.run if not Path(st.run).is_absolute() else Path(st.run))
        path = (here / st.recipe if not Path(st.recipe).is_absolute() else Path(st.recipe)) if st.recipe else \
            run / "recipe.yaml"
        if not path.is_file():
            key = f"cascade.stages[{i}].{'recipe' if st.recipe else 'run'}"
            what = f"recipe file {path} not found" if st.recipe else \
                f"{path} not found (the run folder of a trained recipe holds its resolved recipe.yaml)"
            raise RecipeError(f"{where(key, recipe.origins, fallback)}: key '{key}': {what}")
        other = load_recipe(path, [f"output_dir={run}"] if run is not None else [],
                            trust_remote_code=recipe.trust_remote_code)
        ctx = resolve(other, [name], predict_safe=predict_safe, device=device, cascade=False)
        stages.append(StageSpec(name, parts, ctx.model.run_root, f"{ctx.name}:{name}", ctx, own=False))
    return CascadeSpec(cas.name, tuple(stages), cas.max_escalation_rate, cas.max_cost_per_conversation,
                       cas.fill_budget, cas.fpr, cas.search, cas.grid_size)


def resolve(recipe, monitors: Sequence[str] | str | None = None, source: str | None = None, *,
            predict_safe: bool = False, device: str | None = None, cascade: bool = True) -> EvalContext:
    """The :class:`EvalContext` of ``recipe``: ``monitors`` (default: its ``eval.monitors`` and
    the monitors of this run its cascade uses), ``source`` (default: its ``data.source``),
    ``--predict-safe`` and ``--device``; ``cascade`` False leaves the recipe's cascade out."""
    ev, d, j = recipe.eval, recipe.data, recipe.judge
    cas = resolve_cascade(recipe, device, predict_safe) if cascade else None
    if monitors is None:
        parsed = parse_recipe_monitors(recipe)
        for st in cas.stages if cas is not None else ():
            if st.own:
                parsed.setdefault(st.monitor, st.detectors)
    else:
        parsed = {name: parse_monitor(name) for name in parse_monitors(monitors)}
    model = ModelSpec(base=recipe.model, run_root=Path(recipe.output_dir), tokenizer=recipe.tokenizer,
                      dtype=recipe.dtype, device_map=ev.device_map, trust_remote_code=recipe.trust_remote_code,
                      device=device, guard_seeds=tuple(recipe.guard.seeds))
    data = DataSpec(source=source or d.source, recipe_source=d.source, template=d.template, registry=d.registry,
                    validation_fraction=d.validation_fraction, validation_groups=d.validation_groups,
                    max_train_rows=d.max_train_rows,
                    max_test_unsafe_per_domain=d.max_test_unsafe_per_domain,
                    max_test_safe_per_domain=d.max_test_safe_per_domain)
    judge = JudgeSpec(model=j.model, adapter=j.adapter, alignment_rubric=j.alignment_rubric,
                      uncertainty_rubric=j.uncertainty_rubric, n_shots=j.n_shots, shot_seed=j.shot_seed,
                      shot_max_chars=j.shot_max_chars, max_length=j.max_length)
    steps = {"guard": recipe.guard.max_steps if recipe.guard.max_steps and recipe.guard.max_steps > 0 else None,
             "lm": recipe.lm.max_steps if recipe.lm.max_steps and recipe.lm.max_steps > 0 else None}
    used = tuple(needed(parsed))
    # the typed settings of each fitted detector the monitors use, from the recipe's eval section
    m, k = ev.mahalanobis, ev.knn
    known = {MahalanobisSettings: MahalanobisSettings(m.estimator, m.variant, m.ridge),
             KNNSettings: KNNSettings(k.k, k.max_ref)}
    return EvalContext(
        name=recipe.name, model=model, data=data, judge=judge, monitors=parsed, needed=used, plan=plan(used),
        stats_root=model.run_root / "stats",
        score=ScoreSettings(ev.max_length, ev.batch_size, ev.mahalanobis.pooling, ev.perplexity.assistant_only,
                            predict_safe),
        layers=tuple(int(x) for x in ev.mahalanobis.layers),
        detector_settings={n: known[DETECTORS[n].Settings] for n in fitted(used)},
        fusion=ev.fusion, fprs=tuple(ev.fprs), calibration_split=ev.calibration_split, steps=steps,
        recipe_doc=recipe.to_dict(), cascade=cas)


__all__ = ["CascadeSpec", "DataSpec", "EvalContext", "JudgeSpec", "ModelSpec", "StageSpec", "parse_recipe_monitors",
           "resolve", "resolve_cascade"]
