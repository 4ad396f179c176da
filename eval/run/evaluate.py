"""Evaluate monitors on the test split (one pass each) and fit their fusion.

The jobs around it have their own modules: :mod:`eval.backbone` (adapters, loading),
:mod:`eval.cache` (keys, cached scores), :mod:`eval.scoring` (the one guard / LM pass),
:mod:`eval.fitting` (detector statistics, ID-validation scores); the detectors themselves are
the table in :mod:`train.detector_table`.

Monitor names: detectors joined by ``+``, the first is the anchor (``guard+maha+ppl``).
Detectors: ``guard`` (guard log-odds of unsafe), ``maha`` (Mahalanobis on pooled guard
features), ``knn`` (k-th neighbour distance), ``energy`` / ``maxlogit`` (from the guard
logits), ``ppl`` (perplexity under the causal-LM adapter). Every score: higher = more unsafe.

Data use (nothing is ever fitted on test rows):

* the train split is cut into the same seeded ``train`` / ``validation`` slices as guard
  training (``train.data.train_validation_cut``, ``data.validation_fraction``, seed 0);
* Mahalanobis / kNN fit on the SAFE rows of the ``train`` slice (streaming float64, one
  guard forward); the fitted statistics are cached under ``<run>/stats/<key>/``;
* fusion parameters fit on the ID ``validation`` slice (its detector scores are cached too).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mood_data.errors import BundleError
from mood_data.readers import read_json
from train.data import train_validation_cut
from train.detector_table import DETECTORS, names, one_pass_names, parse_monitor, parse_monitors
from train.detector_table import needed as needed_detectors

# the jobs this module used to do live in their own modules now; their names stay importable here
from .backbone import Loaded, adapter_dirs, load_backbone, run_root  # noqa: F401
from .cache import cache_key, cached_scores, fingerprint, read_calibration  # noqa: F401
from .fitting import (FEATURE_DETECTORS, calibration_scores, extra_detector_scores, fit_detectors,  # noqa: F401
                      fit_feature_detectors, load_stats)
from ..engine.parallel import is_main, world
from ..engine.scoring import FeatureScorer, ScoreSettings, guard_scores, logit_detectors, require_finite, score_rows  # noqa: F401


def split_detectors(detectors: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """``(one-pass detectors, ensemble detectors, judge detectors)`` among ``detectors``, order kept."""
    detectors = list(detectors)
    return tuple([n for n in detectors if DETECTORS[n].forward in fw] for fw in (("guard", "lm"), ("ensemble",), ("judge",)))


def fit_fusion(method: str, calib: dict[str, np.ndarray], malign: np.ndarray, domains: Sequence[str],
               detectors: Sequence[str], registry=None):
    """Fit the fusion of ``detectors`` (first = anchor) on the ID rows of the calibration slice;
    :class:`eval.fusion.Fusion` drops any non-ID row before fitting."""
    from mood_data.domains import DEFAULT_REGISTRY

    from ..engine.fusion import Fusion

    scores = {k: np.asarray(calib[k], dtype=np.float64) for k in detectors}
    return Fusion.fit(method, scores, malign, list(domains), registry=registry or DEFAULT_REGISTRY,
                      anchor=detectors[0])


# ----------------------------------------------------------------------------- evaluate
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


def run_settings(recipe, loaded: Loaded, n_validation: int | None = None) -> dict:
    """What a reader needs to weigh the figures: steps, context, data sizes (meta.json: settings)."""
    trained = {}
    metrics = loaded.guard_dir / "metrics.json"
    if metrics.is_file():
        trained = read_json(metrics)
    return {"guard_steps": recipe.guard.max_steps if recipe.guard.max_steps and recipe.guard.max_steps > 0 else None,
            "lm_steps": (recipe.lm.max_steps if loaded.lm_dir is not None and recipe.lm.max_steps
                         and recipe.lm.max_steps > 0 else None),
            "max_length": recipe.eval.max_length, "source": str(recipe.data.source or "embedded"),
            "n_train": trained.get("n_train"), "n_validation": n_validation,
            "max_test_unsafe_per_domain": recipe.data.max_test_unsafe_per_domain,
            "max_test_safe_per_domain": recipe.data.max_test_safe_per_domain}


def eval_splits(recipe, source=None, cut=None) -> tuple[dict, tuple]:
    """``({"test": ..., ["train": ...]}, (train, validation))`` with the test split read ONCE:
    where :func:`train.data.train_validation_cut` would read it too (a source with a local test
    split, for its leakage check), the train split comes from the same ``load_splits`` call.
    ``cut``: an already computed cut (then only the test split is read)."""
    from mood_data.load import load_splits
    from mood_data.sources import has_local_test_split

    src = source or recipe.data.source
    both = cut is None and has_local_test_split(src)
    splits = load_splits(src, splits=("train", "test") if both else ("test",),
                         registry=recipe.data.registry, template=recipe.data.template)
    cut = cut or train_validation_cut(recipe, source, train_split=splits.get("train"))
    return splits, cut


def evaluate_recipe(recipe, monitors: Sequence[str] | None = None, source=None, *, predict_safe: bool = False,
                    loaded: Loaded | None = None, n_boot: int = 1000, plots: bool = True, cut=None,
                    device: str | None = None, splits: dict | None = None) -> dict[str, Path]:
    """Score the test split ONCE (one guard + one LM forward) and write ``<run>/eval/<monitor>/``
    for every monitor. Fits / reuses detector statistics first (see :func:`fit_detectors`).
    ``splits`` + ``cut``: what :func:`eval_splits` returned, for a caller that needs the cut too."""
    from mood_data.domains import load_registry
    from mood_data.load import cap_groups
    from mood_data.sources import check_source
    from train.modeling import count_parameters, save_versions

    from ..report.caveats import print_warnings
    from ..report.runfolder import write_run

    monitors = parse_monitors(monitors or recipe.eval.monitors)
    needed = needed_detectors(monitors)
    check_source(source or recipe.data.source)  # a missing data file first, not a missing adapter
    loaded = loaded or load_backbone(recipe, device=device)
    lm_needed = [d for d in needed if DETECTORS[d].forward == "lm"]
    if lm_needed and loaded.lm_dir is None:
        raise BundleError(f"{run_root(recipe) / 'lm'}: causal-LM adapter not found (needed for {lm_needed[0]!r} monitors)")
    if splits is None or cut is None:
        splits, cut = eval_splits(recipe, source, cut)
    fitted = fit_detectors(recipe, source=source, loaded=loaded, predict_safe=predict_safe, cut=cut, monitors=monitors)
    registry = load_registry(recipe.data.registry)
    test = splits["test"]
    test = cap_groups(test, recipe.data.max_test_unsafe_per_domain, recipe.data.max_test_safe_per_domain)
    # plain lists once: iterating a datasets column decodes row by row, on every access
    test = {c: list(test[c]) for c in ("id", "conversation", "domain", "malign")}
    dets = {k: {layer: load_stats(p, k) for layer, p in v.items()} for k, v in fitted["stats"].items()}
    truncated: list[int] = []
    detector_seconds: dict[str, float] = {}  # wall time of each pass over the test rows
    scores, n_trunc = score_rows(loaded, test["conversation"], dets, [d for d in needed if d in one_pass_names()],
                                 ScoreSettings.from_recipe(recipe, predict_safe), desc=" (test)", truncated=truncated,
                                 seconds=detector_seconds)
    calib, cal_malign, cal_domains = read_calibration(fitted["calibration"])
    # the timing key of each detector's pass: "guard" for the guard pass, the detector's own name
    # for an LM pass (score_rows times each), the group for ensemble / judge
    pass_of = {d: (d if DETECTORS[d].forward == "lm" else "guard") for d in one_pass_names()}
    for extra in extra_detector_scores(recipe, loaded, needed, test["conversation"], source, predict_safe, cut=cut):
        scores.update(extra["test"])
        calib.update(extra["calibration"])
        detector_seconds[extra["group"]] = extra["seconds"]
        pass_of.update({d: extra["group"] for d in extra["test"]})
    require_finite(scores, test["id"], f"{source or recipe.data.source} (test split)")  # NaN fails closed
    params = count_parameters(loaded.backbone.model)
    n_rows = len(test["id"])
    hardware = run_hardware(loaded.backbone.model, loaded.backbone.device)
    settings = run_settings(recipe, loaded, n_validation=len(cal_malign))
    cal_is_id_safe = np.array([registry.is_id(d) for d in cal_domains], dtype=bool) & (cal_malign == 0)
    out: dict[str, Path] = {}
    for name in monitors:
        parts = parse_monitor(name)
        fz = fit_fusion(recipe.eval.fusion, calib, cal_malign, cal_domains, parts, registry)
        fused = np.asarray(fz.apply({k: scores[k] for k in parts}), dtype=np.float64)
        negatives = None
        if recipe.eval.calibration_split == "validation":  # thresholds from the held-out ID slice
            negatives = np.asarray(fz.apply({k: calib[k] for k in parts}), dtype=np.float64)[cal_is_id_safe]
        # what this monitor alone costs: the passes its detectors need (guard pass = logits +
        # pooled features + every feature detector; ppl = the LM adapter's forward)
        seconds = sum(detector_seconds.get(p, 0.0) for p in {pass_of[d] for d in parts})
        meta = {"monitor": name, "recipe": recipe.name, "model": recipe.model, "params": params,
                "n_rows": n_rows, "seconds": seconds, "seconds_per_conversation": seconds / max(n_rows, 1),
                "truncated_rows": n_trunc, "versions": save_versions(), "predict_safe": predict_safe,
                "fusion": recipe.eval.fusion, "detector_seconds": detector_seconds,
                "num_processes": world()[1], **hardware,
                "settings": settings, "calibration_split": recipe.eval.calibration_split,
                "fusion_fit": {k: fz.params.get(k) for k in ("method", "detectors", "n_fit", "n_fit_safe", "n_fit_unsafe",
                                                              "lam") if k in fz.params}}
        folder = run_root(recipe) / "eval" / name
        write_run(folder, monitor=name, ids=test["id"], conversations=test["conversation"],
                  domains=test["domain"], malign=np.asarray(test["malign"]), score=fused,
                  detector_scores=scores, registry=registry,
                  fprs=tuple(recipe.eval.fprs), meta=meta, n_boot=n_boot, plots=plots, truncated=truncated,
                  negatives=negatives)
        if is_main():  # the rank that wrote the folder tells the caveats, once
            print_warnings(read_json(folder / "analysis.json").get("warnings") or [], name)
        out[name] = folder
    return out


__all__ = [
    "FEATURE_DETECTORS", "Loaded", "ScoreSettings", "adapter_dirs", "cache_key", "calibration_scores", "evaluate_recipe",
    "fingerprint", "fit_detectors", "fit_feature_detectors", "fit_fusion", "guard_scores", "load_backbone", "load_stats",
    "parse_monitor", "parse_monitors", "read_calibration", "score_rows", "split_detectors",
]
