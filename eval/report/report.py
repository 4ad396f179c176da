"""One HTML report (the chart as a base64 data URI; per-group plots embedded while small,
else linked) plus a markdown twin.

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

from ..engine.metrics import OVERALL, value_at_fpr
from .scaling import EvalFolder, find_eval_folders, make_chart

DEFAULT_GPU_HOUR_COST = 2.0  # USD per accelerator-hour, for the cost column

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#f3f3f3}td.num{text-align:right}img{max-width:100%;border:1px solid #eee;margin:4px}
.plots img{max-width:360px}h2{border-bottom:2px solid #ddd;padding-bottom:4px}
.caveats{background:#fff6e0;border:1px solid #e0b040;padding:6px 12px;margin:0.5em 0}.caveats ul{margin:4px 0}
details{border:1px solid #ddd;margin:6px 0;padding:4px 8px}summary{cursor:pointer;font-weight:600}"""


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


def price(meta: dict, gpu_hour_cost: float, cpu_hour_cost: float | None = None) -> str:
    """USD per 1M conversations at the rate of the hardware that was measured: a GPU run at
    the GPU rate; a CPU run only at a stated CPU rate (else not priced); unknown hardware not
    priced (older eval folders do not record it)."""
    s = meta.get("seconds_per_conversation")
    device = str(meta.get("device") or "")
    if s is None:
        return "–"
    if device.startswith("cuda"):
        return f"{s * 1e6 / 3600 * gpu_hour_cost:,.2f} (GPU @ ${gpu_hour_cost:g}/h)"
    if device == "cpu":
        if cpu_hour_cost is None:
            return "– (CPU run, not priced)"
        return f"{s * 1e6 / 3600 * cpu_hour_cost:,.2f} (CPU @ ${cpu_hour_cost:g}/h)"
    return "– (hardware not recorded)"


def hardware(meta: dict) -> str:
    device = meta.get("device")
    return f"{device} / {meta.get('dtype', '?')}" if device else "not recorded"


def cost_rows(folders: Sequence[EvalFolder], fpr: float, gpu_hour_cost: float,
              cpu_hour_cost: float | None = None) -> tuple[list[str], list[list[str]]]:
    """Latency and cost per conversation per monitor, with the threshold a deployment would use.

    In a layered deployment the OOD detectors ride on the guard's forward pass (and the LM
    adapter's forward for ppl), so 'extra vs guard' is what adding a layer costs. Latency is
    what was measured on the recorded hardware (a shared CPU is not a GPU): see :func:`price`.
    """
    header = ["run", "monitor", "params", "measured on (device / dtype)", f"threshold@{fpr:g}", f"overall TPR@{fpr:g}",
              "s / conversation", "extra vs guard (s)", "conversations / hour", "USD / 1M conversations"]
    guard_s = {f.run: f.meta.get("seconds_per_conversation") for f in folders if f.monitor == "guard"}
    rows = []
    for f in _ordered(folders):
        s = f.meta.get("seconds_per_conversation")
        g = guard_s.get(f.run)
        rows.append([
            f.run, f.monitor, f"{f.params:,}", hardware(f.meta), _f(value_at_fpr(f.analysis.get("thresholds", {}), fpr), 4),
            _f(value_at_fpr((f.analysis.get(OVERALL) or {}).get("tpr", {}), fpr)),
            _f(s, 4), _f(s - g, 4) if s is not None and g is not None else "–",
            f"{3600 / s:,.0f}" if s else "–", price(f.meta, gpu_hour_cost, cpu_hour_cost),
        ])
    return header, rows


def _ordered(folders: Sequence[EvalFolder]) -> list[EvalFolder]:
    return sorted(folders, key=lambda f: (f.params, f.run, f.monitor.count("+"), f.monitor))


