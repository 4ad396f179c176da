"""The per-monitor eval folder ``<run>/eval/<monitor>/`` (docs/architecture.md).

``write_run`` writes, each file atomically: ``results.jsonl`` (one row per conversation),
``analysis.json`` (:func:`eval.engine.metrics.analyze`), ``summary.md`` (per-group table),
``meta.json`` and ``plots/<slug>-<hash>_{hist,roc}.png`` (one pair per analysis group, named
by :func:`mood_data.domains.file_slug`: a group's name never becomes a path as it is).
``reanalyze`` recomputes analysis, summary and plots from ``results.jsonl`` alone.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from mood_data import atomic
from mood_data.domains import DEFAULT_REGISTRY, DomainRegistry, check_domain_name, file_slug
from mood_data.errors import DataError, where
from mood_data.readers import jsonl_rows, read_json, short_repr

from ..engine.metrics import DEFAULT_FPRS, OVERALL, analyze, fpr_key, per_domain_table

RESULTS, ANALYSIS, SUMMARY, META = "results.jsonl", "analysis.json", "summary.md", "meta.json"
NEGATIVES = "negatives.json"  # only when thresholds come from a held-out ID slice
VALIDATION = "validation.json"  # the monitor's scores on the ID validation slice (what a cascade fits on)


def _col(x, n: int, name: str) -> list:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = list(np.asarray(x).reshape(-1).tolist()) if not isinstance(x, list) else x
    if len(x) != n:
        raise DataError(f"write_run: field '{name}': {len(x)} values for {n} rows")
    return x


def write_run(
    out_dir: str | Path,
    *,
    ids: Sequence[str],
    conversations: Sequence[str],
    domains: Sequence[str],
    malign,
    score,
    detector_scores: Mapping[str, object] | None = None,
    monitor: str,
    meta: dict | None = None,
    registry: DomainRegistry = DEFAULT_REGISTRY,
    fprs: Iterable[float] = DEFAULT_FPRS,
    n_boot: int = 1000,
    seed: int = 0,
    plots: bool = True,
    truncated: Sequence[int] | None = None,
    negatives=None,
    negatives_split: str = "validation",
    extra_columns: Mapping[str, Sequence] | None = None,
    validation: Mapping[str, Sequence] | None = None,
    extra_files: Mapping[str, dict] | None = None,
) -> dict:
    """Write the whole eval folder; returns the analysis dict.

    ``extra_columns``: more ``results.jsonl`` columns, written as given (numbers, strings or
    null); ``validation``: ``{ids, domains, malign, score}`` of the monitor on the ID validation
    slice, kept in ``validation.json``; ``extra_files``: more JSON files of the folder (name ->
    document), written with it.

    ``negatives``: held-out ID-safe scores that set the thresholds instead of the test rows
    (:func:`eval.engine.metrics.analyze`); kept in ``negatives.json`` so :func:`reanalyze` reuses them.
    ``analysis.json: warnings`` lists the caveats of :mod:`eval.report.caveats`.

    ``score`` is the monitor's fused score; ``detector_scores`` adds ``score_<name>`` columns.
    ``meta`` is merged into meta.json (``monitor`` and ``n_rows`` are filled in).
    ``truncated``: indices of the rows that were left-truncated to the model's context; their
    count per analysis group goes to ``analysis.json: truncated``, summary.md and meta.json.
    """
    out = Path(out_dir)
    n = len(ids)
    cols = {"id": _col(list(ids), n, "id"), "conversation": _col(list(conversations), n, "conversation"),
            "domain": _col(list(domains), n, "domain"), "malign": [int(v) for v in _col(malign, n, "malign")],
            "score": [float(v) for v in _col(score, n, "score")]}
    for name, vals in (detector_scores or {}).items():
        cols[f"score_{name}"] = [float(v) for v in _col(vals, n, f"score_{name}")]
    for name, vals in (extra_columns or {}).items():
        cols[name] = _col(list(vals), n, name)
    keys = list(cols)
    trunc = None
    if truncated is not None:
        trunc = truncation_counts(truncated, cols["domain"], cols["malign"], registry)
    meta_doc = {"monitor": monitor, "n_rows": n, **(meta or {})}
    if trunc is not None:
        meta_doc.update(truncated_rows=trunc["rows"], truncated_by_group=trunc["groups"])
    # the whole folder is built aside and swapped in: a killed run never leaves new results
    # next to an old analysis (or a results.jsonl without its analysis)
    with atomic.atomic_dir(out) as tmp:
        atomic.write_jsonl(tmp / RESULTS, ({k: cols[k][i] for k in keys} for i in range(n)))
        atomic.write_json(tmp / META, meta_doc)
        neg = None
        if negatives is not None:
            neg = {"split": negatives_split, "scores": [float(v) for v in np.asarray(negatives, dtype=float).reshape(-1)]}
            atomic.write_json(tmp / NEGATIVES, neg)
        if validation is not None:
            atomic.write_json(tmp / VALIDATION, {"split": "validation", **{k: list(v) for k, v in validation.items()}})
        for name, doc in (extra_files or {}).items():
            atomic.write_json(tmp / name, doc)
        analysis = _analyse_and_report(tmp, np.asarray(cols["score"]), cols["domain"], np.asarray(cols["malign"]),
                                       monitor, registry, fprs, n_boot, seed, plots, trunc, meta_doc, neg)
    return analysis


def truncation_counts(truncated: Sequence[int], domains: Sequence[str], malign: Sequence[int],
                      registry: DomainRegistry = DEFAULT_REGISTRY) -> dict:
    """Left-truncated rows per analysis group: ``{"rows": total, "groups": {"id_safe": n
    (the negatives), "id": n (ID unsafe), <OOD domain>: n (its unsafe rows)}}``."""
    groups: dict[str, int] = {"id_safe": 0, "id": 0}
    for i in truncated:
        dom, bad = domains[i], int(malign[i])
        key = ("id" if bad else "id_safe") if registry.is_id(dom) else (dom if bad else None)
        if key is not None:
            groups[key] = groups.get(key, 0) + 1
    return {"rows": len(truncated), "groups": groups}


def _analyse_and_report(out: Path, score, domains, malign, monitor, registry, fprs, n_boot, seed, plots,
                        truncated: dict | None = None, meta: dict | None = None, negatives: dict | None = None) -> dict:
    from .caveats import analysis_warnings

    analysis = analyze(score, domains, malign, registry=registry, fprs=fprs, n_boot=n_boot, seed=seed,
                       monitor=monitor, negatives=None if negatives is None else negatives["scores"],
                       negatives_split=(negatives or {}).get("split", "validation"))
    if truncated is not None:
        analysis["truncated"] = truncated
    analysis["warnings"] = analysis_warnings(analysis, meta)
    atomic.write_json(out / ANALYSIS, analysis)
    atomic.write_text(out / SUMMARY, summary_markdown(analysis))
    if plots:
        from .plots import plot_hist, plot_roc

        dom = np.asarray(domains, dtype=object)
        is_id = np.array([registry.is_id(d) for d in dom], dtype=bool)
        safe = score[is_id & (malign == 0)] if negatives is None else np.asarray(negatives["scores"], dtype=float)
        for group in analysis["groups"]:
            sel = (is_id if group == "id" else dom == group) & (malign == 1)
            stem = out / "plots" / file_slug(group)  # never the raw group name (a domain) as a path
            plot_hist(safe, score[sel], f"{stem}_hist.png", title=group, fprs=analysis["fprs"])
            plot_roc(safe, score[sel], f"{stem}_roc.png", title=group, fprs=analysis["fprs"])
    return analysis


def _fmt(v, ci=None, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    s = f"{v:.{digits}f}"
    if ci and ci[0] is not None and ci[1] is not None:
        s += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return s


def summary_markdown(analysis: dict) -> str:
    """Per-group table: n, TPR at each FPR and AUROC, each with its 95 % bootstrap interval."""
    fprs = analysis["fprs"]
    lines = [f"# {analysis.get('monitor') or 'monitor'}", "",
             f"Negatives: {analysis['n_id_safe']} pooled ID-safe rows"
             + (f" of the held-out {analysis['calibration']['split']} slice (realised test FPR: "
                + ", ".join(f"{k} → {_fmt(v)}" for k, v in analysis["calibration"]["test_fpr"].items()) + ")"
                if analysis.get("calibration") else "") + ". Thresholds: "
             + ", ".join(f"FPR {fpr_key(f)} → {_fmt(analysis['thresholds'][fpr_key(f)], digits=4)}" for f in fprs)
             + f". Intervals: 95 % bootstrap ({analysis.get('n_boot')} draws).", "",
             "| group | kind | n unsafe | " + " | ".join(f"TPR@{100 * f:g}%FPR" for f in fprs) + " | AUROC |",
             "|---|---|---:|" + "---:|" * len(fprs) + "---:|"]
    by_fpr = {f: {r["group"]: r for r in per_domain_table(analysis, f)} for f in fprs}
    for group in by_fpr[fprs[0]] if fprs else []:
        r0 = by_fpr[fprs[0]][group]
        n = r0["n_unsafe"] if group != OVERALL else f"{r0['n_domains']} domains"
        tprs = [_fmt(by_fpr[f][group]["tpr"], (by_fpr[f][group]["tpr_lo"], by_fpr[f][group]["tpr_hi"])) for f in fprs]
        name = f"**{group}**" if group == OVERALL else group
        lines.append(f"| {name} | {r0['kind']} | {n} | " + " | ".join(tprs)
                     + f" | {_fmt(r0['auroc'], (r0['auroc_lo'], r0['auroc_hi']))} |")
    trunc = analysis.get("truncated")
    if trunc is not None:
        per = ", ".join(f"{g}={trunc['groups'].get(g, 0)}" for g in ["id_safe", *by_fpr[fprs[0]]] if g != OVERALL) \
            if fprs else ""
        lines += ["", f"Left-truncated to the model's context (start cut, end kept): {trunc['rows']} rows"
                  + (f" ({per})" if per else "") + "."]
    if analysis.get("warnings"):
        lines += ["", "Warnings:", *[f"- {w['message']}" for w in analysis["warnings"]]]
    return "\n".join(lines) + "\n"


def read_results(path: str | Path) -> list[dict]:
    """Rows of a ``results.jsonl`` (checked for the required fields; one-line DataError)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    rows = []
    for i, row in jsonl_rows(path, DataError):
        for field, typ in (("id", str), ("domain", str), ("malign", (int, bool)), ("score", (int, float))):
            if not isinstance(row.get(field), typ):
                raise DataError(f"{where(path, i, field)}: missing or wrong type (got {short_repr(row.get(field))})")
        check_domain_name(row["domain"], where(path, i, "domain"))
        rows.append(row)
    return rows


