"""THE forward planner: from the detectors a monitor uses, which passes run on which model.

The only module that reads what a detector needs (``Detector.needs``, :mod:`.detectors.base`):

* ``guard`` -- ONE guard forward over the shared backbone: the head's logits and log-odds, plus the
  pooled hidden states of the fitted layers when a detector reads features (kept per batch only
  to be scored, never stored);
* ``lm`` -- ONE forward under the causal-LM adapter on the same backbone, token NLLs in position
  chunks; both passes share one tokenisation (with the assistant-token mask only when the LM
  pass needs it);
* ``ensemble`` -- one logits-only guard forward per seed member (named adapters on the same base);
* ``judge`` -- one judge forward per rubric.

:func:`plan` returns a :class:`Plan` (which detectors each pass scores); :func:`score_shared`,
:func:`score_members` and :func:`score_judge` run a plan's passes and hand each detector its
input. Everything else (fitting, evaluate, bundles) asks the plan.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from mood_data.errors import DataError

from .detectors.base import FEATURES, JUDGE_SCORES, LOG_ODDS, LOGITS, MEMBER_LOG_ODDS, TOKEN_NLL
from .detectors.logits import guard_scores
from .forward import GuardBatch, encode, guard_pass
from .table import DETECTORS

# the pass that provides each input, by name (the CLI help, timing keys, error messages)
PASS_OF_NEED = {LOGITS: "guard", LOG_ODDS: "guard", FEATURES: "guard", TOKEN_NLL: "lm",
                MEMBER_LOG_ODDS: "ensemble", JUDGE_SCORES: "judge"}
PASSES = ("guard", "lm", "ensemble", "judge")
# why a detector may have no score for a row (NaN), by its pass: said in the error instead of a
# silent "not flagged"
UNSCORABLE = {"lm": "no token to score: a one-token conversation, or no assistant token with "
                    "eval.perplexity.assistant_only"}


@dataclass(frozen=True)
class ScoreSettings:
    """How the passes read the model (also stored in a bundle's monitor.json): context, batch,
    feature pooling, the LM pass's assistant-only mask, and whether the guard head outputs 'safe'."""

    max_length: int
    batch_size: int
    pooling: str = "last"
    assistant_only: bool = False
    predict_safe: bool = False


@dataclass(frozen=True)
class Plan:
    """Which detectors each pass scores (in the order they were planned)."""

    names: tuple[str, ...] = ()  # every planned detector, in the order given
    guard: tuple[str, ...] = ()  # read from the one guard pass (log-odds, logits or pooled features)
    features: tuple[str, ...] = ()  # of those, the ones reading pooled hidden states (fitted per layer)
    lm: tuple[str, ...] = ()  # the LM pass
    members: tuple[str, ...] = ()  # a logits-only guard pass per ensemble member
    judge: tuple[str, ...] = ()  # a judge pass per rubric

    @property
    def shared(self) -> tuple[str, ...]:
        """The detectors of the passes on the shared backbone (one tokenisation: guard + LM)."""
        return tuple(n for n in self.names if n in self.guard or n in self.lm)

    @property
    def needs_lm_adapter(self) -> bool:
        return bool(self.lm)

    def riders(self, names: Iterable[str]) -> tuple[str, ...]:
        """Of ``names``, those a pass of this plan scores anyway (a cascade stage's pass also gives
        a later stage's detectors of that pass, e.g. the guard pass: ``guard``, ``maha``)."""
        mine = {pass_name(n) for n in self.names}
        return tuple(n for n in names if pass_name(n) in mine)

    def timing_key(self, name: str) -> str:
        """Which measured wall time a detector costs: ``guard`` (the guard pass), its own name (an
        LM pass, timed per detector), ``ensemble`` or ``judge`` (the group's passes)."""
        return name if name in self.lm else pass_name(name)


def pass_name(name: str) -> str:
    """The pass a detector is scored by (``guard``, ``lm``, ``ensemble``, ``judge``)."""
    return PASS_OF_NEED[DETECTORS[name].needs]


def plan(names: Iterable[str]) -> Plan:
    """THE plan of the passes that score ``names`` (order kept within each pass)."""
    names = list(dict.fromkeys(names))
    by_pass = {p: tuple(n for n in names if pass_name(n) == p) for p in PASSES}
    features = tuple(n for n in by_pass["guard"] if DETECTORS[n].needs == FEATURES)
    return Plan(names=tuple(names), guard=by_pass["guard"], features=features, lm=by_pass["lm"],
                members=by_pass["ensemble"], judge=by_pass["judge"])


def help_text() -> str:
    """One line per detector for the CLI help: its pass, and whether it is fitted."""
    return "; ".join(f"{n} ({pass_name(n)} pass{', fitted' if c.requires_fit else ''})" for n, c in DETECTORS.items())


def unscorable_reason(name: str) -> str:
    return UNSCORABLE.get(pass_name(name) if name in DETECTORS else "", "cannot be computed")


# ----------------------------------------------------------------------------- the shared passes
class FeatureScorer:
    """``on_batch`` callback of the guard pass: scores each batch's pooled features with the
    fitted feature detectors (summed over layers) and keeps only the scores."""

    def __init__(self, n: int, detectors: Mapping[str, Mapping[int, Any]]):
        self.detectors = detectors
        self.scores = {name: np.zeros(n, dtype=np.float64) for name in detectors}

    def __call__(self, batch: GuardBatch) -> None:
        for name, per_layer in self.detectors.items():
            self.scores[name][batch.index] = sum(det.score(batch.features[layer]) for layer, det in per_layer.items())


def score_shared(the_plan: Plan, backbone, tokenizer, conversations: Sequence[str],
                 fitted: Mapping[str, Mapping[int, Any]], settings: ScoreSettings, desc: str = "",
                 truncated: list[int] | None = None,
                 seconds: dict[str, float] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The plan's guard pass (+ its LM pass) over ``conversations``: ONE tokenisation, ONE guard
    forward (logits, log-odds and the fitted layers' pooled features), ONE LM forward per LM
    detector. ``fitted``: ``{detector: {layer: fitted detector}}`` of the feature detectors.

    Returns every planned detector's scores (plan order) and the number of truncated rows;
    ``truncated`` (a list), when given, is extended with the indices of those rows;
    ``seconds`` (a dict), when given, gets the wall time of each pass (``guard``, each LM detector).
    """
    from .perplexity import token_nll_pass

    seconds = {} if seconds is None else seconds
    # one tokenisation for both passes (the assistant-token mask only when the LM pass needs it)
    enc = encode(tokenizer, conversations, settings.max_length,
                 assistant_only=settings.assistant_only and bool(the_plan.lm))
    if truncated is not None:
        truncated.extend(enc.truncated)
    feats = {k: fitted[k] for k in the_plan.features}
    scorer = FeatureScorer(len(conversations), feats)
    out: dict[str, np.ndarray] = {}
    if the_plan.guard:
        t0 = time.perf_counter()
        layers = sorted({layer for per in feats.values() for layer in per})
        logits = guard_pass(backbone, enc, batch_size=settings.batch_size, layers=layers,
                            pooling=settings.pooling, on_batch=scorer if feats else None,
                            desc=f"guard forward{desc}")
        inputs = {LOGITS: logits}
        if any(DETECTORS[n].needs == LOG_ODDS for n in the_plan.guard):
            inputs[LOG_ODDS] = guard_scores(logits, settings.predict_safe)
        out.update({n: DETECTORS[n]().score(inputs[DETECTORS[n].needs]) for n in the_plan.guard
                    if n not in feats})
        out.update(scorer.scores)
        seconds["guard"] = time.perf_counter() - t0
    for n in the_plan.lm:  # the LM pass, timed per detector
        t0 = time.perf_counter()
        out[n] = DETECTORS[n]().score(token_nll_pass(backbone, enc, batch_size=settings.batch_size,
                                                     desc=f"LM forward{desc}"))
        seconds[n] = time.perf_counter() - t0
    return {n: out[n] for n in the_plan.shared}, enc.n_truncated


def score_members(the_plan: Plan, backbone, tokenizer, members: Sequence[str], conversations: Sequence[str],
                  settings: ScoreSettings, desc: str = "") -> dict[str, np.ndarray]:
    """The plan's ensemble detectors: one logits-only guard forward per member adapter (already
    on ``backbone``), the members' log-odds ``[n, members]`` read by each detector."""
    if not the_plan.members:
        return {}
    enc = encode(tokenizer, conversations, settings.max_length)
    cols = [guard_scores(guard_pass(backbone, enc, batch_size=settings.batch_size, adapter=name,
                                    desc=f"ensemble {name}{desc}"), settings.predict_safe)
            for name in members]
    log_odds = np.stack(cols, axis=1)
    return {n: DETECTORS[n]().score(log_odds) for n in the_plan.members}


def score_judge(the_plan: Plan, judge, rubrics: Mapping[str, Any], conversations: Sequence[str], batch_size: int,
                desc: str = "") -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The plan's judge detectors: one judge pass per detector's rubric (``judge``: an
    :class:`eval.engine.judge_pass.Judge`); also per detector the mean answer-token mass and
    the truncated rows (diagnostics)."""
    out, info = {}, {}
    for n in the_plan.judge:
        rubric = DETECTORS[n].rubric
        s, m, n_trunc = judge.score(rubrics[rubric], conversations, batch_size, desc)
        out[n] = DETECTORS[n]().score({rubric: s})
        info[f"{n}_answer_mass"] = float(np.mean(m)) if len(m) else float("nan")
        info[f"{n}_truncated_rows"] = n_trunc
    return out, info


# ----------------------------------------------------------------------------- fail closed
def first_non_finite(scores: Mapping[str, np.ndarray]) -> tuple[int, str, float, int] | None:
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


def require_finite(scores: Mapping[str, np.ndarray], ids: Sequence[Any], where: str) -> None:
    """Fail closed: a score that cannot be computed is an error naming the row, never a silent
    'not flagged' (a NaN compares False with every threshold)."""
    from mood_data.readers import short_repr

    hit = first_non_finite(scores)
    if hit is not None:
        i, name, value, n = hit
        raise DataError(f"{where}: row {i + 1} (id {short_repr(ids[i])}): field 'conversation': detector "
                        f"'{name}' score is {value} ({unscorable_reason(name)}; {n} such rows)")


__all__ = ["FeatureScorer", "PASSES", "Plan", "ScoreSettings", "first_non_finite", "help_text", "pass_name", "plan",
           "require_finite", "score_judge", "score_members", "score_shared", "unscorable_reason"]
