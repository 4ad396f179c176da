"""The ``ppl`` detector: perplexity of a conversation under the causal-LM adapter,
``exp(mean token NLL)`` from the LM pass's per-row NLL sums and token counts (the pass itself is
:mod:`eval.engine.perplexity`). Higher perplexity = more unsafe / OOD (no sign flip)."""
from __future__ import annotations

import numpy as np

from .base import TOKEN_NLL, Detector


def perplexity_from_nll(nll_sum: np.ndarray, count: np.ndarray) -> np.ndarray:
    """exp(mean token NLL); rows with no scored token get NaN."""
    nll_sum, count = np.asarray(nll_sum, dtype=np.float64), np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        return np.where(count > 0, np.exp(nll_sum / np.maximum(count, 1.0)), np.nan)


class Perplexity(Detector):
    """``score((nll_sum, count))`` = the perplexity of each row."""

    name = "ppl"
    needs = TOKEN_NLL

    def score(self, token_nll) -> np.ndarray:
        nll_sum, count = token_nll
        return perplexity_from_nll(nll_sum, count)


__all__ = ["Perplexity", "perplexity_from_nll"]
