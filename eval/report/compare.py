"""Per-domain recall deltas between two evaluations (OLD -> NEW) at a fixed FPR.

When both eval folders have ``results.jsonl`` the TPRs are recomputed from the scores with
:mod:`eval.engine.metrics` and the *difference* is bootstrapped (paired on conversation ids when
both folders scored the same rows, independent resampling otherwise). Without scores the
delta comes from analysis.json and the interval is the conservative difference of the two
intervals. A domain *regressed* when delta < 0 and its interval excludes 0.

Nothing is a pass by default: a group whose delta or interval is NaN or missing (no ID-safe
rows to set the threshold, e.g. custom domains read without their domains file; no TPR in an
analysis.json) is *not compared* and said so with the reason, and so is a group (or monitor)
present on one side only. :func:`gate_failures` is what ``compare --fail-on-regression``
fails on: every regression and every group that could not be compared, except one that only
the NEW side has (new coverage, named but nothing lost).
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from mood_data.domains import DEFAULT_REGISTRY, DomainRegistry
from mood_data.errors import MoodguardError

from ..engine.metrics import OVERALL, tpr_at_fpr, value_at_fpr
from .runfolder import read_results
from .scaling import EvalFolder, find_eval_folders



@dataclass(frozen=True)
class ScoreSet:
    """Scores of one eval folder split into negatives (pooled ID-safe) and positive groups."""

    safe: np.ndarray
    safe_ids: tuple[str, ...]
    groups: Mapping[str, np.ndarray]
    group_ids: Mapping[str, tuple[str, ...]]
    ood: tuple[str, ...]  # groups that count in 'overall'


@dataclass(frozen=True)
class Delta:
    monitor: str
    group: str
    old: float | None
    new: float | None
    delta: float | None
    lo: float | None
    hi: float | None
    method: str  # "paired-bootstrap" | "bootstrap" | "analysis-ci" | "missing"
    note: str | None = None  # why the group could not be compared

    @property
    def compared(self) -> bool:
        """A finite delta with a finite interval: NaN, or nothing, is never a pass."""
        return all(isinstance(v, (int, float)) and math.isfinite(v) for v in (self.delta, self.lo, self.hi))

    @property
    def regressed(self) -> bool:
        return self.compared and self.delta < 0 and self.hi < 0


ONLY_OLD, ONLY_NEW = "only in old", "only in new"
NO_NEGATIVES = "no ID-safe rows in {side} to set the threshold (custom domains? pass their file: compare --domains YAML)"


def missing(monitor: str, groups: Sequence[str], note: str) -> list[Delta]:
    """A not-compared :class:`Delta` for each group (or monitor) found on one side only."""
    return [Delta(monitor, g, None, None, None, None, None, "missing", note) for g in groups]


def gate_failures(deltas: Sequence[Delta]) -> list[Delta]:
    """What ``--fail-on-regression`` fails on: regressions and groups that could not be compared
    (a group only the NEW side has is not one: nothing was lost). No delta at all fails too
    (a placeholder row says so)."""
    if not deltas:
        return missing("", ["(nothing)"], "no group to compare")
    return [d for d in deltas if d.regressed or (not d.compared and d.note != ONLY_NEW)]


def score_set(rows: Sequence[Mapping], registry: DomainRegistry = DEFAULT_REGISTRY,
              include_opt_in: bool = False) -> ScoreSet:
    """Group results.jsonl rows the way analysis.json does (negatives = ID safe rows)."""
    safe, safe_ids, groups, ids = [], [], {}, {}
    for r in rows:
        d, y = r["domain"], int(r["malign"])
        if registry.is_id(d):
            if y == 0:
                safe.append(float(r["score"]))
                safe_ids.append(str(r["id"]))
                continue
            d = "id"
        elif y == 0:
            continue
        groups.setdefault(d, []).append(float(r["score"]))
        ids.setdefault(d, []).append(str(r["id"]))
    ood = tuple(d for d in registry.eval_ood(include_opt_in) if d in groups)
    return ScoreSet(np.asarray(safe, np.float64), tuple(safe_ids),
                    {k: np.asarray(v, np.float64) for k, v in groups.items()},
                    {k: tuple(v) for k, v in ids.items()}, ood)


def _aligned(old_ids: tuple[str, ...], new_ids: tuple[str, ...]) -> np.ndarray | None:
    """Permutation putting NEW rows in OLD's order when both hold the same ids, else None."""
    if len(old_ids) != len(new_ids) or set(old_ids) != set(new_ids) or len(set(old_ids)) != len(old_ids):
        return None
    pos = {i: k for k, i in enumerate(new_ids)}
    return np.array([pos[i] for i in old_ids], dtype=np.int64)


