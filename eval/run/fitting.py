"""Fitting: the fitted detectors' statistics on the SAFE rows of the train slice (cached per key
under ``<run>/stats/<key>/``) and every shared-pass detector's scores on the ID validation slice
for fusion (cached too). Nothing here ever sees a test row.

:func:`fit_statistics` works on a resolved :class:`~eval.run.context.EvalContext`;
:func:`fit_detectors` is the public entry that resolves a recipe first (``moodguard fit``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError

from ..engine.forward import GuardBatch, encode, guard_pass
from ..engine.planner import plan, require_finite, score_shared
from ..engine.table import DETECTORS, NAMES, fitted
from .backbone import Loaded
from .cache import cache_digests, cache_intact, cache_key, fingerprint
from .context import EvalContext


def load_stats(directory: Path, kind: str, name: str | None = None):
    """A fitted ``kind`` detector saved as ``<directory>/<name or kind>.*``."""
    return DETECTORS[kind].load(directory, name or kind)


def fit_feature_detectors(ctx: EvalContext, loaded: Loaded, rows, kinds: Sequence[str]) -> dict[str, dict[int, Path]]:
    """Fit (or take from the cache) every ``kind`` x layer; ONE guard forward for all misses.
    Each kind's class streams its fit (``fitter(settings)``: ``update(features, malign)`` per
    batch, ``finalize(metadata)``)."""
    fp = fingerprint(rows["id"], rows["conversation"])
    dirs: dict[str, dict[int, Path]] = {k: {} for k in kinds}
    todo: list[tuple[str, int, Path, dict]] = []
    for kind in kinds:
        for layer in ctx.layers:
            d, parts = stats_entry(ctx, loaded, fp, kind, layer)
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
    fitters = {(k, layer): DETECTORS[k].fitter(ctx.detector_settings[k]) for k, layer, _, _ in todo}

    def update(batch: GuardBatch) -> None:
        y = malign[batch.index]
        for (_, layer), f in fitters.items():
            f.update(batch.features[layer], y)

    enc = encode(loaded.tokenizer, list(rows["conversation"]), ctx.score.max_length)
    guard_pass(loaded.backbone, enc, batch_size=ctx.score.batch_size, layers=sorted({t[1] for t in todo}),
               pooling=ctx.score.pooling, on_batch=update, desc="fit: guard forward")
    for kind, layer, d, parts in todo:
        save_stats(d, fitters[(kind, layer)].finalize(metadata=parts), kind, parts, len(enc.input_ids), enc.n_truncated)
    return dirs


def stats_entry(ctx: EvalContext, loaded: Loaded, data_fp: str, kind: str, layer: int) -> tuple[Path, dict]:
    """``(<run>/stats/<key>, parts)`` of a fitted detector: the statistics cache key is what every
    fitted detector shares (base, guard adapter, layer, pooling, context, the fit slice's
    fingerprint) + the detector's settings."""
    parts = {"kind": kind, "model": ctx.model.base, "adapter": loaded.guard_hash, "layer": int(layer),
             "pooling": ctx.score.pooling, "max_length": ctx.score.max_length, "data": data_fp,
             **DETECTORS[kind].cache_parts(ctx.detector_settings[kind])}
    return ctx.stats_root / cache_key(**parts), parts


def save_stats(d: Path, det, kind: str, parts: dict, n_rows: int, n_truncated: int) -> None:
    """One cache entry: the detector's files and ``meta.json`` (its key's parts, sha256 of each file)."""
    with atomic.atomic_dir(d) as tmp:
        det.save(tmp, kind)
        atomic.write_json(tmp / "meta.json", {"kind": kind, "key": d.name, "parts": parts, "n_rows": n_rows,
                                              "truncated_rows": n_truncated, "sha256": cache_digests(tmp)})


def update_feature_detectors(ctx: EvalContext, loaded: Loaded, fitted: dict, train_rows, new_rows) -> dict[str, int]:
    """The fitted detectors of ``fitted`` (``{kind: {layer: detector}}``, fitted on ``train_rows``
    minus ``new_rows`` with this guard adapter) updated with ``new_rows`` from their sufficient
    statistics (``detector.updated``): ONE guard forward over the new rows only, none over the
    old ones. Each result is written where :func:`fit_feature_detectors` would put a full fit on
    ``train_rows`` (same key), so fitting finds it. Returns ``{kind: layers updated}``."""
    fp = fingerprint(train_rows["id"], train_rows["conversation"])
    malign = np.asarray(new_rows["malign"], dtype=np.int64)
    feats: dict[int, list] = {int(layer): [] for per in fitted.values() for layer in per}
    enc = encode(loaded.tokenizer, list(new_rows["conversation"]), ctx.score.max_length)
    order: list = []

    def keep(batch: GuardBatch) -> None:
        order.append(np.asarray(batch.index))
        for layer in feats:
            feats[layer].append(np.asarray(batch.features[layer], dtype=np.float64))

    if len(new_rows):
        guard_pass(loaded.backbone, enc, batch_size=ctx.score.batch_size, layers=sorted(feats), pooling=ctx.score.pooling,
                   on_batch=keep, desc="refresh: guard forward (new rows)")
    index = np.concatenate(order) if order else np.zeros(0, np.int64)
    done: dict[str, int] = {}
    for kind, per in fitted.items():
        for layer, det in per.items():
            x = np.concatenate(feats[int(layer)]) if feats[int(layer)] else np.zeros((0, det.meta["d"]))
            d, parts = stats_entry(ctx, loaded, fp, kind, layer)
            updated = det.updated(x, malign[index], metadata=parts)
            save_stats(d, updated, kind, parts, len(train_rows), enc.n_truncated)
            done[kind] = done.get(kind, 0) + 1
    return done


