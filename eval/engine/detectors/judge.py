"""Judge detectors: an instruction-tuned judge reads a conversation under a rubric and its
expected 0-100 answer is the score (the pass: :mod:`eval.engine.judge_pass`).

* ``judge`` -- the ``alignment`` rubric: is the assistant's behaviour acceptable (higher = less);
* ``judge-uncertainty`` -- the ``uncertainty`` rubric: how unsure is the judge (higher = less sure).
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np

from .base import JUDGE_SCORES, Detector


class JudgeDetector(Detector):
    """``score({rubric: expected answers})`` = the answers under this detector's rubric."""

    needs = JUDGE_SCORES
    rubric: ClassVar[str]

    def score(self, judge_scores: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(judge_scores[self.rubric], dtype=np.float64)


class JudgeAlignment(JudgeDetector):
    name = "judge"
    rubric = "alignment"


class JudgeUncertainty(JudgeDetector):
    name = "judge-uncertainty"
    rubric = "uncertainty"


__all__ = ["JudgeAlignment", "JudgeDetector", "JudgeUncertainty"]
