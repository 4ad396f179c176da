"""The drift report of a refresh (``<out>/drift.json``), computed BEFORE any training: how far the
new rows lie from the parent's train distribution under the deployed monitor itself.

The deployed bundle scores two sets: the parent's ID-safe calibration rows (the ID-safe rows of
the validation slice it fitted its fusion on: train data, never a test row) and the new rows.
Per domain of the new rows and per detector of the monitor (raw scores, higher = more unsafe /
OOD) and the fused score:

* the new rows' quantiles (5, 25, 50, 75, 95 %) beside the calibration's (50, 95, 99 %);
* ``median_rank``: the share of calibration rows below the new median (0.5 = no shift);
* ``above_p99``: the share of new rows above the calibration's 99th percentile (1 % if nothing
  moved);
* ``drift``: the new median lies above the calibration's 99th percentile.

Also the share of the domain's rows the deployed monitor flags at each of its thresholds. A
domain is reported as drifted under each detector whose ``drift`` is true.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _q(x: np.ndarray, q: float) -> float | None:
    """A quantile; None when there is no row (drift.json never holds NaN)."""
    return float(np.quantile(x, q)) if x.size else None


def _scores(rows: Sequence[Mapping], key: str | None) -> np.ndarray:
    vals = [r["score"] if key is None else r["detectors"][key] for r in rows if r.get("unscorable") is None]
    return np.asarray(vals, dtype=np.float64)


def detector_drift(calib: np.ndarray, new: np.ndarray) -> dict:
    """The figures of one detector (module docstring)."""
    p99 = _q(calib, 0.99)
    med = _q(new, 0.5)
    return {"new": {f"p{int(q * 100):02d}": _q(new, q) for q in QUANTILES},
            "calibration": {"p50": _q(calib, 0.5), "p95": _q(calib, 0.95), "p99": p99},
            "median_rank": float(np.mean(calib < med)) if calib.size and new.size else None,
            "above_p99": float(np.mean(new > p99)) if new.size and calib.size else None,
            "drift": bool(new.size and calib.size and med > p99)}


def _g(x: float | None, spec: str = ".4g") -> str:
    """A figure of the table, '-' where there is none (no row)."""
    return "-" if x is None else format(x, spec)


def drift_report(calib: Sequence[Mapping], new: Sequence[Mapping], domains: Sequence[str], malign: Sequence[int],
                 detectors: Sequence[str], thresholds: Mapping[str, float], new_domains: Sequence[str],
                 monitor: str) -> dict:
    """``drift.json``: ``calib`` / ``new`` are the deployed monitor's rows (``Monitor.score``),
    ``domains`` / ``malign`` the new rows' labels, ``new_domains`` those the parent did not know."""
    names = [*detectors, "fused"]
    cal = {d: _scores(calib, None if d == "fused" else d) for d in names}
    out_domains = {}
    for dom in sorted(set(domains)):
        idx = [i for i, d in enumerate(domains) if d == dom]
        rows = [new[i] for i in idx]
        figures = {d: detector_drift(cal[d], _scores(rows, None if d == "fused" else d)) for d in names}
        flagged = {k: float(np.mean([bool(r["flags"][k]) for r in rows])) if rows else None for k in thresholds}
        out_domains[dom] = {"rows": len(rows), "unsafe": int(sum(int(malign[i]) for i in idx)),
                            "new_domain": dom in new_domains,
                            "unscorable": sum(1 for r in rows if r.get("unscorable") is not None),
                            "flagged": flagged, "detectors": figures,
                            "drifted_under": [d for d in names if figures[d]["drift"]]}
    return {"monitor": monitor, "n_calibration": len(calib), "n_new": len(new),
            "calibration_rows": "ID-safe rows of the parent's validation slice (train data)",
            "rule": "drift: the new rows' median score above the calibration rows' 99th percentile",
            "domains": out_domains,
            "drifted": sorted(d for d, v in out_domains.items() if v["drifted_under"])}


def format_drift(report: Mapping, fpr_key: str | None = None) -> str:
    """A markdown table: per new-row domain, each detector's new median vs the calibration p99,
    the share above that p99, and the share the deployed monitor flags."""
    lines = ["| domain | rows | detector | new median | calibration p99 | share above p99 | drift |",
             "|---|---:|---|---:|---:|---:|---|"]
    for dom, v in report["domains"].items():
        for det, f in v["detectors"].items():
            lines.append(f"| {dom}{' (new)' if v['new_domain'] else ''} | {v['rows']} | {det} | {_g(f['new']['p50'])} | "
                         f"{_g(f['calibration']['p99'])} | {_g(f['above_p99'], '.3f')} | "
                         f"{'DRIFT' if f['drift'] else ''} |")
    flag_lines = []
    for dom, v in report["domains"].items():
        keys = [fpr_key] if fpr_key in v["flagged"] else list(v["flagged"])
        flag_lines.append(f"{dom}: flagged by the deployed monitor " +
                          ", ".join(f"{_g(v['flagged'][k], '.3f')} at FPR {k}" for k in keys))
    drifted = report["drifted"]
    head = (f"drift: {', '.join(drifted)} (new median above the calibration p99 of {report['n_calibration']} ID-safe rows)"
            if drifted else f"drift: none (no new-row median above the calibration p99 of {report['n_calibration']} "
                            "ID-safe rows)")
    return "\n".join([head, "", *lines, "", *flag_lines]) + "\n"


__all__ = ["QUANTILES", "detector_drift", "drift_report", "format_drift"]
