"""Cascade monitors in numbers: route conversations through ordered stages, fit the escalation
bands for a budget (docs/cascade.md). No model and no run folder here: stage scores in, cascade
scores and a fitted :class:`CascadeRule` out.

**Routing.** Stage ``k`` (0-based, every stage but the last) has a band ``[lo_k, hi_k]`` (``None``
= no band: nothing escalates). A conversation that reaches stage ``k`` stops there when its
stage score is below ``lo_k`` ("low") or above ``hi_k`` ("high"), and goes on to stage ``k + 1``
otherwise; the last stage decides every conversation that reaches it.

**The cascade score** (higher = more unsafe) orders the decisions lexicographically::

    low at stage 0 < low at stage 1 < ... < decided by the last stage < ... < high at stage 1 < high at stage 0

``score = tier + squash((s - mu) / sigma)`` with ``s`` the score of the stage that decided the
row, ``(mu, sigma)`` that stage's mean and standard deviation on the ID-safe fit rows and
``squash(z) = 1/2 + arctan(z) / pi`` in (0, 1), strictly increasing; tiers are ``k`` (low at stage
``k``), ``K - 1`` (the last stage) and ``2K - 2 - k`` (high at stage ``k``). A threshold on this
score is therefore a threshold on the last stage's score for escalated rows, while stage ``k``
flags its "high" rows and clears its "low" rows: thresholding it at the (1 - FPR) quantile of
the ID-safe rows' cascade scores gives the WHOLE cascade that FPR on those rows.

**Fitting** (:func:`fit_rule`): on ID rows only (rows of other domains are dropped first), choose
the bands that maximise the ID recall at ``fpr`` (threshold at the (1 - fpr) quantile of the
ID-safe cascade scores, recall = share of ID-unsafe cascade scores strictly above:
:mod:`eval.engine.metrics`) among the bands within the budget (``max_escalation_rate``: share of
rows leaving stage 0; ``max_cost_per_conversation``: mean seconds over the rows, each paying the
marginal cost of every stage it reaches). Ties (the recall counts a few rows) go to the higher ID
AUROC of the cascade score, then the lower cost, then the first candidate. With ``fill`` the budget
is spent: only the bands escalating the most it allows compete (the ID rows then only place the
band; what more escalation buys on OOD data, no ID row can show). Candidate band edges
are the midpoints between consecutive distinct scores of the rows reaching the stage (``exact``)
or ``grid_size`` of them evenly spaced (``grid``), plus unbounded edges. Two stages: one exact
sweep. More stages: coordinate ascent (each stage's band swept with the others fixed, repeated
until nothing changes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mood_data.domains import DEFAULT_REGISTRY, DomainRegistry
from mood_data.errors import DataError
from mood_data.readers import short_repr

from .checks import check_number, fail

Band = tuple[float | None, float | None] | None  # (lo, hi); None lo/hi = unbounded; None band = nothing escalates
SEARCHES = ("exact", "grid")
_CHUNK = 1 << 22  # cells of the candidate x row matrices evaluated at a time
_EPS = 1e-12


def squash(z: np.ndarray) -> np.ndarray:
    """A strictly increasing map of the real line onto (0, 1) (arctan keeps large |z| apart)."""
    return 0.5 + np.arctan(z) / np.pi


@dataclass(frozen=True)
class CascadeRule:
    """The fitted routing: one band per stage but the last, one ``(mu, sigma)`` per stage."""

    bands: tuple[Band, ...]
    norms: tuple[tuple[float, float], ...]

    @property
    def n_stages(self) -> int:
        return len(self.norms)

    def to_dict(self) -> dict:
        return {"bands": [None if b is None else {"lo": b[0], "hi": b[1]} for b in self.bands],
                "norms": [{"mu": m, "sigma": s} for m, s in self.norms]}

    @classmethod
    def from_dict(cls, path: Path, doc: Any, n_stages: int) -> "CascadeRule":
        """A saved rule, every value checked (one-line BundleError naming ``path`` and the field)."""
        if not isinstance(doc, dict):
            fail(path, "rule", f"expected a mapping, got {short_repr(doc)}")
        bands, norms = doc.get("bands"), doc.get("norms")
        if not isinstance(norms, list) or len(norms) != n_stages:
            fail(path, "rule.norms", f"expected {n_stages} entries (one per stage), got {short_repr(norms)}")
        if not isinstance(bands, list) or len(bands) != n_stages - 1:
            fail(path, "rule.bands", f"expected {n_stages - 1} entries (one per stage but the last), got "
                                     f"{short_repr(bands)}")
        out_norms = []
        for i, nm in enumerate(norms):
            if not isinstance(nm, dict):
                fail(path, f"rule.norms[{i}]", f"expected {{mu, sigma}}, got {short_repr(nm)}")
            mu = check_number(path, f"rule.norms[{i}].mu", nm.get("mu"))
            sigma = check_number(path, f"rule.norms[{i}].sigma", nm.get("sigma"))
            if sigma <= 0:
                fail(path, f"rule.norms[{i}].sigma", f"must be > 0, got {sigma}")
            out_norms.append((mu, sigma))
        out_bands: list[Band] = []
        for i, b in enumerate(bands):
            if b is None:
                out_bands.append(None)
                continue
            if not isinstance(b, dict) or set(b) != {"lo", "hi"}:
                fail(path, f"rule.bands[{i}]", f"expected null or {{lo, hi}}, got {short_repr(b)}")
            lo, hi = (None if b[k] is None else check_number(path, f"rule.bands[{i}].{k}", b[k]) for k in ("lo", "hi"))
            if lo is not None and hi is not None and lo > hi:
                fail(path, f"rule.bands[{i}]", f"lo {lo} > hi {hi} (an empty band is written null)")
            out_bands.append((lo, hi))
        return cls(tuple(out_bands), tuple(out_norms))


def _lo(b: Band) -> float:
    return -math.inf if b is None or b[0] is None else b[0]


def _hi(b: Band) -> float:
    return -math.inf if b is None else (math.inf if b[1] is None else b[1])


def _stop(s: np.ndarray, band: Band) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) masks of a stage's scores: a row with no band stops "low" (every row, ranked by
    its score: with nothing escalated the split is moot)."""
    if band is None:
        return np.ones(s.shape, dtype=bool), np.zeros(s.shape, dtype=bool)
    return s < _lo(band), s > _hi(band)


