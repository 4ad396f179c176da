"""Scoring rows with the detectors of the one guard pass and the one LM pass (see
:mod:`train.detector_table` for which detector needs which pass)."""
from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from mood_data.errors import DataError
from train.detector_table import DETECTORS

from ..run.backbone import Loaded
from .forward import GuardBatch, encode, guard_pass


def resolve_scorer(name: str):
    """The callable / class a detector's table entry names (``"module:attribute"``)."""
    module, _, attr = DETECTORS[name].scorer.partition(":")
    return getattr(importlib.import_module(module), attr)


def guard_scores(logits: np.ndarray, predict_safe: bool = False) -> np.ndarray:
    """Log-odds of unsafe from the guard logits (1 label: the logit). ``predict_safe``: the
    head was trained to output 'safe' (mood-bench's released adapters) -> negate."""
    from .detectors.logits import guard_margin

    z = np.asarray(logits, dtype=np.float64)
    s = z[:, 0].copy() if z.shape[1] == 1 else guard_margin(z)
    return -s if predict_safe else s


def logit_detectors(logits: np.ndarray, wanted: Iterable[str], predict_safe: bool = False) -> dict[str, np.ndarray]:
    """The wanted detectors that are functions of the guard logits (table: guard pass, not
    fitted), each times its table orientation. ``predict_safe`` flips the detector that reads
    the head's label (the table's scorer :func:`guard_scores`)."""
    out = {}
    for name in wanted:
        det = DETECTORS[name]
        if det.forward != "guard" or det.fitted:
            continue
        fn = resolve_scorer(name)
        s = fn(logits, predict_safe) if fn is guard_scores else fn(logits)
        out[name] = s if det.orientation == 1 else -np.asarray(s, dtype=np.float64)
    return out


class FeatureScorer:
    """``on_batch`` callback: scores each batch's pooled features with the fitted feature
    detectors (summed over layers) and keeps only the scores."""

    def __init__(self, n: int, detectors: dict[str, dict[int, object]]):
        self.detectors = detectors
        self.scores = {name: np.zeros(n, dtype=np.float64) for name in detectors}

    def __call__(self, batch: GuardBatch) -> None:
        for name, per_layer in self.detectors.items():
            self.scores[name][batch.index] = sum(det.score(batch.features[layer]) for layer, det in per_layer.items())


@dataclass(frozen=True)
class ScoreSettings:
    """What scoring needs from a recipe (also stored in a bundle's monitor.json)."""

    max_length: int
    batch_size: int
    pooling: str = "last"
    assistant_only: bool = False
    predict_safe: bool = False

    @classmethod
    def from_recipe(cls, recipe, predict_safe: bool = False) -> "ScoreSettings":
        ev = recipe.eval
        return cls(ev.max_length, ev.batch_size, ev.mahalanobis.pooling, ev.perplexity.assistant_only, predict_safe)


# why a detector may have no score for a row (NaN), by its forward pass: said in the error
# instead of a silent "not flagged"
UNSCORABLE = {"lm": "no token to score: a one-token conversation, or no assistant token with "
                    "eval.perplexity.assistant_only"}


def unscorable_reason(name: str) -> str:
    return UNSCORABLE.get(DETECTORS[name].forward if name in DETECTORS else "", "cannot be computed")


def first_non_finite(scores: dict[str, np.ndarray]) -> tuple[int, str, float, int] | None:
    """``(row index, detector, value, number of such rows)`` of the first NaN/inf score, or None."""
    hit = None
    n_bad = np.zeros(0, dtype=bool)
    for name, v in scores.items():
        v = np.asarray(v, dtype=np.float64)
        bad = ~np.isfinite(v)
        n_bad = bad if n_bad.size == 0 else (n_bad | bad)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            if hit is None or i < hit[0]:
                hit = (i, name, float(v[i]))
    return None if hit is None else (*hit, int(n_bad.sum()))


def require_finite(scores: dict[str, np.ndarray], ids: Sequence[Any], where: str) -> None:
    """Fail closed: a score that cannot be computed is an error naming the row, never a silent
    'not flagged' (a NaN compares False with every threshold)."""
    from mood_data.readers import short_repr

    hit = first_non_finite(scores)
    if hit is not None:
        i, name, value, n = hit
        raise DataError(f"{where}: row {i + 1} (id {short_repr(ids[i])}): field 'conversation': detector "
                        f"'{name}' score is {value} ({unscorable_reason(name)}; {n} such rows)")


def score_rows(loaded: Loaded, conversations: Sequence[str], detectors: dict[str, dict[int, object]],
               wanted: Iterable[str], settings: ScoreSettings, desc: str = "",
               truncated: list[int] | None = None,
               seconds: dict[str, float] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """One guard forward (+ one LM forward if an ``lm`` detector is wanted) over ``conversations``.

    Returns every wanted detector's scores (original order) and the number of truncated rows;
    ``truncated`` (a list), when given, is extended with the indices of those rows;
    ``seconds`` (a dict), when given, gets the wall time of each pass (``guard``, ``ppl``).
    """
    seconds = {} if seconds is None else seconds
    wanted = list(dict.fromkeys(wanted))
    # one tokenisation for both passes (the assistant-token mask only when perplexity needs it)
    lm_wanted = [w for w in wanted if DETECTORS[w].forward == "lm"]
    enc = encode(loaded.tokenizer, conversations, settings.max_length,
                 assistant_only=settings.assistant_only and bool(lm_wanted))
    if truncated is not None:
        truncated.extend(enc.truncated)
    feats = {k: v for k, v in detectors.items() if k in wanted}
    layers = sorted({layer for per in feats.values() for layer in per})
    scorer = FeatureScorer(len(conversations), feats)
    out: dict[str, np.ndarray] = {}
    if any(DETECTORS[w].forward == "guard" for w in wanted):
        t0 = time.perf_counter()
        logits = guard_pass(loaded.backbone, enc, batch_size=settings.batch_size, layers=layers,
                            pooling=settings.pooling, on_batch=scorer if feats else None,
                            desc=f"guard forward{desc}")
        out.update(logit_detectors(logits, wanted, settings.predict_safe))
        out.update(scorer.scores)
        seconds["guard"] = time.perf_counter() - t0
    for w in lm_wanted:  # the LM pass (its scorer: the table's pass function)
        t0 = time.perf_counter()
        out[w] = DETECTORS[w].orientation * resolve_scorer(w)(loaded.backbone, enc, batch_size=settings.batch_size,
                                                             desc=f"LM forward{desc}")
        seconds[w] = time.perf_counter() - t0
    return {w: out[w] for w in wanted}, enc.n_truncated


__all__ = ["UNSCORABLE", "unscorable_reason", "FeatureScorer", "ScoreSettings", "first_non_finite", "guard_scores", "logit_detectors",
           "require_finite", "resolve_scorer", "score_rows"]