def summary_rows(folders: Sequence[EvalFolder], fpr: float) -> tuple[list[str], list[list[str]]]:
    """One line per monitor: overall and ID figures and how many caveats apply."""
    from .caveats import analysis_warnings

    header = ["run", "monitor", f"overall TPR@{fpr:g}", "overall AUROC", "ID AUROC", "ID-safe negatives", "caveats"]
    rows = []
    for f in _ordered(folders):
        o = f.analysis.get(OVERALL) or {}
        ws = analysis_warnings(f.analysis, f.meta)
        rows.append([f.run, f.monitor, _f(value_at_fpr(o.get("tpr", {}), fpr)), _f(o.get("auroc")),
                     _f(((f.analysis.get("groups") or {}).get("id") or {}).get("auroc")),
                     _f(f.analysis.get("n_id_safe")), ", ".join(w["kind"] for w in ws) or "none"])
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


EMBED_BUDGET_BYTES = 1_000_000  # per-group plots are embedded only while they stay below this


def _plots(folders: Sequence[EvalFolder]) -> dict[Path, list[Path]]:
    return {f.path: sorted((f.path / "plots").glob("*.png")) for f in folders}


def build_report(root: str | os.PathLike, fpr: float = 0.01, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST,
                 chart_png: Path | None = None, match_sentence: str | None = None, *,
                 cpu_hour_cost: float | None = None, embed_plots: bool | None = None,
                 base: str | os.PathLike | None = None) -> tuple[str, str]:
    """(html, markdown) for every eval folder under ``root``.

    The top states the settings, data sizes and caveats (:mod:`eval.report.caveats`), then the chart,
    a one-line-per-monitor summary and the cost table; each monitor's per-group tables and
    plots are folded (``<details>``). Plots are embedded (data URIs) when ``embed_plots`` is
    True, or when None and they total under :data:`EMBED_BUDGET_BYTES`; otherwise they are
    linked relative to ``base`` (the report's folder) and loaded lazily, which keeps the page
    small: keep the report next to the run folders.
    """
    from .caveats import analysis_warnings, common_settings, headline

    root = Path(root).resolve()
    base = Path(base).resolve() if base else root
    folders = find_eval_folders(root)
    if not folders:
        raise MoodguardError(f"{root}: no eval/<monitor>/analysis.json found")
    plots = _plots(folders)
    if embed_plots is None:
        embed_plots = sum(p.stat().st_size for ps in plots.values() for p in ps) <= EMBED_BUDGET_BYTES
    src = (lambda p: data_uri(p)) if embed_plots else (lambda p: os.path.relpath(p, base))
    title = f"moodguard report: {root.name}"
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
         f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    md = [f"# {title}\n"]
    runs = sorted({f.run for f in folders})
    settings = common_settings([f.meta for f in folders], [f.analysis for f in folders])
    caveats = headline([analysis_warnings(f.analysis, f.meta) for f in folders])
    intro = (f"{len(runs)} run(s), {len(folders)} monitor folder(s). Score orientation: higher = more unsafe. "
             "Every group's negatives are the pooled ID-safe rows; 'overall' is the unweighted mean over "
             "the evaluated OOD domains.")
    h.append(f"<p>{html.escape(intro)}</p>")
    md.append(intro + "\n")
    if settings:
        h.append(f"<p class='settings'><b>Settings:</b> {html.escape(settings)}</p>")
        md.append(f"**Settings:** {settings}\n")
    if caveats:
        h.append("<div class='caveats'><b>Caveats</b><ul>" + "".join(f"<li>{html.escape(c)}</li>" for c in caveats)
                 + "</ul></div>")
        md.append("**Caveats**\n\n" + "".join(f"- {c}\n" for c in caveats))
    if chart_png is not None and chart_png.is_file():
        h.append("<h2>Recall vs parameters</h2>")
        md.append("## Recall vs parameters\n")
        if match_sentence:
            h.append(f"<p><b>{html.escape(match_sentence)}</b></p>")
            md.append(f"**{match_sentence}**\n")
        h.append(f"<img alt='recall vs params' src='{data_uri(chart_png)}'>")
        md.append(f"![recall vs params]({os.path.relpath(chart_png, base)})\n")
    header, rows = summary_rows(folders, fpr)
    h.append("<h2>Summary</h2>" + _html_table(header, rows))
    md.append("## Summary\n\n" + _md_table(header, rows))
    header, rows = cost_rows(folders, fpr, gpu_hour_cost, cpu_hour_cost)
    note = ("Latency as measured on the recorded device and dtype; only GPU runs are priced at the GPU rate "
            f"(${gpu_hour_cost:g}/h)" + (f", CPU runs at ${cpu_hour_cost:g}/h" if cpu_hour_cost is not None
                                         else "; CPU runs are not priced (--cpu-hour-cost to price them)") + ".")
    h.append("<h2>Latency and cost per conversation</h2>" + f"<p>{html.escape(note)}</p>" + _html_table(header, rows))
    md.append("## Latency and cost per conversation\n\n" + note + "\n\n" + _md_table(header, rows))
    h.append("<h2>Per monitor</h2><p>Per-domain tables and plots; click a monitor to open it.</p>")
    for f in _ordered(folders):
        name = f"{f.run} / {f.monitor}"
        meta = f"params {f.params:,}; rows {f.meta.get('n_rows', '–')}; model {f.meta.get('model', '–')}; " \
               f"truncated rows {f.meta.get('truncated_rows', '–')}; measured on {hardware(f.meta)}"
        ws = analysis_warnings(f.analysis, f.meta)
        o = f.analysis.get(OVERALL) or {}
        head = (f"{name}: overall TPR@{fpr:g} {_f(value_at_fpr(o.get('tpr', {}), fpr))}, AUROC {_f(o.get('auroc'))}"
                + (f" ({len(ws)} caveat{'s' if len(ws) != 1 else ''})" if ws else ""))
        header, rows = domain_rows(f.analysis)
        h.append(f"<details><summary>{html.escape(head)}</summary><p>{html.escape(meta)}</p>"
                 + ("<ul>" + "".join(f"<li>{html.escape(w['message'])}</li>" for w in ws) + "</ul>" if ws else "")
                 + _html_table(header, rows))
        md.append(f"## {name}\n\n{meta}\n\n" + "".join(f"- {w['message']}\n" for w in ws)
                  + ("\n" if ws else "") + _md_table(header, rows))
        if plots[f.path]:
            h.append("<div class='plots'>" + "".join(
                f"<img loading='lazy' alt='{html.escape(p.stem)}' title='{html.escape(p.stem)}' src='{src(p)}'>"
                for p in plots[f.path]) + "</div>")
            md.append("\n".join(f"![{p.stem}]({os.path.relpath(p, base)})" for p in plots[f.path]) + "\n")
        h.append("</details>")
    h.append("</body></html>\n")
    return "".join(h), "\n".join(md)


def write_report(root: str | os.PathLike, fpr: float = 0.01, gpu_hour_cost: float = DEFAULT_GPU_HOUR_COST,
                 out_dir: str | os.PathLike | None = None, *, cpu_hour_cost: float | None = None,
                 embed_plots: bool | None = None) -> dict[str, Path]:
    """Write ``report.html`` + ``report.md`` into ``root`` (atomically); a sweep gets its chart."""
    root = Path(root).resolve()
    folders = find_eval_folders(root)
    chart_png, sentence = None, None
    if len({f.run for f in folders}) > 1:  # a sweep: (re)draw the chart so the report is current
        chart = make_chart(root, fpr=fpr)
        chart_png, sentence = chart.files["png"], chart.match.sentence() if chart.match else None
    out = Path(out_dir) if out_dir else root
    page, md = build_report(root, fpr, gpu_hour_cost, chart_png, sentence, cpu_hour_cost=cpu_hour_cost,
                            embed_plots=embed_plots, base=out)
    return {"html": atomic.write_text(out / "report.html", page), "md": atomic.write_text(out / "report.md", md)}
