"""Guard ensembles: N guards of one recipe that differ only in seed (LoRA/head init and data
order), scored on ONE loaded base (every member is a named adapter of
:class:`eval.forward.SharedBackbone`).

Member score = the member's guard log-odds of unsafe (``z1 - z0``; higher = more unsafe).
Three parameter-free detectors over the ``[n_rows, n_members]`` matrix of member scores:

* ``ensemble-mean``         -- mean of the member log-odds (log of the geometric mean of the
  members' odds; no saturation, unlike a mean of probabilities near 0/1);
* ``ensemble-min``          -- min of the member log-odds: at any threshold ``t`` the monitor
  flags a row iff EVERY member's log-odds exceeds ``t`` (mood-bench's ``min`` semantics). The
  members share a recipe, so their log-odds share a scale; for heterogeneous members use the
  fusion ``min`` (z-scores) over separate detectors instead;
* ``ensemble-disagreement`` -- population standard deviation (ddof 0) of the member
  probabilities ``sigmoid(log-odds)``: an OOD score (members agree on what they were trained
  on and diverge elsewhere). In [0, 0.5].

Each is a detector name in ``--monitors`` and in any fusion (``guard+ensemble-disagreement``).
Statistics in float64.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data.errors import BundleError
from train.detector_table import names

ENSEMBLE_DETECTORS = names(forward="ensemble")  # from the detector table (train/detector_table.py)
MEMBER_PREFIX = "guard-seed"


def _matrix(member_scores) -> np.ndarray:
    x = np.asarray(member_scores, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"member scores: expected [n_rows, n_members], got shape {x.shape}")
    return x


def sigmoid(x) -> np.ndarray:
    """Numerically stable logistic function in float64."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    e = np.exp(x[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def ensemble_mean(member_scores) -> np.ndarray:
    return _matrix(member_scores).mean(axis=1)


def ensemble_min(member_scores) -> np.ndarray:
    return _matrix(member_scores).min(axis=1)


def ensemble_disagreement(member_scores) -> np.ndarray:
    return sigmoid(_matrix(member_scores)).std(axis=1, ddof=0)


def ensemble_scores(member_scores, wanted: Sequence[str] = ENSEMBLE_DETECTORS) -> dict[str, np.ndarray]:
    """``{detector: scores}`` for every wanted ensemble detector."""
    from ..scoring import resolve_scorer  # each detector's function, as the table names it

    return {name: resolve_scorer(name)(member_scores) for name in wanted}


def member_dirs(run_root: str | Path, seeds: Sequence[int]) -> list[Path]:
    """The ensemble members of a run: ``<run>/guard-seed<S>`` for every seed of ``guard.seeds``
    (training writes them when the list has several seeds). Fewer than 2 found is an error."""
    root = Path(run_root)
    dirs = [root / f"{MEMBER_PREFIX}{s}" for s in seeds]
    missing = [d for d in dirs if not (d / "adapter_config.json").is_file()]
    if len(seeds) < 2 or missing:
        what = f"missing {', '.join(str(d) for d in missing)}" if missing else f"guard.seeds has {len(seeds)} seed"
        raise BundleError(f"{root}: an ensemble needs >= 2 guard members <run>/{MEMBER_PREFIX}<S> ({what}; "
                          f"train them with guard.seeds=[0,1,2])")
    return dirs


def member_names(dirs: Sequence[Path], guard_dir: str | Path) -> list[str]:
    """Adapter name of each member folder: ``guard`` for the anchor (the run's guard adapter),
    the folder name (``guard-seed<S>``) for every other member."""
    anchor = Path(guard_dir).resolve()
    return ["guard" if Path(d).resolve() == anchor else Path(d).name for d in dirs]


def member_adapters(loaded, recipe) -> list[str]:
    """Adapter names of the ensemble members on ``loaded.backbone``: the anchor guard is
    ``guard``; every other member is added ONCE as ``guard-seed<S>`` on the same base."""
    dirs = member_dirs(recipe.output_dir, recipe.guard.seeds)
    names = member_names(dirs, loaded.guard_dir)
    for d, name in zip(dirs, names):
        if name != "guard" and name not in loaded.backbone.heads:
            loaded.backbone.add_adapter(name, d, head=True)
    return names


def adapter_scores(loaded, names: Sequence[str], conversations: Sequence[str], *, max_length: int,
                   batch_size: int, predict_safe: bool = False, desc: str = "") -> np.ndarray:
    """``[n_rows, n_members]`` guard log-odds of the named member adapters already on
    ``loaded.backbone``: one logits-only guard forward per member."""
    from ..forward import encode, guard_pass
    from ..scoring import guard_scores

    enc = encode(loaded.tokenizer, conversations, max_length)
    cols = [guard_scores(guard_pass(loaded.backbone, enc, batch_size=batch_size, adapter=name,
                                    desc=f"ensemble {name}{desc}"), predict_safe)
            for name in names]
    return np.stack(cols, axis=1)


def member_scores(loaded, recipe, conversations: Sequence[str], predict_safe: bool = False,
                  desc: str = "") -> np.ndarray:
    """``[n_rows, n_members]`` guard log-odds of the recipe's members (added to the base as needed)."""
    return adapter_scores(loaded, member_adapters(loaded, recipe), conversations, max_length=recipe.eval.max_length,
                          batch_size=recipe.eval.batch_size, predict_safe=predict_safe, desc=desc)


def calibration(recipe, loaded, val_rows, predict_safe: bool = False) -> dict[str, np.ndarray]:
    """Every ensemble detector's scores on the ID validation slice (cached per member set)."""
    from ..forward import adapter_hash
    from ...run.cache import cached_scores, fingerprint

    dirs = member_dirs(recipe.output_dir, recipe.guard.seeds)
    parts = {"members": [adapter_hash(d) for d in dirs], "predict_safe": predict_safe,
             "max_length": recipe.eval.max_length, "data": fingerprint(val_rows["id"], val_rows["conversation"])}
    return cached_scores(recipe, "ensemble", parts, lambda: ensemble_scores(
        member_scores(loaded, recipe, list(val_rows["conversation"]), predict_safe, " (ID validation)")))


def score_for_eval(recipe, loaded, wanted: Sequence[str], conversations: Sequence[str] | None, val_rows,
                   predict_safe: bool = False) -> dict:
    """Cached ID-validation scores of the wanted ensemble detectors, the member folders, and
    (unless ``conversations`` is None) their test scores (see
    :func:`eval.monitor.extra_detector_scores`)."""
    import time

    calib = calibration(recipe, loaded, val_rows, predict_safe)
    out = {"group": "ensemble", "calibration": {k: calib[k] for k in wanted},
           "members": member_dirs(recipe.output_dir, recipe.guard.seeds)}
    if conversations is not None:
        t0 = time.perf_counter()
        out["test"] = ensemble_scores(member_scores(loaded, recipe, conversations, predict_safe, " (test)"), wanted)
        out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["ENSEMBLE_DETECTORS", "MEMBER_PREFIX", "adapter_scores", "calibration",
           "ensemble_disagreement", "ensemble_mean", "ensemble_min", "ensemble_scores", "member_adapters",
           "member_dirs", "member_names", "member_scores", "score_for_eval", "sigmoid"]