def passes_on(rule: CascadeRule, k: int, s: np.ndarray) -> np.ndarray:
    """The rows stage ``k`` (0-based, not the last) escalates, from their stage-k scores ``s``:
    ``lo <= s <= hi`` (none without a band); the same test :func:`route` applies."""
    low, high = _stop(np.asarray(s, dtype=np.float64), rule.bands[k])
    return ~low & ~high


@dataclass(frozen=True)
class Routed:
    """The cascade's decision for each row."""

    score: np.ndarray  # the cascade score (float64)
    stage: np.ndarray  # 1-based stage that decided the row
    reached: np.ndarray  # [K, n] bool: the row was scored by stage k


def route(rule: CascadeRule, stage_scores: Sequence[np.ndarray], where: str = "cascade") -> Routed:
    """Route rows through the stages (``stage_scores[k]``: stage k's score per row; rows that do
    not reach stage k may hold anything, NaN included). A NaN / inf score of a row that reaches its
    stage is a one-line DataError (fail closed, never a silent decision)."""
    if len(stage_scores) != rule.n_stages:
        raise DataError(f"{where}: {len(stage_scores)} stage score columns for {rule.n_stages} stages")
    cols = [np.asarray(s, dtype=np.float64).reshape(-1) for s in stage_scores]
    return _route_from(0, np.ones(cols[0].size, dtype=bool), rule.bands, rule.norms, cols, where)


