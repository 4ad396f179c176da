"""Fitting: the feature detectors' statistics on the SAFE rows of the train slice (cached per
key under ``<run>/stats/<key>/``) and every detector's scores on the ID validation slice for
fusion (cached too). Nothing here ever sees a test row."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError
from train.data import train_validation_cut
from train.detector_table import DETECTORS, names, one_pass_names

from .backbone import Loaded, load_backbone, run_root
from .cache import cache_digests, cache_intact, cache_key, fingerprint
from ..engine.forward import GuardBatch, encode, guard_pass
from ..engine.scoring import ScoreSettings, require_finite, resolve_scorer, score_rows

FEATURE_DETECTORS = names(fitted=True)


def _recipe_value(section, dotted: str):
    for attr in dotted.split("."):
        section = getattr(section, attr)
    return section


def _stats_parts(recipe, loaded: Loaded, kind: str, layer: int, fp: str) -> dict:
    """The statistics cache key parts of a fitted detector: the common ones + its table
    ``cache_parts`` (keyed by their last dotted component)."""
    parts = {"kind": kind, "model": recipe.model, "adapter": loaded.guard_hash, "layer": int(layer),
             "pooling": recipe.eval.mahalanobis.pooling, "max_length": recipe.eval.max_length, "data": fp}
    parts.update({dotted.rsplit(".", 1)[-1]: _recipe_value(recipe.eval, dotted) for dotted in DETECTORS[kind].cache_parts})
    return parts


def load_stats(directory: Path, kind: str, name: str | None = None):
    """A fitted ``kind`` detector (a ``fitted`` table entry) saved as ``<directory>/<name or kind>.*``."""
    return resolve_scorer(kind).load(directory, name or kind)


def fit_feature_detectors(recipe, loaded: Loaded, rows, kinds: Sequence[str] = FEATURE_DETECTORS) -> dict[str, dict[int, Path]]:
    """Fit (or take from the cache) every ``kind`` x layer; ONE guard forward for all misses.
    Each kind's class (the table's ``scorer``) supplies ``stream_fitter(recipe.eval)``: an
    object with ``update(features, malign)`` per batch and ``finalize(metadata)``."""
    m = recipe.eval.mahalanobis
    layers = [int(x) for x in m.layers]
    fp = fingerprint(rows["id"], rows["conversation"])
    stats_root = run_root(recipe) / "stats"
    dirs: dict[str, dict[int, Path]] = {k: {} for k in kinds}
    todo: list[tuple[str, int, Path, dict]] = []
    for kind in kinds:
        for layer in layers:
            parts = _stats_parts(recipe, loaded, kind, layer, fp)
            d = stats_root / cache_key(**parts)
            dirs[kind][layer] = d
            if (d / "meta.json").is_file() and cache_intact(d):  # an edited entry is refitted, not trusted
                try:
                    load_stats(d, kind)
                    continue  # cache hit
                except BundleError:
                    pass  # unreadable cache entry: refit
            todo.append((kind, layer, d, parts))
    if not todo:
        return dirs
    malign = np.asarray(rows["malign"], dtype=np.int64)
    fitters = {(k, layer): resolve_scorer(k).stream_fitter(recipe.eval) for k, layer, _, _ in todo}

    def update(batch: GuardBatch) -> None:
        y = malign[batch.index]
        for (_, layer), f in fitters.items():
            f.update(batch.features[layer], y)

    enc = encode(loaded.tokenizer, list(rows["conversation"]), recipe.eval.max_length)
    guard_pass(loaded.backbone, enc, batch_size=recipe.eval.batch_size, layers=sorted({t[1] for t in todo}),
               pooling=m.pooling, on_batch=update, desc="fit: guard forward")
    for kind, layer, d, parts in todo:
        det = fitters[(kind, layer)].finalize(metadata=parts)
        with atomic.atomic_dir(d) as tmp:
            det.save(tmp, kind)
            atomic.write_json(tmp / "meta.json", {"kind": kind, "key": d.name, "parts": parts,
                                                  "n_rows": len(enc.input_ids), "truncated_rows": enc.n_truncated,
                                                  "sha256": cache_digests(tmp)})
    return dirs


def fit_detectors(recipe, *, source=None, loaded: Loaded | None = None, predict_safe: bool = False,
                  cut=None, device: str | None = None, monitors: Sequence[str] | None = None) -> dict:
    """Fit the fitted detectors (Mahalanobis, kNN) that the monitors use (default: the recipe's
    ``eval.monitors``) on the safe train rows (cached) and score the ID validation slice with
    every one-pass detector that can score (cached) for fusion; a fitted detector no monitor
    uses is not fitted. ``cut``: the ``(train, validation)`` slices when the caller already has
    them (loaded once per process). Returns ``{"stats": {kind: {layer: dir}}, "calibration": path}``;
    ``device``: ``--device``."""
    from train.detector_table import needed, parse_monitors

    from mood_data.sources import check_source

    used = set(needed(parse_monitors(monitors or recipe.eval.monitors)))
    check_source(source or recipe.data.source)  # a missing data file first, not a missing adapter
    loaded = loaded or load_backbone(recipe, device=device)
    train_rows, val_rows = cut or train_validation_cut(recipe, source)
    stat_dirs = fit_feature_detectors(recipe, loaded, train_rows, [k for k in FEATURE_DETECTORS if k in used])
    calib = calibration_scores(recipe, loaded, val_rows, stat_dirs, predict_safe=predict_safe)
    return {"stats": stat_dirs, "calibration": calib}


def calibration_scores(recipe, loaded: Loaded, rows, stat_dirs, *, predict_safe: bool = False) -> Path:
    """Every detector's scores on the ID validation slice (cached by key)."""
    from safetensors.numpy import save_file

    parts = {"kind": "calibration", "stats": {k: {str(layer): d.name for layer, d in v.items()} for k, v in stat_dirs.items()},
             "guard": loaded.guard_hash, "lm": loaded.lm_hash, "predict_safe": predict_safe,
             "assistant_only": recipe.eval.perplexity.assistant_only, "max_length": recipe.eval.max_length,
             "data": fingerprint(rows["id"], rows["conversation"])}
    d = run_root(recipe) / "stats" / f"calibration-{cache_key(**parts)}"
    if (d / "scores.safetensors").is_file() and cache_intact(d):
        return d
    dets = {k: {layer: load_stats(p, k) for layer, p in v.items()} for k, v in stat_dirs.items()}
    wanted = [d for d in one_pass_names() if d not in FEATURE_DETECTORS or d in stat_dirs]  # fitted ones only
    scores, _ = score_rows(loaded, list(rows["conversation"]), dets, wanted,
                           ScoreSettings.from_recipe(recipe, predict_safe), desc=" (ID validation)")
    require_finite(scores, list(rows["id"]), f"{recipe.data.source} (ID validation slice of the train split)")
    scores["malign"] = np.asarray(rows["malign"], dtype=np.float64)
    with atomic.atomic_dir(d) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in scores.items()}, str(tmp / "scores.safetensors"))
        atomic.write_json(tmp / "meta.json", {"parts": parts, "domains": list(rows["domain"]), "ids": list(rows["id"]),
                                              "sha256": cache_digests(tmp)})
    return d


