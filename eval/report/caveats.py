"""Warnings a reader needs before trusting a monitor's figures, and the run's settings line.

Pure functions over ``analysis.json`` and ``meta.json`` dicts (no model, no files), so the
evaluate command, ``analysis.json: warnings``, the report's header and the chart's title all
state the same caveats in the same words.

Rules (each a named constant, documented in docs/metrics.md):

* an FPR ``f`` needs at least ``MIN_NEGATIVES_PER_FPR / f`` ID-safe negatives (10 negatives
  above the threshold); with fewer the threshold is an interpolation between a handful of
  scores and the reported TPR is not resolved at that FPR;
* a fused monitor's fusion fitted on fewer than ``MIN_FUSION_ROWS`` ID rows (for ``lambda`` /
  ``logistic``, which use the labels, also fewer than ``MIN_UNSAFE`` ID-unsafe rows);
* an OOD group with fewer than ``MIN_UNSAFE`` unsafe rows (one row moves TPR by > 3 points);
* more than ``MAX_TRUNCATED_SHARE`` of the scored rows left-truncated to the context;
* ID AUROC (ID unsafe vs ID safe) within ``CHANCE_BAND`` of 0.5: the guard has not learnt its
  own task, so OOD figures say little.
"""
from __future__ import annotations

import math
import sys
from typing import Iterable

MIN_NEGATIVES_PER_FPR = 10
MIN_FUSION_ROWS = 100
MIN_UNSAFE = 30
MAX_TRUNCATED_SHARE = 0.10
CHANCE_BAND = 0.05


def min_negatives(fpr: float) -> int:
    """ID-safe negatives needed to resolve a threshold at ``fpr`` (10 above it)."""
    return math.ceil(MIN_NEGATIVES_PER_FPR / float(fpr) - 1e-9)


def analysis_warnings(analysis: dict, meta: dict | None = None) -> list[dict]:
    """``[{"kind", "message", ...}]`` for one monitor's analysis (+ its meta.json when known)."""
    meta = meta or {}
    out: list[dict] = []
    n_neg = analysis.get("n_id_safe")
    neg_from = (analysis.get("calibration") or {}).get("split", "test")
    if isinstance(n_neg, int):
        short = [float(f) for f in analysis.get("fprs") or [] if n_neg < min_negatives(float(f))]
        if short:
            out.append({"kind": "small_negative_pool", "fprs": short, "n_id_safe": n_neg,
                        "short": f"{n_neg} ID-safe negatives (FPR {min(short):g} needs >= {min_negatives(min(short))})",
                        "message": f"{n_neg} ID-safe negatives ({neg_from} rows) cannot resolve FPR "
                                   + ", ".join(f"{f:g} (needs >= {min_negatives(f)})" for f in short)
                                   + "; treat TPR there as unresolved"})
    fusion = meta.get("fusion_fit") or {}
    n_fit = fusion.get("n_fit")
    n_bad = fusion.get("n_fit_unsafe")
    few_unsafe = fusion.get("method") in ("lambda", "logistic") and isinstance(n_bad, int) and n_bad < MIN_UNSAFE
    if isinstance(n_fit, int) and len(fusion.get("detectors") or []) > 1 and (n_fit < MIN_FUSION_ROWS or few_unsafe):
        out.append({"kind": "small_fusion_fit", "n_fit": n_fit, "short": f"fusion fitted on {n_fit} rows",
                    "message": f"fusion '{fusion.get('method')}' fitted on {n_fit} ID rows "
                               f"({fusion.get('n_fit_safe')} safe, {fusion.get('n_fit_unsafe')} unsafe; wanted "
                               f">= {MIN_FUSION_ROWS} rows" + (f", >= {MIN_UNSAFE} unsafe for '{fusion.get('method')}'"
                                                               if few_unsafe else "") + "): its weights are noisy"})
    cas = (meta.get("cascade") or {}).get("fit") or {}
    n_cas, cas_fpr = cas.get("n_id_safe"), cas.get("fpr")
    if isinstance(n_cas, int) and isinstance(cas_fpr, (int, float)) and 0 < cas_fpr < 1 and \
            n_cas < min_negatives(cas_fpr):
        out.append({"kind": "small_cascade_fit", "n_id_safe": n_cas,
                    "short": f"cascade bands fitted on {n_cas} ID-safe rows",
                    "message": f"cascade bands fitted on {n_cas} ID-safe rows: FPR {cas_fpr:g} needs >= "
                               f"{min_negatives(cas_fpr)} (the upper band edges rest on a few rows; a larger ID "
                               "validation slice makes them mean more)"})
    small = sorted(g for g, v in (analysis.get("groups") or {}).items()
                   if v.get("kind") == "ood" and isinstance(v.get("n_unsafe"), int) and 0 < v["n_unsafe"] < MIN_UNSAFE)
    if small:
        out.append({"kind": "small_groups", "groups": small, "short": f"< {MIN_UNSAFE} unsafe rows per OOD domain",
                    "message": f"{len(small)} OOD domain(s) with < {MIN_UNSAFE} unsafe rows ({', '.join(small)}): "
                               "one row moves their TPR by more than 3 points"})
    n_rows, n_cut = meta.get("n_rows"), meta.get("truncated_rows")
    if isinstance(n_rows, int) and n_rows > 0 and isinstance(n_cut, int) and n_cut / n_rows > MAX_TRUNCATED_SHARE:
        out.append({"kind": "truncation", "share": n_cut / n_rows, "short": f"{n_cut / n_rows:.0%} of rows truncated",
                    "message": f"{n_cut / n_rows:.0%} of the scored rows ({n_cut}/{n_rows}) were left-truncated "
                               "to the context window"})
    id_auc = ((analysis.get("groups") or {}).get("id") or {}).get("auroc")
    if isinstance(id_auc, (int, float)) and abs(id_auc - 0.5) <= CHANCE_BAND:
        out.append({"kind": "id_auroc_chance", "auroc": id_auc, "short": "ID AUROC near chance",
                    "message": f"ID AUROC {id_auc:.2f} is near chance: the monitor does not separate ID unsafe "
                               "from ID safe, so its OOD figures say little"})
    return out