def recall_deltas(old: ScoreSet, new: ScoreSet, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0,
                  alpha: float = 0.05, monitor: str = "") -> list[Delta]:
    """Delta TPR@fpr (NEW - OLD) per common group plus 'overall' (mean over common OOD domains),
    with percentile-bootstrap intervals of the difference; groups of one side only, and every
    group when a side has no ID-safe negatives, come back not compared (with the reason)."""
    common = [g for g in old.groups if g in new.groups]
    one_sided = (missing(monitor, [g for g in old.groups if g not in new.groups], ONLY_OLD)
                 + missing(monitor, [g for g in new.groups if g not in old.groups], ONLY_NEW))
    empty = [side for side, s in (("old", old), ("new", new)) if s.safe.size == 0]
    if empty:  # no threshold can be set: every TPR would be NaN
        note = NO_NEGATIVES.format(side=" and ".join(empty))
        return [Delta(monitor, g, None, None, None, None, None, "missing", note) for g in common] + one_sided
    perms = {"safe": _aligned(old.safe_ids, new.safe_ids)}
    perms.update({g: _aligned(old.group_ids[g], new.group_ids[g]) for g in common})
    paired = all(p is not None for p in perms.values())
    if paired:  # reorder NEW so index k is the same conversation in both
        new = ScoreSet(new.safe[perms["safe"]], old.safe_ids, {g: new.groups[g][perms[g]] for g in common},
                       old.group_ids, new.ood)
    ood = [g for g in old.ood if g in common]

    def tprs(s_old, s_new, groups_old, groups_new):
        return ({g: tpr_at_fpr(s_old, groups_old[g], fpr) for g in common},
                {g: tpr_at_fpr(s_new, groups_new[g], fpr) for g in common})

    p_old, p_new = tprs(old.safe, new.safe, old.groups, new.groups)
    rng = np.random.default_rng(seed)
    draws = {g: np.empty(n_boot) for g in common + [OVERALL]}
    n_s_old, n_s_new = old.safe.size, new.safe.size
    for b in range(n_boot):
        i_old = rng.integers(0, n_s_old, n_s_old)
        i_new = i_old if paired else rng.integers(0, n_s_new, n_s_new)
        go, gn = {}, {}
        for g in common:
            j_old = rng.integers(0, old.groups[g].size, old.groups[g].size)
            j_new = j_old if paired else rng.integers(0, new.groups[g].size, new.groups[g].size)
            go[g], gn[g] = old.groups[g][j_old], new.groups[g][j_new]
        t_old, t_new = tprs(old.safe[i_old], new.safe[i_new], go, gn)
        for g in common:
            draws[g][b] = t_new[g] - t_old[g]
        draws[OVERALL][b] = np.mean([t_new[g] - t_old[g] for g in ood]) if ood else math.nan
    method = "paired-bootstrap" if paired else "bootstrap"
    out = []
    for g in common + ([OVERALL] if ood else []):
        if g == OVERALL:
            o, n = float(np.mean([p_old[d] for d in ood])), float(np.mean([p_new[d] for d in ood]))
        else:
            o, n = p_old[g], p_new[g]
        lo, hi = (np.quantile(draws[g], [alpha / 2, 1 - alpha / 2]) if n_boot > 0 else (math.nan, math.nan))
        d = Delta(monitor, g, o, n, n - o, float(lo), float(hi), method)
        out.append(d if d.compared else dataclasses.replace(d, note=_why_not(d, n_boot)))
    return out + one_sided


def _why_not(d: Delta, n_boot: int) -> str:
    if n_boot < 1:
        return "no interval (--n-boot 0)"
    return "TPR is NaN on one side"


def analysis_deltas(old: Mapping, new: Mapping, fpr: float = 0.01, monitor: str = "") -> list[Delta]:
    """Deltas from two analysis.json dicts; interval = [new_lo - old_hi, new_hi - old_lo]."""
    og = {**(old.get("groups") or {}), OVERALL: old.get(OVERALL) or {}}
    ng = {**(new.get("groups") or {}), OVERALL: new.get(OVERALL) or {}}
    if not isinstance(og.get(OVERALL), dict) or not og[OVERALL]:
        og.pop(OVERALL)
    if not isinstance(ng.get(OVERALL), dict) or not ng[OVERALL]:
        ng.pop(OVERALL)
    out = (missing(monitor, [g for g in og if g not in ng], ONLY_OLD)
           + missing(monitor, [g for g in ng if g not in og], ONLY_NEW))
    for g in [g for g in og if g in ng]:
        o, n = value_at_fpr(og[g].get("tpr", {}), fpr), value_at_fpr(ng[g].get("tpr", {}), fpr)
        oc, nc = value_at_fpr(og[g].get("tpr_ci", {}), fpr), value_at_fpr(ng[g].get("tpr_ci", {}), fpr)
        d = None if o is None or n is None else n - o
        lo = hi = None
        if oc and nc and None not in (*oc, *nc):
            lo, hi = nc[0] - oc[1], nc[1] - oc[0]
        delta = Delta(monitor, g, o, n, d, lo, hi, "analysis-ci")
        out.append(delta if delta.compared else
                   dataclasses.replace(delta, note=f"no TPR (or interval) at FPR {fpr:g} in analysis.json"))
    return sorted(out, key=lambda x: x.note is not None)  # compared groups first