def extra_detector_scores(recipe, loaded: Loaded, needed: Sequence[str], conversations: Sequence[str] | None,
                          source=None, predict_safe: bool = False, cut=None) -> list[dict]:
    """Ensemble and judge detectors among ``needed``: per group ``{"group", "calibration":
    {name: ID-validation scores}, "test": {name: scores}, "seconds"}`` (test scoring time; no
    ``test`` / ``seconds`` when ``conversations`` is None) plus what the group was scored with
    (ensemble: ``members``, the member folders; judge: ``judge``, ``rubrics``)."""
    out = []
    ens = [n for n in needed if DETECTORS[n].forward == "ensemble"]
    jud = [n for n in needed if DETECTORS[n].forward == "judge"]
    if ens or jud:
        train_rows, val_rows = cut or train_validation_cut(recipe, source)
    if ens:
        from ..engine.detectors.ensemble import score_for_eval

        out.append(score_for_eval(recipe, loaded, ens, conversations, val_rows, predict_safe))
    if jud:
        from .judge import score_for_eval as judge_for_eval

        out.append(judge_for_eval(recipe, loaded, jud, conversations, train_rows, val_rows))
    return out


__all__ = ["FEATURE_DETECTORS", "calibration_scores", "extra_detector_scores", "fit_detectors", "fit_feature_detectors",
           "load_stats"]
