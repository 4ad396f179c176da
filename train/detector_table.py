"""THE detector table: every detector a monitor can combine, in one place.

A monitor name joins detectors with ``+`` (``guard+maha+ppl``; the first is the fusion
anchor). Recipe validation (:mod:`train.recipe`), ``--monitors``, scoring and fitting
(:mod:`eval.scoring`, :mod:`eval.fitting`), the evaluate orchestration, sweeps, bundles and the
CLI help all read this table; no other module lists detector names.

The table is plain data (no torch, no eval import) so the recipe layer can validate monitor
names; :func:`eval.scoring.resolve_scorer` turns a ``scorer`` string into the callable.

Fields of :class:`Detector`:

* ``name`` -- the monitor-name part.
* ``forward`` -- the forward pass it needs: ``guard`` (the one guard forward: logits and pooled
  features), ``lm`` (the causal-LM adapter forward on the same backbone), ``ensemble`` (one
  guard forward per extra seed member), ``judge`` (the judge's prompt forward).
* ``fitted`` -- statistics fitted on the SAFE rows of the train slice (cached under
  ``<run>/stats/<key>/``); the others need nothing fitted beyond fusion.
* ``cache_parts`` -- recipe fields under ``recipe.eval`` (dotted) that enter its statistics
  cache key besides model, adapter hash, layer, pooling, max_length and the data fingerprint.
* ``scorer`` -- ``"module:attribute"``: a fitted detector's class (``load``/``score``), a
  guard-logit function ``f(logits)``, an ensemble function ``f(member_scores)``; for ``lm`` /
  ``judge`` the pass function.
* ``orientation`` -- +1 or -1: the scorer's output times this is "higher = more unsafe" (the one
  orientation every detector and every fusion uses).
* ``rubric`` -- judge detectors: the rubric they prompt with.

Adding a detector = one entry here + its module (see docs/architecture.md for an example).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from mood_data.errors import RecipeError

FORWARDS = ("guard", "lm", "ensemble", "judge")


@dataclass(frozen=True)
class Detector:
    name: str
    forward: str
    fitted: bool
    cache_parts: tuple[str, ...]
    scorer: str
    orientation: int = 1
    rubric: str | None = None


TABLE: tuple[Detector, ...] = (
    Detector("guard", "guard", False, (), "eval.engine.scoring:guard_scores"),
    Detector("maha", "guard", True, ("mahalanobis.estimator", "mahalanobis.variant", "mahalanobis.ridge"),
             "eval.engine.detectors.mahalanobis:MahalanobisDetector"),
    Detector("ppl", "lm", False, ("perplexity.assistant_only",), "eval.engine.perplexity:perplexity_pass"),
    Detector("knn", "guard", True, ("knn.k", "knn.max_ref"), "eval.engine.detectors.knn:KNNDetector"),
    Detector("energy", "guard", False, (), "eval.engine.detectors.logits:energy"),
    Detector("maxlogit", "guard", False, (), "eval.engine.detectors.logits:max_logit"),
    Detector("ensemble-mean", "ensemble", False, (), "eval.engine.detectors.ensemble:ensemble_mean"),
    Detector("ensemble-min", "ensemble", False, (), "eval.engine.detectors.ensemble:ensemble_min"),
    Detector("ensemble-disagreement", "ensemble", False, (), "eval.engine.detectors.ensemble:ensemble_disagreement"),
    Detector("judge", "judge", False, (), "eval.run.judge:judge_pass", rubric="alignment"),
    Detector("judge-uncertainty", "judge", False, (), "eval.run.judge:judge_pass", rubric="uncertainty"),
)
DETECTORS: dict[str, Detector] = {d.name: d for d in TABLE}
NAMES: tuple[str, ...] = tuple(DETECTORS)


def names(*, forward: str | Iterable[str] | None = None, fitted: bool | None = None) -> tuple[str, ...]:
    """Detector names in table order, optionally only those of ``forward`` pass(es) / fitted-ness."""
    fw = None if forward is None else ({forward} if isinstance(forward, str) else set(forward))
    return tuple(d.name for d in TABLE if (fw is None or d.forward in fw) and (fitted is None or d.fitted == fitted))


def one_pass_names() -> tuple[str, ...]:
    """Detectors scored by the one guard forward + the one LM forward of the shared backbone."""
    return names(forward=("guard", "lm"))


def parse_monitor(name: str) -> tuple[str, ...]:
    """THE monitor-name parser: ``"guard+maha"`` -> ``("guard", "maha")``; unknown, empty or
    repeated detectors are a one-line RecipeError."""
    parts = tuple(p.strip() for p in str(name).split("+"))
    bad = [p for p in parts if p not in DETECTORS]
    if not parts or bad or len(set(parts)) != len(parts):
        raise RecipeError(f"monitor {name!r}: expected detectors from {', '.join(NAMES)} joined by '+' "
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
    return [n for n in NAMES if n in used]


def help_text() -> str:
    """One line per detector for the CLI help."""
    return "; ".join(f"{d.name} ({d.forward} pass{', fitted' if d.fitted else ''})" for d in TABLE)


__all__ = ["DETECTORS", "Detector", "FORWARDS", "NAMES", "TABLE", "help_text", "names", "needed", "one_pass_names",
           "parse_monitor", "parse_monitors"]
