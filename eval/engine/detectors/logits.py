"""Detectors of the guard head: its log-odds of unsafe and functions of its logits ``[n, 2]``
(column 1 = unsafe). Higher = more unsafe/OOD.

* ``guard_scores``  = the guard's log-odds of unsafe: ``z1 - z0`` (one label: the logit), negated
  for a head trained to output 'safe' (``--predict-safe``); the ``guard`` detector reads it;
* ``guard_margin``  = ``z1 - z0``;
* ``guard_logprob`` = ``log softmax(z)[1]``;
* ``energy``        = ``E(z) = -logsumexp(z)`` (Liu et al. 2020). In-distribution inputs get
  large logits, so low energy; OOD inputs get higher energy: higher = more OOD as is;
* ``max_logit``     = ``-max_c z_c`` (negated maximum logit, Hendrycks et al. 2022): a small
  top logit means low confidence = more OOD.

Inputs may be numpy arrays or torch tensors; outputs are float64 numpy arrays ``[n]``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy.special import log_softmax, logsumexp

from mood_data.errors import DataError

from .base import LOG_ODDS, LOGITS, Detector
from .tensors import as_f64


def _logits(logits) -> np.ndarray:
    z = as_f64(logits)
    if z.ndim != 2 or z.shape[1] < 2:
        raise DataError(f"logits: expected shape [n, 2], got {list(z.shape)}")
    return z


def guard_margin(logits) -> np.ndarray:
    z = _logits(logits)
    return z[:, 1] - z[:, 0]


def guard_logprob(logits) -> np.ndarray:
    return log_softmax(_logits(logits), axis=1)[:, 1]


def energy(logits, temperature: float = 1.0) -> np.ndarray:
    """``-T * logsumexp(z / T)``; higher = more OOD."""
    return -temperature * logsumexp(_logits(logits) / temperature, axis=1)


def max_logit(logits) -> np.ndarray:
    return -np.max(_logits(logits), axis=1)


def guard_scores(logits, predict_safe: bool = False) -> np.ndarray:
    """Log-odds of unsafe from the guard logits (1 label: the logit). ``predict_safe``: the head
    was trained to output 'safe' (mood-bench's released adapters) -> negate."""
    z = np.asarray(logits, dtype=np.float64)
    s = z[:, 0].copy() if z.shape[1] == 1 else guard_margin(z)
    return -s if predict_safe else s


class Guard(Detector):
    """The guard classifier itself: its log-odds of unsafe."""

    name = "guard"
    needs = LOG_ODDS

    def score(self, log_odds) -> np.ndarray:
        return np.asarray(log_odds, dtype=np.float64)


class Energy(Detector):
    """Energy of the guard logits (Liu et al. 2020): higher = more OOD."""

    name = "energy"
    needs = LOGITS

    def score(self, logits) -> np.ndarray:
        return energy(logits)


class MaxLogit(Detector):
    """Negated maximum logit (Hendrycks et al. 2022): higher = more OOD."""

    name = "maxlogit"
    needs = LOGITS

    def score(self, logits) -> np.ndarray:
        return max_logit(logits)


LOGIT_SCORES: dict[str, Callable[..., np.ndarray]] = {
    "guard_margin": guard_margin,
    "guard_logprob": guard_logprob,
    "energy": energy,
    "max_logit": max_logit,
}


def logit_score(name: str, logits) -> np.ndarray:
    """Dispatch by name (one of :data:`LOGIT_SCORES`)."""
    if name not in LOGIT_SCORES:
        from mood_data.errors import RecipeError

        raise RecipeError(f"logit score: expected one of {sorted(LOGIT_SCORES)}, got {name!r}")
    return LOGIT_SCORES[name](logits)


__all__ = ["Energy", "Guard", "LOGIT_SCORES", "MaxLogit", "energy", "guard_logprob", "guard_margin", "guard_scores",
           "logit_score", "max_logit"]
