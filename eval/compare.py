"""Per-domain recall deltas between two evaluations (OLD -> NEW) at a fixed FPR.

When both eval folders have ``results.jsonl`` the TPRs are recomputed from the scores with
:mod:`eval.metrics` and the *difference* is bootstrapped (paired on conversation ids when
both folders scored the same rows, independent resampling otherwise). Without scores the
delta comes from analysis.json and the interval is the conservative difference of the two
intervals. A domain *regressed* when delta < 0 and its interval excludes 0.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from mood_data.domains import DEFAULT_REGISTRY, DomainRegistry
from mood_data.errors import MoodguardError

from .metrics import OVERALL, tpr_at_fpr, value_at_fpr
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
    method: str  # "paired-bootstrap" | "bootstrap" | "analysis-ci"

    @property
    def regressed(self) -> bool:
        return self.delta is not None and self.hi is not None and self.delta < 0 and self.hi < 0


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
    with percentile-bootstrap intervals of the difference."""
    common = [g for g in old.groups if g in new.groups]
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
        out.append(Delta(monitor, g, o, n, n - o, float(lo), float(hi), method))
    return out


def analysis_deltas(old: Mapping, new: Mapping, fpr: float = 0.01, monitor: str = "") -> list[Delta]:
    """Deltas from two analysis.json dicts; interval = [new_lo - old_hi, new_hi - old_lo]."""
    og = {**(old.get("groups") or {}), OVERALL: old.get(OVERALL) or {}}
    ng = {**(new.get("groups") or {}), OVERALL: new.get(OVERALL) or {}}
    out = []
    for g in [g for g in og if g in ng]:
        o, n = value_at_fpr(og[g].get("tpr", {}), fpr), value_at_fpr(ng[g].get("tpr", {}), fpr)
        oc, nc = value_at_fpr(og[g].get("tpr_ci", {}), fpr), value_at_fpr(ng[g].get("tpr_ci", {}), fpr)
        d = None if o is None or n is None else n - o
        lo = hi = None
        if oc and nc and None not in (*oc, *nc):
            lo, hi = nc[0] - oc[1], nc[1] - oc[0]
        out.append(Delta(monitor, g, o, n, d, lo, hi, "analysis-ci"))
    return out


def compare_folders(old: EvalFolder, new: EvalFolder, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0,
                    registry: DomainRegistry = DEFAULT_REGISTRY) -> list[Delta]:
    ro, rn = old.path / "results.jsonl", new.path / "results.jsonl"
    if ro.is_file() and rn.is_file():
        return recall_deltas(score_set(read_results(ro), registry), score_set(read_results(rn), registry),
                             fpr, n_boot, seed, monitor=new.monitor)
    return analysis_deltas(old.analysis, new.analysis, fpr, monitor=new.monitor)


def pair_folders(old_root: str | os.PathLike, new_root: str | os.PathLike) -> list[tuple[str, EvalFolder, EvalFolder]]:
    """Match eval folders by (run, monitor); two single runs are matched by monitor alone."""
    old, new = find_eval_folders(old_root), find_eval_folders(new_root)
    single = len({f.run for f in old}) == 1 and len({f.run for f in new}) == 1
    key = (lambda f: f.monitor) if single else (lambda f: f"{f.run}/{f.monitor}")
    o, n = {key(f): f for f in old}, {key(f): f for f in new}
    common = [k for k in o if k in n]
    if not common:
        raise MoodguardError(f"{old_root} and {new_root}: no matching monitors "
                             f"(old: {', '.join(sorted(o)) or 'none'}; new: {', '.join(sorted(n)) or 'none'})")
    return [(k, o[k], n[k]) for k in common]


def compare_roots(old_root, new_root, fpr: float = 0.01, n_boot: int = 1000, seed: int = 0) -> list[Delta]:
    out = []
    for label, o, n in pair_folders(old_root, new_root):
        out += [Delta(label, d.group, d.old, d.new, d.delta, d.lo, d.hi, d.method)
                for d in compare_folders(o, n, fpr, n_boot, seed)]
    return out


def format_deltas(deltas: Sequence[Delta], fpr: float) -> str:
    """A markdown table and the list of regressed (monitor, domain) pairs."""
    f = lambda x: "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}"  # noqa: E731
    p = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
    lines = [f"| monitor | group | old TPR@{fpr:g} | new | delta | 95% CI | method | |", "|---|---|---:|---:|---:|---|---|---|"]
    for d in deltas:
        flag = "REGRESSED" if d.regressed else ("improved" if d.lo is not None and d.lo > 0 else "")
        lines.append(f"| {d.monitor} | {d.group} | {p(d.old)} | {p(d.new)} | {f(d.delta)} | [{f(d.lo)}, {f(d.hi)}] | {d.method} | {flag} |")
    reg = [d for d in deltas if d.regressed]
    lines.append("")
    lines.append("regressed: " + (", ".join(f"{d.monitor}:{d.group}" for d in reg) if reg else "none"))
    return "\n".join(lines) + "\n"
