"""Ensemble detectors over N guards of one recipe that differ only in seed (LoRA/head init and
data order), scored on ONE loaded base (every member is a named adapter of
:class:`eval.engine.forward.SharedBackbone`; finding and loading the members:
:mod:`eval.run.ensemble`).

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

import numpy as np

from .base import MEMBER_LOG_ODDS, Detector


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


class EnsembleDetector(Detector):
    """Reads the ``[n_rows, n_members]`` log-odds of the members."""

    needs = MEMBER_LOG_ODDS


class EnsembleMean(EnsembleDetector):
    name = "ensemble-mean"

    def score(self, member_log_odds) -> np.ndarray:
        return ensemble_mean(member_log_odds)


class EnsembleMin(EnsembleDetector):
    name = "ensemble-min"

    def score(self, member_log_odds) -> np.ndarray:
        return ensemble_min(member_log_odds)


class EnsembleDisagreement(EnsembleDetector):
    name = "ensemble-disagreement"

    def score(self, member_log_odds) -> np.ndarray:
        return ensemble_disagreement(member_log_odds)


__all__ = ["EnsembleDetector", "EnsembleDisagreement", "EnsembleMean", "EnsembleMin", "ensemble_disagreement",
           "ensemble_mean", "ensemble_min", "sigmoid"]