def compare_folders(old: EvalFolder, new: EvalFolder, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0,
                    registry: DomainRegistry = DEFAULT_REGISTRY) -> list[Delta]:
    """Deltas of one monitor; ``registry`` says which domains are ID (their safe rows are the
    negatives): the custom domains the runs were evaluated with (``compare --domains``)."""
    ro, rn = old.path / "results.jsonl", new.path / "results.jsonl"
    if ro.is_file() and rn.is_file():
        return recall_deltas(score_set(read_results(ro), registry), score_set(read_results(rn), registry),
                             fpr, n_boot, seed, monitor=new.monitor)
    return analysis_deltas(old.analysis, new.analysis, fpr, monitor=new.monitor)


def pair_folders(old_root: str | os.PathLike, new_root: str | os.PathLike
                 ) -> tuple[list[tuple[str, EvalFolder, EvalFolder]], list[str], list[str]]:
    """Match eval folders by (run, monitor); two single runs are matched by monitor alone.
    Returns the pairs and the monitors found only in old / only in new."""
    old, new = find_eval_folders(old_root), find_eval_folders(new_root)
    single = len({f.run for f in old}) == 1 and len({f.run for f in new}) == 1
    key = (lambda f: f.monitor) if single else (lambda f: f"{f.run}/{f.monitor}")
    o, n = {key(f): f for f in old}, {key(f): f for f in new}
    common = [k for k in o if k in n]
    if not common:
        raise MoodguardError(f"{old_root} and {new_root}: no matching monitors "
                             f"(old: {', '.join(sorted(o)) or 'none'}; new: {', '.join(sorted(n)) or 'none'})")
    return [(k, o[k], n[k]) for k in common], [k for k in o if k not in n], [k for k in n if k not in o]


def compare_roots(old_root, new_root, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0,
                  registry: DomainRegistry = DEFAULT_REGISTRY) -> list[Delta]:
    pairs, only_old, only_new = pair_folders(old_root, new_root)
    out = []
    for label, o, n in pairs:
        out += [dataclasses.replace(d, monitor=label) for d in compare_folders(o, n, fpr, n_boot, seed, registry)]
    return out + missing("", [f"{m} (monitor)" for m in only_old], ONLY_OLD) \
        + missing("", [f"{m} (monitor)" for m in only_new], ONLY_NEW)


def format_deltas(deltas: Sequence[Delta], fpr: float) -> str:
    """A markdown table, the list of regressed (monitor, domain) pairs and, when any, the list
    of groups that could not be compared, each with its reason."""
    f = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"  # noqa: E731
    p = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"  # noqa: E731
    lines = [f"| monitor | group | old TPR@{fpr:g} | new | delta | 95% CI | method | |", "|---|---|---:|---:|---:|---|---|---|"]
    for d in deltas:
        flag = ("REGRESSED" if d.regressed else "improved" if d.compared and d.lo > 0
                else "" if d.compared else "NOT COMPARED")
        lines.append(f"| {d.monitor} | {d.group} | {p(d.old)} | {p(d.new)} | {f(d.delta)} | [{f(d.lo)}, {f(d.hi)}] | {d.method} | {flag} |")
    reg = [d for d in deltas if d.regressed]
    skipped = [d for d in deltas if not d.compared]
    lines.append("")
    n_compared = len(deltas) - len(skipped)
    lines.append("regressed: " + (", ".join(f"{d.monitor}:{d.group}" for d in reg) if reg
                                  else "unknown (no group could be compared)" if not n_compared
                                  else "none" + (f" of the {n_compared} compared groups" if skipped else "")))
    if skipped:
        lines.append("not compared: " + ", ".join(f"{d.monitor + ':' if d.monitor else ''}{d.group} ({d.note or 'NaN'})"
                                                  for d in skipped))
    return "\n".join(lines) + "\n"