def _route_from(k0: int, reach: np.ndarray, bands: Sequence[Band], norms, cols: list[np.ndarray],
                where: str = "cascade") -> Routed:
    """:func:`route` for the rows ``reach`` arriving at stage ``k0`` (other rows: NaN score, stage 0)."""
    k_stages = len(cols)
    n = reach.size
    score = np.full(n, np.nan)
    stage = np.zeros(n, dtype=np.int64)
    reached = np.zeros((k_stages, n), dtype=bool)
    reach = reach.copy()
    for k in range(k0, k_stages):
        s = cols[k]
        reached[k] = reach
        bad = reach & ~np.isfinite(s)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: row {i + 1}: field 'score_stage{k + 1}': {s[i]} (a stage score must be finite)")
        mu, sigma = norms[k]
        z = np.where(reach, s, mu)
        sq = squash((z - mu) / sigma)
        if k == k_stages - 1:
            low, high = reach, np.zeros(n, dtype=bool)
        else:
            low, high = _stop(z, bands[k])
            low, high = low & reach, high & reach
        score[low] = k + sq[low]
        score[high] = 2 * k_stages - 2 - k + sq[high]
        stage[low | high] = k + 1
        reach = reach & ~low & ~high
    return Routed(score, stage, reached)


def expected_cost(reached: np.ndarray, marginal: Sequence[float]) -> float:
    """Mean seconds per row: each row pays the marginal cost of every stage it reaches."""
    return float(np.mean(np.asarray(marginal, dtype=np.float64) @ reached.astype(np.float64))) if reached.size else 0.0


# ----------------------------------------------------------------------------- fitting
@dataclass
class Budget:
    """At most this share of rows leaving stage 0 and / or this mean cost; ``fill``: spend it (only
    the bands escalating the most the budget allows compete)."""

    max_escalation_rate: float | None = None
    max_cost_per_conversation: float | None = None
    fill: bool = False

    def ok(self, escalation: np.ndarray, cost: np.ndarray) -> np.ndarray:
        keep = np.ones(np.shape(escalation), dtype=bool)
        if self.max_escalation_rate is not None:
            keep &= escalation <= self.max_escalation_rate + _EPS
        if self.max_cost_per_conversation is not None:
            keep &= cost <= self.max_cost_per_conversation * (1 + 1e-9)
        return keep


@dataclass
class Fit:
    rule: CascadeRule
    report: dict = field(default_factory=dict)


def norms_of(stage_scores: Sequence[np.ndarray], safe: np.ndarray) -> tuple[tuple[float, float], ...]:
    """(mu, sigma) of each stage's scores on the ID-safe rows (population std; 0 -> 1)."""
    out = []
    for s in stage_scores:
        v = np.asarray(s, dtype=np.float64)[safe]
        sd = float(v.std())
        out.append((float(v.mean()), sd if sd > 0 else 1.0))
    return tuple(out)


def candidate_cuts(values: np.ndarray, search: str, grid_size: int) -> np.ndarray:
    """Band edges of a stage: midpoints between consecutive distinct ``values`` (``exact``), or
    ``grid_size - 2`` of them evenly spaced (``grid``), with -inf and +inf at the ends."""
    v = np.unique(values)
    mids = (v[1:] + v[:-1]) / 2
    if search == "grid" and mids.size > grid_size - 2:
        mids = mids[np.unique(np.round(np.linspace(0, mids.size - 1, max(grid_size - 2, 1))).astype(int))]
    return np.r_[-np.inf, mids, np.inf]


