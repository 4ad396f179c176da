"""Evaluate monitors on the test split (one pass each) and fit their fusion.

:func:`evaluate` works on a resolved :class:`~eval.run.context.EvalContext` with the backbone,
the splits and the cut loaded once by its caller; :func:`evaluate_recipe` is the public entry
that does that from a recipe (``moodguard evaluate``, the API).

Data use (nothing is ever fitted on test rows):

* the train split is cut into the same seeded ``train`` / ``validation`` slices as guard
  training (``train.data.validation_cut``, ``data.validation_fraction``, seed 0);
* Mahalanobis / kNN fit on the SAFE rows of the ``train`` slice (streaming float64, one
  guard forward); the fitted statistics are cached under ``<run>/stats/<key>/``
  (:mod:`eval.run.fitting`);
* fusion parameters fit on the ID ``validation`` slice (its detector scores are cached too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data.errors import BundleError
from mood_data.readers import read_json

from ..engine.parallel import is_main, world
from ..engine.planner import require_finite, score_shared
from .backbone import Loaded
from .cache import calibration_ids, read_calibration
from .context import EvalContext
from .fitting import extra_detector_scores, fit_statistics, load_stats
from .splits import eval_splits


def fit_fusion(method: str, calib: dict[str, np.ndarray], malign: np.ndarray, domains: Sequence[str],
               detectors: Sequence[str], registry=None):
    """Fit the fusion of ``detectors`` (first = anchor) on the ID rows of the calibration slice;
    :class:`eval.engine.fusion.Fusion` drops any non-ID row before fitting."""
    from mood_data.domains import DEFAULT_REGISTRY

    from ..engine.fusion import Fusion

    scores = {k: np.asarray(calib[k], dtype=np.float64) for k in detectors}
    return Fusion.fit(method, scores, malign, list(domains), registry=registry or DEFAULT_REGISTRY,
                      anchor=detectors[0])


def run_hardware(model, device=None) -> dict:
    """``{"device": "cpu" | "cuda:0 (<GPU name>)", "dtype": "float32"}`` of the scoring model
    (``device``: where the backbone was placed; default: its first parameter's device)."""
    import torch

    p = next(iter(model.parameters()), None)
    if p is None:
        return {"device": str(device)} if device is not None else {}
    dev = torch.device(device) if device is not None else p.device
    name = f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
    return {"device": name, "dtype": str(p.dtype).removeprefix("torch.")}


def run_settings(ctx: EvalContext, loaded: Loaded, n_validation: int | None = None) -> dict:
    """What a reader needs to weigh the figures: steps, context, data sizes (meta.json: settings)."""
    trained = {}
    metrics = loaded.guard_dir / "metrics.json"
    if metrics.is_file():
        trained = read_json(metrics)
    return {"guard_steps": ctx.steps.get("guard"),
            "lm_steps": ctx.steps.get("lm") if loaded.lm_dir is not None else None,
            "max_length": ctx.score.max_length, "source": str(ctx.data.recipe_source or "embedded"),
            "n_train": trained.get("n_train"), "n_validation": n_validation,
            "max_test_unsafe_per_domain": ctx.data.max_test_unsafe_per_domain,
            "max_test_safe_per_domain": ctx.data.max_test_safe_per_domain}


def evaluate(ctx: EvalContext, loaded: Loaded, splits: dict, cut, *, n_boot: int = 1000,
             plots: bool = True) -> dict[str, Path]:
    """Score the test split ONCE (one guard + one LM forward, plus the ensemble / judge passes the
    monitors need) and write ``<run>/eval/<monitor>/`` for every monitor of ``ctx``. Fits / reuses
    detector statistics first (:func:`eval.run.fitting.fit_statistics`)."""
    from mood_data.domains import load_registry
    from mood_data.load import cap_groups
    from train.modeling import count_parameters, save_versions

    from ..report.caveats import print_warnings
    from ..report.runfolder import write_run

    the_plan = ctx.plan
    fitted = fit_statistics(ctx, loaded, cut)
    registry = load_registry(ctx.data.registry)
    test = cap_groups(splits["test"], ctx.data.max_test_unsafe_per_domain, ctx.data.max_test_safe_per_domain)
    # plain lists once: iterating a datasets column decodes row by row, on every access
    test = {c: list(test[c]) for c in ("id", "conversation", "domain", "malign")}
    dets = {k: {layer: load_stats(p, k) for layer, p in v.items()} for k, v in fitted["stats"].items()}
    truncated: list[int] = []
    detector_seconds: dict[str, float] = {}  # wall time of each pass over the test rows
    scores, n_trunc = score_shared(the_plan, loaded.backbone, loaded.tokenizer, test["conversation"], dets, ctx.score,
                                   desc=" (test)", truncated=truncated, seconds=detector_seconds)
    calib, cal_malign, cal_domains = read_calibration(fitted["calibration"])
    cal_ids = calibration_ids(fitted["calibration"])
    for extra in extra_detector_scores(ctx, loaded, test["conversation"], cut):
        scores.update(extra["test"])
        calib.update(extra["calibration"])
        detector_seconds[extra["group"]] = extra["seconds"]
    require_finite(scores, test["id"], f"{ctx.data.source} (test split)")  # NaN fails closed
    params = count_parameters(loaded.backbone.model)
    n_rows = len(test["id"])
    hardware = run_hardware(loaded.backbone.model, loaded.backbone.device)
    settings = run_settings(ctx, loaded, n_validation=len(cal_malign))
    cal_is_id_safe = np.array([registry.is_id(d) for d in cal_domains], dtype=bool) & (cal_malign == 0)
    out: dict[str, Path] = {}
    for name, parts in ctx.monitors.items():
        fz = fit_fusion(ctx.fusion, calib, cal_malign, cal_domains, parts, registry)
        fused = np.asarray(fz.apply({k: scores[k] for k in parts}), dtype=np.float64)
        cal_fused = np.asarray(fz.apply({k: calib[k] for k in parts}), dtype=np.float64)
        negatives = None
        if ctx.calibration_split == "validation":  # thresholds from the held-out ID slice
            negatives = cal_fused[cal_is_id_safe]
        # what this monitor alone costs: the passes its detectors need (guard pass = logits +
        # pooled features + every feature detector; ppl = the LM adapter's forward)
        seconds = sum(detector_seconds.get(p, 0.0) for p in {the_plan.timing_key(d) for d in parts})
        meta = {"monitor": name, "recipe": ctx.name, "model": ctx.model.base, "params": params,
                "n_rows": n_rows, "seconds": seconds, "seconds_per_conversation": seconds / max(n_rows, 1),
                "truncated_rows": n_trunc, "versions": save_versions(), "predict_safe": ctx.score.predict_safe,
                "fusion": ctx.fusion, "detector_seconds": detector_seconds,
                "num_processes": world()[1], **hardware,
                "settings": settings, "calibration_split": ctx.calibration_split,
                "fusion_fit": {k: fz.params.get(k) for k in ("method", "detectors", "n_fit", "n_fit_safe", "n_fit_unsafe",
                                                              "lam") if k in fz.params}}
        folder = ctx.model.run_root / "eval" / name
        write_run(folder, monitor=name, ids=test["id"], conversations=test["conversation"],
                  domains=test["domain"], malign=np.asarray(test["malign"]), score=fused,
                  detector_scores=scores, registry=registry,
                  fprs=ctx.fprs, meta=meta, n_boot=n_boot, plots=plots, truncated=truncated,
                  negatives=negatives, validation={"ids": cal_ids, "domains": list(cal_domains),
                                                   "malign": [int(v) for v in cal_malign],
                                                   "score": [float(v) for v in cal_fused]})
        if is_main():  # the rank that wrote the folder tells the caveats, once
            print_warnings(read_json(folder / "analysis.json").get("warnings") or [], name)
        out[name] = folder
    return out


def run_evaluate(ctx: EvalContext, *, n_boot: int = 1000, plots: bool = True) -> dict[str, Path]:
    """``moodguard evaluate``: the backbone, the splits and the cut loaded once, then
    :func:`evaluate`. Returns ``{monitor: <run>/eval/<monitor>/}``."""
    from mood_data.sources import check_source

    from .backbone import load_run

    check_source(ctx.data.source)  # a missing data file first, not a missing adapter
    if ctx.cascade is not None:  # and a cascade stage of another run that was never evaluated
        from .cascade import check_other_runs

        check_other_runs(ctx.cascade)
    loaded = load_run(ctx.model)
    if ctx.plan.lm and loaded.lm_dir is None:  # an LM-pass detector needs the run's causal-LM adapter
        raise BundleError(f"{ctx.model.run_root / 'lm'}: causal-LM adapter not found (needed for {ctx.plan.lm[0]!r} "
                          "monitors)")
    splits, cut = eval_splits(ctx.data)
    out = evaluate(ctx, loaded, splits, cut, n_boot=n_boot, plots=plots)
    if ctx.cascade is not None:  # from the stages' run folders (this run's were just written)
        from .cascade import evaluate_cascade

        out[ctx.cascade.name] = evaluate_cascade(ctx, n_boot=n_boot, plots=plots)
    return out


def evaluate_recipe(recipe, monitors: Sequence[str] | None = None, source=None, *, predict_safe: bool = False,
                    n_boot: int = 1000, plots: bool = True, device: str | None = None) -> dict[str, Path]:
    """Public entry (the API): :func:`run_evaluate` on the recipe resolved once (``monitors``
    default: its ``eval.monitors``; ``source``: its ``data.source``)."""
    from .context import resolve

    return run_evaluate(resolve(recipe, monitors, source, predict_safe=predict_safe, device=device),
                        n_boot=n_boot, plots=plots)


__all__ = ["evaluate", "evaluate_recipe", "fit_fusion", "run_evaluate",
           "run_hardware", "run_settings"]
