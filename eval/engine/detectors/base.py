"""The detector protocol (after pytorch-ood's ``Detector``: ``fit`` / ``predict`` and a
``requires_fit`` flag).

A detector is a small class:

* ``name`` -- its name in a monitor (``guard+maha``) and in the table (:mod:`eval.engine.table`);
* ``needs`` -- what it reads from a forward pass, one of :data:`NEEDS`; the forward planner
  (:mod:`eval.engine.planner`) turns the needs of a monitor's detectors into passes (one guard
  pass, hidden states kept or not; one LM pass; one pass per ensemble member; one judge pass per
  rubric). No other module looks at ``needs``;
* ``requires_fit`` -- whether it has statistics fitted on the SAFE train rows (cached under
  ``<run>/stats/<key>/``, copied into bundles);
* ``Settings`` -- its typed settings (a frozen dataclass; they are also its statistics' cache key
  parts, :meth:`Detector.cache_parts`).

It fits from a stream of batches (:meth:`Detector.fit_stream`: ``(inputs, malign)`` pairs; a
detector that requires no fit is just configured), scores already oriented (**higher = more
unsafe**) with :meth:`Detector.score`, and saves / loads its state (:meth:`Detector.save`,
:meth:`Detector.load`; a detector without fitted statistics stores its settings).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError
from mood_data.readers import read_json

# what a detector reads (the inputs of ``score``)
LOGITS = "logits"  # the guard head's logits [n, labels] (the guard pass)
LOG_ODDS = "log_odds"  # the guard's log-odds of unsafe [n] (the guard pass; --predict-safe read in)
FEATURES = "features"  # pooled hidden states of one layer [n, d] (the guard pass, hidden states kept)
TOKEN_NLL = "token_nll"  # (sum of token NLL [n], scored tokens [n]) under the LM adapter (the LM pass)
MEMBER_LOG_ODDS = "member_log_odds"  # [n, members] log-odds of the ensemble members (a pass per member)
JUDGE_SCORES = "judge_scores"  # {rubric: expected answer [n]} of the judge (a pass per rubric)
NEEDS = (LOGITS, LOG_ODDS, FEATURES, TOKEN_NLL, MEMBER_LOG_ODDS, JUDGE_SCORES)


@dataclasses.dataclass(frozen=True)
class NoSettings:
    """The settings of a detector that has none."""


class Detector:
    """Base class of every detector; see the module docstring."""

    name: ClassVar[str]
    needs: ClassVar[str]
    requires_fit: ClassVar[bool] = False
    Settings: ClassVar[type] = NoSettings

    def __init__(self, settings: Any = None):
        self.settings = self.Settings() if settings is None else settings

    def score(self, inputs) -> np.ndarray:
        """Per-row score, float64, higher = more unsafe."""
        raise NotImplementedError

    # -- fitting
    @classmethod
    def fitter(cls, settings: Any):
        """A streaming fit: ``update(inputs, malign)`` per batch, ``finalize(metadata)`` -> the
        fitted detector. Only for ``requires_fit`` detectors."""
        raise TypeError(f"detector {cls.name!r} has nothing to fit")

    @classmethod
    def fit_stream(cls, settings: Any, batches: Iterable[tuple[Any, Any]], metadata: dict | None = None) -> "Detector":
        """The detector fitted on ``(inputs, malign)`` batches (only the safe rows count where the
        detector says so); one that requires no fit is returned configured."""
        if not cls.requires_fit:
            return cls(settings)
        fit = cls.fitter(settings)
        for inputs, malign in batches:
            fit.update(inputs, malign)
        return fit.finalize(metadata=metadata)

    @classmethod
    def cache_parts(cls, settings: Any) -> dict:
        """What of the settings enters the statistics cache key."""
        return dataclasses.asdict(settings)

    # -- state
    def save(self, directory: str | Path, name: str) -> Path:
        """``<directory>/<name>.json``: the detector and its settings (a fitted detector saves its
        statistics too)."""
        return atomic.write_json(Path(directory) / f"{name}.json",
                                 {"detector": self.name, "settings": dataclasses.asdict(self.settings)})

    @classmethod
    def load(cls, directory: str | Path, name: str) -> "Detector":
        path = Path(directory) / f"{name}.json"
        doc = read_json(path, BundleError)
        if doc.get("detector") != cls.name:
            raise BundleError(f"{path}: field 'detector': expected '{cls.name}', got {doc.get('detector')!r}")
        try:
            return cls(cls.Settings(**(doc.get("settings") or {})))
        except TypeError:
            raise BundleError(f"{path}: field 'settings': not the settings of '{cls.name}'") from None


__all__ = ["Detector", "FEATURES", "JUDGE_SCORES", "LOGITS", "LOG_ODDS", "MEMBER_LOG_ODDS", "NEEDS", "NoSettings",
           "TOKEN_NLL"]