def fit_statistics(ctx: EvalContext, loaded: Loaded, cut) -> dict:
    """Fit the fitted detectors the monitors use on the safe train rows (cached) and score the ID
    validation slice with every shared-pass detector that can score (cached) for fusion; a fitted
    detector no monitor uses is not fitted. ``cut``: the ``(train, validation)`` slices.
    Returns ``{"stats": {kind: {layer: dir}}, "calibration": path}``."""
    train_rows, val_rows = cut
    stat_dirs = fit_feature_detectors(ctx, loaded, train_rows, fitted(ctx.needed))
    return {"stats": stat_dirs, "calibration": calibration_scores(ctx, loaded, val_rows, stat_dirs)}


def calibration_scores(ctx: EvalContext, loaded: Loaded, rows, stat_dirs) -> Path:
    """Every shared-pass detector's scores on the ID validation slice (fitted ones: those in
    ``stat_dirs``), cached by key."""
    from safetensors.numpy import save_file

    parts = {"kind": "calibration", "stats": {k: {str(layer): d.name for layer, d in v.items()} for k, v in stat_dirs.items()},
             "guard": loaded.guard_hash, "lm": loaded.lm_hash, "predict_safe": ctx.score.predict_safe,
             "assistant_only": ctx.score.assistant_only, "max_length": ctx.score.max_length,
             "data": fingerprint(rows["id"], rows["conversation"])}
    d = ctx.stats_root / f"calibration-{cache_key(**parts)}"
    if (d / "scores.safetensors").is_file() and cache_intact(d):
        return d
    dets = {k: {layer: load_stats(p, k) for layer, p in v.items()} for k, v in stat_dirs.items()}
    the_plan = plan([n for n in NAMES if not DETECTORS[n].requires_fit or n in stat_dirs])
    scores, _ = score_shared(the_plan, loaded.backbone, loaded.tokenizer, list(rows["conversation"]), dets, ctx.score,
                             desc=" (ID validation)")
    require_finite(scores, list(rows["id"]), f"{ctx.data.recipe_source} (ID validation slice of the train split)")
    scores["malign"] = np.asarray(rows["malign"], dtype=np.float64)
    with atomic.atomic_dir(d) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in scores.items()}, str(tmp / "scores.safetensors"))
        atomic.write_json(tmp / "meta.json", {"parts": parts, "domains": list(rows["domain"]), "ids": list(rows["id"]),
                                              "sha256": cache_digests(tmp)})
    return d


def extra_detector_scores(ctx: EvalContext, loaded: Loaded, conversations: Sequence[str] | None, cut) -> list[dict]:
    """The ensemble and judge detectors the monitors use: per group ``{"group", "calibration":
    {name: ID-validation scores}, "test": {name: scores}, "seconds"}`` (test scoring time; no
    ``test`` / ``seconds`` when ``conversations`` is None) plus what the group was scored with
    (ensemble: ``members``, the member folders; judge: ``judge``, ``rubrics``)."""
    the_plan = ctx.plan
    train_rows, val_rows = cut
    out = []
    if the_plan.members:
        from .ensemble import score_for_eval

        out.append(score_for_eval(ctx, loaded, conversations, val_rows))
    if the_plan.judge:
        from .judge import score_for_eval as judge_for_eval

        out.append(judge_for_eval(ctx, loaded, conversations, train_rows, val_rows))
    return out


def run_fit(ctx: EvalContext) -> dict:
    """``moodguard fit``: the backbone and the cut loaded once, then :func:`fit_statistics`."""
    from mood_data.sources import check_source

    from .backbone import load_run
    from .splits import data_cut

    check_source(ctx.data.source)  # a missing data file first, not a missing adapter
    return fit_statistics(ctx, load_run(ctx.model), data_cut(ctx.data))


def fit_detectors(recipe, *, source=None, predict_safe: bool = False, device: str | None = None,
                  monitors: Sequence[str] | None = None) -> dict:
    """Public entry (the API): :func:`run_fit` on the recipe resolved once (``monitors``
    default: its ``eval.monitors``)."""
    from .context import resolve

    return run_fit(resolve(recipe, monitors, source, predict_safe=predict_safe, device=device))


__all__ = ["calibration_scores", "extra_detector_scores", "fit_detectors", "fit_feature_detectors", "fit_statistics",
           "load_stats", "run_fit", "save_stats", "stats_entry", "update_feature_detectors"]
