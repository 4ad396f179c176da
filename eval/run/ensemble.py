"""A run's guard ensemble: its seed members ``<run>/guard-seed<S>`` as named adapters on the ONE
loaded base, and the ensemble detectors' cached ID-validation and test scores (the detectors:
:mod:`eval.engine.detectors.ensemble`; the passes: :func:`eval.engine.planner.score_members`)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data.errors import BundleError

from ..engine.forward import adapter_hash
from ..engine.planner import plan, score_members
from ..engine.table import NAMES
from .backbone import Loaded
from .cache import cached_scores, fingerprint
from .context import EvalContext

MEMBER_PREFIX = "guard-seed"


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


def member_adapters(loaded: Loaded, dirs: Sequence[Path]) -> list[str]:
    """Adapter names of the ensemble members on ``loaded.backbone``: the anchor guard is
    ``guard``; every other member is added ONCE as ``guard-seed<S>`` on the same base."""
    names = member_names(dirs, loaded.guard_dir)
    for d, name in zip(dirs, names):
        if name != "guard" and name not in loaded.backbone.heads:
            loaded.backbone.add_adapter(name, d, head=True)
    return names


def member_scores(ctx: EvalContext, loaded: Loaded, names: Sequence[str], conversations: Sequence[str],
                  desc: str = "") -> dict[str, np.ndarray]:
    """The ensemble detectors ``names`` on ``conversations`` (members added to the base as needed)."""
    members = member_adapters(loaded, member_dirs(ctx.model.run_root, ctx.model.guard_seeds))
    return score_members(plan(names), loaded.backbone, loaded.tokenizer, members, conversations, ctx.score, desc)


def calibration(ctx: EvalContext, loaded: Loaded, val_rows) -> dict[str, np.ndarray]:
    """Every ensemble detector's scores on the ID validation slice (cached per member set)."""
    dirs = member_dirs(ctx.model.run_root, ctx.model.guard_seeds)
    parts = {"members": [adapter_hash(d) for d in dirs], "predict_safe": ctx.score.predict_safe,
             "max_length": ctx.score.max_length, "data": fingerprint(val_rows["id"], val_rows["conversation"])}
    every = plan(NAMES).members  # all of them: one cache entry serves every ensemble monitor
    return cached_scores(ctx.stats_root, "ensemble", parts, lambda: member_scores(
        ctx, loaded, every, list(val_rows["conversation"]), " (ID validation)"))


def score_for_eval(ctx: EvalContext, loaded: Loaded, conversations: Sequence[str] | None, val_rows) -> dict:
    """Cached ID-validation scores of the ensemble detectors the monitors use, the member
    folders, and (unless ``conversations`` is None) their test scores (see
    :func:`eval.run.fitting.extra_detector_scores`)."""
    wanted = ctx.plan.members
    calib = calibration(ctx, loaded, val_rows)
    out = {"group": "ensemble", "calibration": {k: calib[k] for k in wanted},
           "members": member_dirs(ctx.model.run_root, ctx.model.guard_seeds)}
    if conversations is not None:
        t0 = time.perf_counter()
        out["test"] = member_scores(ctx, loaded, wanted, conversations, " (test)")
        out["seconds"] = time.perf_counter() - t0
    return out


__all__ = ["MEMBER_PREFIX", "calibration", "member_adapters", "member_dirs", "member_names", "member_scores",
           "score_for_eval"]