def reanalyze(
    run_dir: str | Path,
    *,
    registry: DomainRegistry = DEFAULT_REGISTRY,
    fprs: Iterable[float] | None = None,
    n_boot: int | None = None,
    seed: int | None = None,
    plots: bool = True,
) -> dict:
    """Recompute ``analysis.json`` / ``summary.md`` / plots from ``results.jsonl`` (like ``mood analyze``).

    FPRs, n_boot, seed and monitor name default to those of the existing analysis.json/meta.json.
    """
    run = Path(run_dir)
    rows = read_results(run / RESULTS)
    old = {}
    meta = read_json(run / META, DataError) if (run / META).is_file() else {}
    neg = read_json(run / NEGATIVES, DataError) if (run / NEGATIVES).is_file() else None
    for name in (ANALYSIS, META):
        if (run / name).is_file():
            try:
                old = {**read_json(run / name, DataError), **old}
            except DataError:
                pass
    score = np.array([float(r["score"]) for r in rows])
    malign = np.array([int(r["malign"]) for r in rows])
    return _analyse_and_report(
        run, score, [r["domain"] for r in rows], malign, old.get("monitor") or run.name, registry,
        fprs if fprs is not None else old.get("fprs", DEFAULT_FPRS),
        n_boot if n_boot is not None else old.get("n_boot", 1000),
        seed if seed is not None else old.get("seed", 0), plots, old.get("truncated"), meta, neg)
