"""Per-group diagnostic plots (matplotlib, no pyplot state: ``Figure`` + Agg canvas).

* histogram of the monitor score: ID-safe negatives vs the group's unsafe rows, with the
  thresholds at each FPR drawn as vertical lines;
* ROC curve (unsafe = positive) with the operating points at each FPR marked.
Files are written atomically via :mod:`mood_data.atomic`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mood_data import atomic

from ..engine.metrics import auroc, threshold_at_fpr, tpr_at_fpr


_LINTHRESH = 1e-3
_THRESHOLD_STYLES = ("--", "-.", ":")


def chance_points(n: int = 200) -> np.ndarray:
    """FPR values for the chance line TPR = FPR: linear below the symlog threshold, log-spaced
    above, so the drawn polyline follows the diagonal on the symlog axis."""
    return np.r_[np.linspace(0.0, _LINTHRESH, 20), np.logspace(np.log10(_LINTHRESH), 0.0, n)[1:]]


def _save(fig: Figure, path: Path) -> Path:
    # fixed margins instead of bbox_inches="tight", which renders every figure twice
    FigureCanvasAgg(fig)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path


def plot_hist(safe, unsafe, path: str | Path, *, title: str, fprs: Sequence[float] = ()) -> Path:
    safe, unsafe = np.asarray(safe, float), np.asarray(unsafe, float)
    fig = Figure(figsize=(4.4, 3.3))
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    ax = fig.add_subplot()
    both = np.r_[safe, unsafe]
    bins = np.histogram_bin_edges(both, bins=40) if both.size else 10
    # one filled step polygon per histogram (ax.hist draws one patch per bar: ~10x slower)
    for values, label in ((safe, f"ID safe (n={safe.size})"), (unsafe, f"{title} unsafe (n={unsafe.size})")):
        if values.size:
            density, edges = np.histogram(values, bins=bins, density=True)
            ax.stairs(density, edges, fill=True, alpha=0.55, label=label)
    # thresholds in the legend (one line style each), not as text at the line: neighbouring
    # FPRs give nearly equal thresholds and their labels would sit on top of each other
    for f, ls in zip(fprs, _THRESHOLD_STYLES * (len(fprs) // len(_THRESHOLD_STYLES) + 1)):
        thr = threshold_at_fpr(safe, f)
        if np.isfinite(thr):
            ax.axvline(thr, color="k", lw=0.9, ls=ls, label=f"threshold @ FPR {f:g}")
    ax.set_xlabel("score (higher = more unsafe)")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


def plot_roc(safe, unsafe, path: str | Path, *, title: str, fprs: Sequence[float] = ()) -> Path:
    from sklearn.metrics import roc_curve

    safe, unsafe = np.asarray(safe, float), np.asarray(unsafe, float)
    fig = Figure(figsize=(4.4, 3.3))  # same size as the histogram: they sit side by side in reports
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.15, top=0.9)
    ax = fig.add_subplot()
    if safe.size and unsafe.size:
        fpr_c, tpr_c, _ = roc_curve(np.r_[np.zeros(safe.size), np.ones(unsafe.size)], np.r_[safe, unsafe])
        ax.plot(fpr_c, tpr_c, lw=1.2, label=f"AUROC {auroc(safe, unsafe):.3f}")
        for f in fprs:
            t = tpr_at_fpr(safe, unsafe, f)
            ax.plot([f], [t], "o", ms=4, label=f"TPR@{f:g} = {t:.3f}")
    # chance (TPR = FPR), sampled densely: on the symlog axis a two-point line is not the diagonal
    chance = chance_points()
    ax.plot(chance, chance, color="grey", lw=0.8, ls=":", label="chance (TPR = FPR)")
    ax.set_xscale("symlog", linthresh=_LINTHRESH)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("FPR (ID safe)")
    ax.set_ylabel("TPR")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))
