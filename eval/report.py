"""One self-contained HTML report (images as base64 data URIs) plus a markdown twin.

Works on a run root, a sweep folder (adds the scaling chart) or a single eval folder. Reads
only analysis.json, meta.json and plots/*.png of the eval folders (docs/architecture.md).
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Sequence

from mood_data import atomic
from mood_data.errors import MoodguardError

from .metrics import OVERALL, value_at_fpr
from .scaling import EvalFolder, find_eval_folders, make_chart

DEFAULT_GPU_HOUR_COST = 2.0  # USD per accelerator-hour, for the cost column

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right}img{max-width:100%;border:1px solid #eee;margin:4px}
.plots img{max-width:360px}h2{border-bottom:2px solid #ddd;padding-bottom:4px}"""


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _ci(pair) -> str:
    return f"[{_f(pair[0])}, {_f(pair[1])}]" if pair else ""


def domain_rows(analysis: dict) -> tuple[list[str], list[list[str]]]:
    """Header + rows: one per group (OOD domains, id, overall) with TPR (CI) at each FPR, AUROC."""
    fprs = analysis.get("fprs") or []
    header = ["group", "kind", "n unsafe"] + [f"TPR@{float(f):g}" for f in fprs] + ["AUROC"]
    groups = dict(analysis.get("groups") or {})
    items = sorted(groups.items(), key=lambda kv: (kv[1].get("kind") != "ood", kv[0]))
    items.append((OVERALL, {**(analysis.get(OVERALL) or {}), "kind": "mean of OOD"}))
    rows = []
    for name, g in items:
        cells = [name, str(g.get("kind", "")), _f(g.get("n_unsafe", g.get("n_domains")))]
        for f in fprs:
            cells.append(f"{_f(value_at_fpr(g.get('tpr', {}), f))} {_ci(value_at_fpr(g.get('tpr_ci', {}), f))}".strip())
        cells.append(f"{_f(g.get('auroc'))} {_ci(g.get('auroc_ci'))}".strip())
        rows.append(cells)
    return header, rows


def cost_rows(folders: Sequence[EvalFolder], fpr: float, gpu_hour_cost: float) -> tuple[list[str], list[list[str]]]:
    """Latency and cost per conversation per monitor, with the threshold a deployment would use.

    In a layered deployment the OOD detectors ride on the guard's forward pass (and the LM
    adapter's forward for ppl), so 'extra vs guard' is what adding a layer costs.
    """
    header = ["run", "monitor", "params", f"threshold@{fpr:g}", f"overall TPR@{fpr:g}", "s / conversation",
              "extra vs guard (s)", "conversations / hour", f"USD / 1M conv (@${gpu_hour_cost:g}/h)"]
    guard_s = {f.run: f.meta.get("seconds_per_conversation") for f in folders if f.monitor == "guard"}
    rows = []
    for f in sorted(folders, key=lambda f: (f.params, f.run, f.monitor.count("+"), f.monitor)):
        s = f.meta.get("seconds_per_conversation")
        g = guard_s.get(f.run)
        rows.append([
            f.run, f.monitor, f"{f.params:,}", _f(value_at_fpr(f.analysis.get("thresholds", {}), fpr), 4),
            _f(value_at_fpr((f.analysis.get(OVERALL) or {}).get("tpr", {}), fpr)),
            _f(s, 4), _f(s - g, 4) if s is not None and g is not None else "–",
            f"{3600 / s:,.0f}" if s else "–", f"{s * 1e6 / 3600 * gpu_hour_cost:,.2f}" if s is not None else "–",
        ])
    return header, rows


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def build_report(root: str | os.PathLike, fpr: float = 0.01, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST,
                 chart_png: Path | None = None, match_sentence: str | None = None) -> tuple[str, str]:
    """(html, markdown) for every eval folder under ``root``."""
    root = Path(root).resolve()
    folders = find_eval_folders(root)
    if not folders:
        raise MoodguardError(f"{root}: no eval/<monitor>/analysis.json found")
    title = f"moodguard report: {root.name}"
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    md = [f"# {title}\n"]
    runs = sorted({f.run for f in folders})
    h.append(f"<p>{len(runs)} run(s), {len(folders)} monitor folder(s). Score orientation: higher = more unsafe. "
             "Every group's negatives are the pooled ID-safe test rows; 'overall' is the unweighted mean over "
             "the evaluated OOD domains.</p>")
    md.append(f"{len(runs)} run(s), {len(folders)} monitor folder(s).\n")
    if chart_png is not None and chart_png.is_file():
        h.append("<h2>Recall vs parameters</h2>")
        md.append("## Recall vs parameters\n")
        if match_sentence:
            h.append(f"<p><b>{html.escape(match_sentence)}</b></p>")
            md.append(f"**{match_sentence}**\n")
        h.append(f"<img alt='recall vs params' src='{data_uri(chart_png)}'>")
        md.append(f"![recall vs params]({os.path.relpath(chart_png, root)})\n")
    header, rows = cost_rows(folders, fpr, gpu_hour_cost)
    h.append("<h2>Latency and cost per conversation</h2>" + _html_table(header, rows))
    md.append("## Latency and cost per conversation\n\n" + _md_table(header, rows))
    for f in sorted(folders, key=lambda f: (f.params, f.run, f.monitor.count("+"), f.monitor)):
        name = f"{f.run} / {f.monitor}"
        meta = f"params {f.params:,}; rows {f.meta.get('n_rows', '–')}; model {f.meta.get('model', '–')}; " \
               f"truncated rows {f.meta.get('truncated_rows', '–')}"
        header, rows = domain_rows(f.analysis)
        h.append(f"<h2>{html.escape(name)}</h2><p>{html.escape(meta)}</p>" + _html_table(header, rows))
        md.append(f"## {name}\n\n{meta}\n\n" + _md_table(header, rows))
        plots = sorted((f.path / "plots").glob("*.png"))
        if plots:
            h.append("<div class='plots'>" + "".join(
                f"<img alt='{html.escape(p.stem)}' title='{html.escape(p.stem)}' src='{data_uri(p)}'>" for p in plots)
                + "</div>")
            md.append("\n".join(f"![{p.stem}]({os.path.relpath(p, root)})" for p in plots) + "\n")
    h.append("</body></html>\n")
    return "".join(h), "\n".join(md)


def write_report(root: str | os.PathLike, fpr: float = 0.01, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST,
                 out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``report.html`` + ``report.md`` into ``root`` (atomically); a sweep gets its chart."""
    root = Path(root).resolve()
    folders = find_eval_folders(root)
    chart_png, sentence = None, None
    if len({f.run for f in folders}) > 1:  # a sweep: (re)draw the chart so the report is current
        chart = make_chart(root, fpr=fpr)
        chart_png, sentence = chart.files["png"], chart.match.sentence() if chart.match else None
    page, md = build_report(root, fpr, gpu_hour_cost, chart_png, sentence)
    out = Path(out_dir) if out_dir else root
    return {"html": atomic.write_text(out / "report.html", page), "md": atomic.write_text(out / "report.md", md)}
