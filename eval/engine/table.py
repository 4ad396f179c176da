"""THE detector table: every detector a monitor can combine, one class each, in one dict.

A monitor name joins detectors with ``+`` (``guard+maha+ppl``; the first is the fusion anchor).
Monitor parsing (here, once per command: :func:`eval.run.context.resolve`), the forward planner,
fitting, evaluate, sweeps, bundles and the CLI help all read this table; no other module lists
detector names (``tests/test_architecture.py``). What a detector needs from a forward pass, whether
it is fitted and its settings are attributes of its class (:mod:`eval.engine.detectors.base`).

Adding a detector = one class (its module under ``eval/engine/detectors/``) + one entry in
:data:`TABLE` (docs/architecture.md runs an example).
"""
from __future__ import annotations

from typing import Iterable

from mood_data.errors import RecipeError

from .detectors.base import Detector
from .detectors.ensemble import EnsembleDisagreement, EnsembleMean, EnsembleMin
from .detectors.judge import JudgeAlignment, JudgeUncertainty
from .detectors.knn import KNNDetector
from .detectors.logits import Energy, Guard, MaxLogit
from .detectors.mahalanobis import MahalanobisDetector
from .detectors.perplexity import Perplexity

TABLE: tuple[type[Detector], ...] = (
    Guard, MahalanobisDetector, Perplexity, KNNDetector, Energy, MaxLogit,
    EnsembleMean, EnsembleMin, EnsembleDisagreement, JudgeAlignment, JudgeUncertainty,
)
DETECTORS: dict[str, type[Detector]] = {cls.name: cls for cls in TABLE}
NAMES: tuple[str, ...] = tuple(DETECTORS)


def parse_monitor(name: str) -> tuple[str, ...]:
    """THE monitor-name parser: ``"guard+maha"`` -> ``("guard", "maha")``; unknown, empty or
    repeated detectors are a one-line RecipeError."""
    parts = tuple(p.strip() for p in str(name).split("+"))
    bad = [p for p in parts if p not in DETECTORS]
    if not parts or bad or len(set(parts)) != len(parts):
        raise RecipeError(f"monitor {name!r}: expected detectors from {', '.join(DETECTORS)} joined by '+' "
                          f"(no repeats){'; unknown: ' + ', '.join(bad) if bad else ''}")
    return parts


def parse_monitors(monitors: Iterable[str] | str) -> list[str]:
    """A list (or comma-separated string) of monitor names, each checked by :func:`parse_monitor`
    and written back in canonical form."""
    if isinstance(monitors, str):
        monitors = [n for n in monitors.split(",") if n.strip()]
    out = ["+".join(parse_monitor(n)) for n in monitors]
    if not out:
        raise RecipeError("monitors: no monitor given")
    return out


def needed(monitors: Iterable[str]) -> list[str]:
    """Every detector the monitors use, in table order."""
    used = {d for m in monitors for d in parse_monitor(m)}
    return [n for n in DETECTORS if n in used]


def fitted(names: Iterable[str] = NAMES) -> list[str]:
    """The detectors among ``names`` (table order) whose statistics are fitted on train rows."""
    wanted = set(names)
    return [n for n, cls in DETECTORS.items() if cls.requires_fit and n in wanted]


__all__ = ["DETECTORS", "NAMES", "TABLE", "fitted", "needed", "parse_monitor", "parse_monitors"]