def print_warnings(warnings: Iterable[dict], where: str, file=None) -> None:
    for w in warnings:
        print(f"moodguard: warning: {where}: {w['message']}", file=file or sys.stderr)


def settings_line(meta: dict, analysis: dict | None = None) -> str:
    """One line: model size, training steps, context, fusion, data sizes, hardware."""
    s = meta.get("settings") or {}
    parts = []
    if meta.get("params"):
        parts.append(f"{meta['params']:,} params")
    if s.get("guard_steps") is not None:
        parts.append(f"guard {s['guard_steps']} steps" + (f", LM {s['lm_steps']} steps" if s.get("lm_steps") else ""))
    if s.get("max_length"):
        parts.append(f"{s['max_length']}-token windows")
    if meta.get("fusion"):
        parts.append(f"fusion {meta['fusion']}")
    if s.get("n_train") is not None:
        parts.append(f"{s['n_train']:,} train rows")
    if s.get("n_validation") is not None:
        parts.append(f"{s['n_validation']:,} ID validation rows")
    if meta.get("n_rows") is not None:
        parts.append(f"{meta['n_rows']:,} test rows")
    if analysis and analysis.get("n_id_safe") is not None:
        split = (analysis.get("calibration") or {}).get("split", "test")
        parts.append(f"{analysis['n_id_safe']:,} ID-safe negatives ({split})")
    if meta.get("device"):
        parts.append(f"{meta['device']} {meta.get('dtype', '')}".strip())
    return "; ".join(parts)


def merged(warnings_per_monitor: Iterable[list[dict]]) -> list[str]:
    """Unique messages over several monitors, first seen first (for a report / chart header)."""
    seen: dict[str, None] = {}
    for ws in warnings_per_monitor:
        for w in ws:
            seen.setdefault(w["message"], None)
    return list(seen)


def headline(warnings_per_monitor: list[list[dict]]) -> list[str]:
    """Short caveats over many monitors, one per kind, with how many monitors it concerns."""
    n = len(warnings_per_monitor)
    kinds: dict[str, list[dict]] = {}
    for ws in warnings_per_monitor:
        for w in ws:
            kinds.setdefault(w["kind"], []).append(w)
    out = []
    for ws in kinds.values():
        text = ws[0].get("short") or ws[0]["message"]
        out.append(text if len(ws) == n else f"{text} ({len(ws)} of {n} monitors)")
    return out


def common_settings(metas: list[dict], analyses: list[dict]) -> str:
    """The settings line shared by every monitor of a sweep (model size and hardware left out)."""
    lines = {settings_line({k: v for k, v in m.items() if k not in ("params", "device", "dtype")}, a)
             for m, a in zip(metas, analyses)}
    return lines.pop() if len(lines) == 1 else "settings differ between runs (see each run)"