def _auroc_rows(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` [B, n] against labels ``y`` (ties count 1/2)."""
    from scipy.stats import rankdata

    pos, neg = int(y.sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return np.full(scores.shape[0], np.nan)
    ranks = rankdata(scores, axis=1)
    return (ranks[:, y == 1].sum(axis=1) - pos * (pos + 1) / 2) / (pos * neg)


def _evaluate(scores: np.ndarray, y: np.ndarray, fpr: float) -> tuple[np.ndarray, np.ndarray]:
    """(number of ID-unsafe rows strictly above the threshold, AUROC) of each candidate row of
    ``scores`` [B, n]; threshold = the (1 - fpr) quantile of the ID-safe columns (numpy linear)."""
    safe, unsafe = scores[:, y == 0], scores[:, y == 1]
    thr = np.quantile(safe, 1.0 - fpr, axis=1)
    hits = (unsafe > thr[:, None]).sum(axis=1)
    return hits, _auroc_rows(scores, y)


def _best_band(k: int, bands: list[Band], cols: list[np.ndarray], norms, y: np.ndarray, marginal: np.ndarray,
               budget: Budget, fpr: float, search: str, grid_size: int, progress=None) -> tuple[Band, dict]:
    """The best band of stage ``k`` with the other bands fixed (module doc), and its figures."""
    k_stages, n = len(cols), y.size
    # rows stopped before stage k keep their scores whatever stage k does; the others reach it
    prefix = _route_from(0, np.ones(n, dtype=bool), [*bands[:k], (None, None), *bands[k + 1:]], norms, cols)
    reach = prefix.reached[k]
    fixed_score = prefix.score  # rows stopped before stage k (the rest are replaced below)
    up_cost = float(np.mean(marginal[:k + 1] @ prefix.reached[:k + 1].astype(np.float64)))
    # each reaching row's score and cost were it escalated past stage k (stages k+1.. as fitted)
    down = _route_from(k + 1, reach, bands, norms, cols)
    down_cost = marginal[k + 1:] @ down.reached[k + 1:].astype(np.float64)
    mu, sigma = norms[k]
    s = np.where(reach, cols[k], mu)
    sq = squash((s - mu) / sigma)
    low_score, high_score = k + sq, 2 * k_stages - 2 - k + sq
    cuts = candidate_cuts(s[reach], search, grid_size)
    a_idx, b_idx = np.triu_indices(cuts.size, k=1)  # lo = cuts[a] < hi = cuts[b]
    # rows escalated and their cost, per band: cumulative sums over the reaching rows sorted by score
    order = np.argsort(s[reach], kind="stable")
    sv, dc = s[reach][order], down_cost[reach][order]
    below = np.searchsorted(sv, cuts, side="left")  # rows < cut
    upto = np.searchsorted(sv, cuts, side="right")  # rows <= cut
    cum = np.r_[0.0, np.cumsum(dc)]
    n_esc = upto[b_idx] - below[a_idx]
    cost = up_cost + (cum[upto[b_idx]] - cum[below[a_idx]]) / n
    leave0 = n_esc / n if k == 0 else np.full(n_esc.size, float(prefix.reached[1].mean()))
    keep = (n_esc > 0) & budget.ok(leave0, cost)  # an empty band is the "no band" candidate below
    if budget.fill and keep.any():  # spend the budget: only the bands escalating the most it allows
        keep &= cost >= cost[keep].max() - 1e-12 * max(1.0, abs(cost[keep].max()))
    a_idx, b_idx, cost, leave0 = a_idx[keep], b_idx[keep], cost[keep], leave0[keep]
    # candidate 0: no band (every reaching row stops at stage k, ranked by its score)
    hits, auc = _evaluate(np.where(reach, low_score, fixed_score)[None, :], y, fpr)
    hits_parts, auc_parts = [hits], [auc]
    chunk = max(1, _CHUNK // max(n, 1))
    for start in (progress or iter)(range(0, a_idx.size, chunk)):
        lo, hi = cuts[a_idx[start:start + chunk]][:, None], cuts[b_idx[start:start + chunk]][:, None]
        mat = np.where(s < lo, low_score, np.where(s > hi, high_score, down.score))
        h, au = _evaluate(np.where(reach, mat, fixed_score), y, fpr)
        hits_parts.append(h)
        auc_parts.append(au)
    hits, auc = np.concatenate(hits_parts), np.concatenate(auc_parts)
    if budget.fill and a_idx.size:
        hits[0] = -1  # no band only when no band fits
    costs = np.r_[up_cost, cost]
    leaves = np.r_[0.0 if k == 0 else float(prefix.reached[1].mean()), leave0]
    best = int(np.lexsort((np.arange(hits.size), costs, -np.nan_to_num(auc, nan=-1.0), -hits))[0])
    band: Band = None
    if best:
        lo, hi = cuts[a_idx[best - 1]], cuts[b_idx[best - 1]]
        band = (None if np.isneginf(lo) else float(lo), None if np.isposinf(hi) else float(hi))
    return band, {"candidates": int(hits.size), "hits": int(hits[best]), "auroc": float(auc[best]),
                  "cost": float(costs[best]), "escalation_rate": float(leaves[best])}


def fit_rule(stage_scores: Sequence[np.ndarray], malign, domains: Sequence[str], marginal_costs: Sequence[float],
             budget: Budget, *, fpr: float = 0.01, search: str = "exact", grid_size: int = 64,
             registry: DomainRegistry = DEFAULT_REGISTRY, max_rounds: int = 10, progress=None) -> Fit:
    """Fit the bands (module doc) on the ID rows of the given rows (rows of any other domain are
    dropped before anything is computed). ``stage_scores[k]``: stage k's score of every row
    (every stage scored every row); ``marginal_costs[k]``: seconds per conversation stage k adds
    for a row that reaches it; ``progress`` wraps the loop over candidate chunks (a progress bar).
    Returns the rule and a report of the fit."""
    if search not in SEARCHES:
        raise DataError(f"cascade: field 'search': expected one of {list(SEARCHES)}, got {search!r}")
    k_stages = len(stage_scores)
    if k_stages < 2:
        raise DataError(f"cascade: needs at least two stages, got {k_stages}")
    y_all = np.asarray(malign).astype(np.int64).reshape(-1)
    is_id = np.array([registry.is_id(d) for d in domains], dtype=bool)
    cols_all = [np.asarray(s, dtype=np.float64).reshape(-1) for s in stage_scores]
    if any(c.size != y_all.size for c in cols_all) or len(domains) != y_all.size:
        raise DataError("cascade: stage scores, malign and domains differ in length")
    cols = [c[is_id] for c in cols_all]
    y = y_all[is_id]
    for k, c in enumerate(cols):
        if not np.isfinite(c).all():
            i = int(np.flatnonzero(is_id)[np.flatnonzero(~np.isfinite(c))[0]])
            raise DataError(f"cascade: fit row {i + 1}: field 'score_stage{k + 1}': {c[~np.isfinite(c)][0]} "
                            "(stage scores must be finite)")
    n_safe, n_unsafe = int((y == 0).sum()), int((y == 1).sum())
    if n_safe < 2 or n_unsafe < 1:
        raise DataError(f"cascade: the fit needs ID-safe and ID-unsafe rows, got {n_safe} safe and {n_unsafe} "
                        "unsafe ID rows")
    marginal = np.asarray(marginal_costs, dtype=np.float64)
    norms = norms_of(cols, y == 0)
    bands: list[Band] = [None] * (k_stages - 1)
    info: dict = {}
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for k in range(k_stages - 1):
            band, info = _best_band(k, bands, cols, norms, y, marginal, budget, fpr, search, grid_size, progress)
            if band != bands[k]:
                bands[k], changed = band, True
        if not changed or k_stages == 2:
            break
    rule = CascadeRule(tuple(bands), norms)
    routed = route(rule, cols, "cascade fit")
    from .metrics import auroc, tpr_at_fpr

    safe, unsafe = routed.score[y == 0], routed.score[y == 1]
    report = {
        "objective": f"ID recall at FPR {fpr:g} (threshold: the (1 - FPR) quantile of the ID-safe fit rows' cascade "
                     "scores), ties: ID AUROC, then lower cost",
        "fpr": fpr, "search": search, "grid_size": grid_size if search == "grid" else None,
        "budget": {"max_escalation_rate": budget.max_escalation_rate,
                   "max_cost_per_conversation": budget.max_cost_per_conversation, "fill": budget.fill},
        "n_rows": int(y.size), "n_id_safe": n_safe, "n_id_unsafe": n_unsafe, "n_dropped_not_id": int((~is_id).sum()),
        "id_recall": tpr_at_fpr(safe, unsafe, fpr), "id_auroc": auroc(safe, unsafe),
        "reach": [float(r) for r in routed.reached.mean(axis=1)],
        "escalation_rate": float(routed.reached[1].mean()),
        "cost_per_conversation": expected_cost(routed.reached, marginal),
        "marginal_costs": [float(c) for c in marginal], "rounds": rounds,
        "within_budget": bool(budget.ok(np.array(float(routed.reached[1].mean())),
                                        np.array(expected_cost(routed.reached, marginal)))),
        "candidates_last_stage_swept": info.get("candidates"),
    }
    return Fit(rule, report)


__all__ = ["Budget", "CascadeRule", "Fit", "Routed", "SEARCHES", "candidate_cuts", "expected_cost", "fit_rule",
           "norms_of", "passes_on", "route", "squash"]
