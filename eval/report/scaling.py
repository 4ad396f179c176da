"""Recall-vs-parameters scaling chart for a sweep, and the "how much larger" interpolation.

Reads only the run folders' ``eval/<monitor>/analysis.json`` and ``meta.json`` (formats in
docs/architecture.md), so it works on any sweep folder, finished or partial.
"""
from __future__ import annotations

import csv
import io
import math
import os
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from mood_data import atomic
from mood_data.errors import MoodguardError
from mood_data.readers import read_json

from ..engine.metrics import OVERALL, value_at_fpr



# --------------------------------------------------------------------------- reading runs
@dataclass(frozen=True)
class EvalFolder:
    """One ``<run>/eval/<monitor>/`` folder with its parsed analysis and meta."""

    path: Path
    run: str
    monitor: str
    params: int
    analysis: dict
    meta: dict


def find_eval_folders(root: str | os.PathLike) -> list[EvalFolder]:
    """Every ``eval/<monitor>/`` folder under ``root`` (a run root, a sweep, or one eval folder)."""
    root = Path(root)
    if not root.exists():
        raise MoodguardError(f"{root}: folder not found")
    hits = [root / "analysis.json"] if (root / "analysis.json").is_file() else sorted(root.rglob("eval/*/analysis.json"))
    # skip half-written temp folders (atomic writes stage into dot-named siblings)
    hits = [h for h in hits if not any(part.startswith(".") for part in h.relative_to(root).parts)]
    out = []
    for analysis_path in hits:
        folder = analysis_path.parent
        meta_path = folder / "meta.json"
        analysis = read_json(analysis_path)
        meta = read_json(meta_path) if meta_path.is_file() else {}
        params = meta.get("params")
        if params is not None and (not isinstance(params, (int, float)) or params <= 0):
            raise MoodguardError(f"{meta_path}: field 'params': expected a positive integer, got {params!r}")
        run = folder.parent.parent.name if folder.parent.name == "eval" else folder.parent.name
        monitor = str(analysis.get("monitor") or meta.get("monitor") or folder.name)
        out.append(EvalFolder(folder, run, monitor, int(params or 0), analysis, meta))
    return out


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Point:
    run: str
    monitor: str
    params: int
    group: str
    kind: str
    n_unsafe: int | None
    tpr: float | None
    tpr_lo: float | None
    tpr_hi: float | None
    auroc: float | None


def recall_points(folders: Iterable[EvalFolder], fpr: float = 0.01) -> list[Point]:
    """One row per (run, monitor, group): TPR at ``fpr`` with its CI, straight from analysis.json."""
    rows = []
    for f in folders:
        groups = dict(f.analysis.get("groups") or {})
        groups[OVERALL] = {**(f.analysis.get(OVERALL) or {}), "kind": OVERALL}
        for name, g in groups.items():
            ci = value_at_fpr(g.get("tpr_ci", {}), fpr) or (None, None)
            rows.append(Point(
                run=f.run, monitor=f.monitor, params=f.params, group=name, kind=str(g.get("kind", "")),
                n_unsafe=g.get("n_unsafe"), tpr=value_at_fpr(g.get("tpr", {}), fpr),
                tpr_lo=ci[0], tpr_hi=ci[1], auroc=g.get("auroc"),
            ))
    rows.sort(key=lambda p: (p.group != OVERALL, p.kind != "ood", p.group, p.monitor, p.params, p.run))
    return rows


def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def table_csv(points: Sequence[Point]) -> str:
    buf = io.StringIO()
    fields = list(Point.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(p).items()})
    return buf.getvalue()


def table_markdown(points: Sequence[Point], fpr: float) -> str:
    lines = [f"| group | monitor | run | params | TPR@{fpr:g} FPR | CI | AUROC |",
             "|---|---|---|---:|---:|---|---:|"]
    for p in points:
        ci = f"[{_fmt(p.tpr_lo)}, {_fmt(p.tpr_hi)}]" if p.tpr_lo is not None else ""
        lines.append(f"| {p.group} | {p.monitor} | {p.run} | {p.params:,} | {_fmt(p.tpr)} | {ci} | {_fmt(p.auroc)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- interpolation
def params_to_match(params: Sequence[float], recalls: Sequence[float], target: float) -> float | None:
    """Parameter count at which the recall curve first reaches ``target``.

    The curve is piecewise linear in log10(params) between sweep sizes (sorted ascending).
    Rule: the *first crossing* in ascending size order: if the smallest size already reaches
    the target its size is returned; otherwise the first segment ``r_i < target <= r_{i+1}``
    is interpolated. Later dips (non-monotone curves) are ignored. ``None`` when the target
    is not reached within the sweep.
    """
    if len(params) != len(recalls):
        raise ValueError("params and recalls differ in length")
    pts = sorted((float(p), float(r)) for p, r in zip(params, recalls) if r is not None and not math.isnan(r))
    if not pts:
        return None
    if any(p <= 0 for p, _ in pts):
        raise ValueError("parameter counts must be positive")
    if pts[0][1] >= target:
        return pts[0][0]
    for (p0, r0), (p1, r1) in zip(pts, pts[1:]):
        if r0 < target <= r1:
            t = (target - r0) / (r1 - r0)
            return 10 ** (math.log10(p0) + t * (math.log10(p1) - math.log10(p0)))
    return None


@dataclass(frozen=True)
class MatchResult:
    guard_monitor: str
    reference_monitor: str
    reference_params: int
    target: float
    params_needed: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.params_needed is None else self.params_needed / self.reference_params

    def sentence(self) -> str:
        head = (f"guard alone vs {self.reference_monitor} at {self.reference_params:,} params "
                f"(overall recall {self.target:.3f})")
        if self.params_needed is None:
            return f"{head}: not reached within the sweep"
        return f"{head}: guard alone needs ~{self.params_needed:,.0f} params (x{self.ratio:.1f} larger)"


def _curve(points: Sequence[Point], monitor: str, group: str = OVERALL) -> list[tuple[int, float, float | None, float | None]]:
    """(params, mean tpr, mean lo, mean hi) per size; seeds sharing a size are averaged."""
    by_size: dict[int, list[Point]] = {}
    for p in points:
        if p.monitor == monitor and p.group == group and p.tpr is not None and p.params > 0:
            by_size.setdefault(p.params, []).append(p)
    out = []
    for size in sorted(by_size):
        ps = by_size[size]
        mean = lambda xs: None if any(x is None for x in xs) else sum(xs) / len(xs)  # noqa: E731
        out.append((size, mean([p.tpr for p in ps]), mean([p.tpr_lo for p in ps]), mean([p.tpr_hi for p in ps])))
    return out


def match_guard(points: Sequence[Point], guard_monitor: str = "guard", reference: str | None = None) -> MatchResult | None:
    """How large a guard alone must be to match the smallest size's best guard+OOD monitor."""
    monitors = sorted({p.monitor for p in points})
    if guard_monitor not in monitors:
        return None
    combined = [m for m in monitors if m != guard_monitor] if reference is None else [reference]
    best = None
    for m in combined:
        curve = _curve(points, m)
        if curve and (best is None or (curve[0][0], -curve[0][1]) < (best[1], -best[2])):
            best = (m, curve[0][0], curve[0][1])
    if best is None:
        return None
    guard = _curve(points, guard_monitor)
    needed = params_to_match([c[0] for c in guard], [c[1] for c in guard], best[2])
    return MatchResult(guard_monitor, best[0], best[1], best[2], needed)


# --------------------------------------------------------------------------- the chart
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def draw_chart(points: Sequence[Point], fpr: float, match: MatchResult | None, header: Sequence[str] = (),
               guard_monitor: str = "guard"):
    """``header``: lines for the figure title (settings, caveats). Monitors get distinct markers
    and line styles and a small sideways offset, and the guard-alone line is drawn on top, so
    coinciding curves (e.g. every monitor at 0) stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import NullLocator

    groups = [OVERALL] + sorted({p.group for p in points if p.kind == "ood"})
    sizes = sorted({p.params for p in points})
    monitors = sorted({p.monitor for p in points}, key=lambda m: (m.count("+"), m))
    ncols = min(4, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    head_h = 0.22 * len(header) + (0.15 if header else 0.0)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows + head_h), squeeze=False, sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, group in zip(axes.flat, groups):
        for i, m in enumerate(monitors):
            curve = _curve(points, m, group)
            if not curve:
                continue
            dodge = 10 ** (0.025 * (i - (len(monitors) - 1) / 2))  # a few percent sideways on the log axis
            xs = [c[0] * dodge for c in curve]
            c = colors[i % len(colors)]
            top = m == guard_monitor
            ax.plot(xs, [c_[1] for c_ in curve], marker=_MARKERS[i % len(_MARKERS)], ls=_LINESTYLES[i % len(_LINESTYLES)],
                    color=c, label=m, zorder=5 if top else 3, lw=2.0 if top else 1.3, ms=7 if top else 5,
                    mfc="none" if top else c, mew=1.6 if top else 1.0)
            if all(c_[2] is not None for c_ in curve):
                ax.fill_between(xs, [c_[2] for c_ in curve], [c_[3] for c_ in curve], color=c, alpha=0.15, lw=0)
        if group == OVERALL and match is not None:
            ax.axhline(match.target, ls="--", color="grey", lw=1)
            if match.params_needed is not None:
                ax.plot([match.params_needed], [match.target], marker="*", ms=14, color="black",
                        label=f"guard match x{match.ratio:.1f}")
            ax.text(0.02, 0.97, match.sentence().split(": ", 1)[1], transform=ax.transAxes, fontsize=7,
                    va="top")
        ax.set_xscale("log")
        ax.set_title(group, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("parameters")
        # ticks at the sweep's sizes only (log-axis minor labels collide on short ranges)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks(sizes, [_short_count(x) for x in sizes], fontsize=8)
    top = max([p.tpr_hi if p.tpr_hi is not None else p.tpr for p in points if p.tpr is not None] + [0.05])
    axes.flat[0].set_ylim(-0.02, min(1.02, top * 1.1 + 0.03))
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(f"recall @ {fpr:g} FPR")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    total_h = 3.4 * nrows + head_h
    if header:
        fig.text(0.5, 1 - 0.08 / total_h, "\n".join(header), ha="center", va="top", fontsize=9)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1 - (head_h + 0.1) / total_h))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.1 * 3.4 * nrows / total_h,
                        top=1 - (head_h + 0.8) / total_h, wspace=0.08, hspace=0.45)
    return fig


def chart_header(folders: Sequence[EvalFolder], fpr: float) -> list[str]:
    """Title lines: what is plotted, the shared settings, and the caveats (eval.report.caveats)."""
    from .caveats import analysis_warnings, common_settings, headline

    metas, analyses = [f.meta for f in folders], [f.analysis for f in folders]
    lines = [f"Recall at {fpr:g} FPR vs parameters ({len({f.run for f in folders})} runs, "
             f"{len({f.monitor for f in folders})} monitors); bands: 95% bootstrap"]
    settings = common_settings(metas, analyses)
    if settings:
        lines.append(settings)
    caveats = headline([analysis_warnings(a, m) for a, m in zip(analyses, metas)])
    if caveats:
        lines.append("Caveats: " + "; ".join(caveats))
    return [textwrap.fill(line, 190) for line in lines]


def _short_count(x: float) -> str:
    """248k, 1.25M, 7.6B: parameter counts for tick labels."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:g}"


@dataclass(frozen=True)
class ChartOutput:
    points: list[Point]
    match: MatchResult | None
    files: dict[str, Path]


def make_chart(sweep_dir: str | os.PathLike, fpr: float = 0.01, out_dir: str | os.PathLike | None = None,
               guard_monitor: str = "guard", reference: str | None = None) -> ChartOutput:
    """Write ``<sweep>/chart/recall_vs_params.{png,svg,csv,md}`` and return the table + match."""
    sweep_dir = Path(sweep_dir)
    folders = find_eval_folders(sweep_dir)
    if not folders:
        raise MoodguardError(f"{sweep_dir}: no eval/<monitor>/analysis.json found")
    points = recall_points(folders, fpr)
    if not any(p.tpr is not None for p in points):
        raise MoodguardError(f"{sweep_dir}: no analysis.json reports TPR at FPR {fpr:g}")
    match = match_guard(points, guard_monitor, reference)
    out = Path(out_dir) if out_dir else sweep_dir / "chart"
    files = {ext: out / f"recall_vs_params.{ext}" for ext in ("png", "svg", "csv", "md")}
    fig = draw_chart(points, fpr, match, chart_header(folders, fpr), guard_monitor)
    for ext in ("png", "svg"):
        with atomic.atomic_path(files[ext]) as tmp:
            fig.savefig(tmp, format=ext, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic.write_text(files["csv"], table_csv(points))
    md = f"# Recall at {fpr:g} FPR vs parameters\n\n"
    if match is not None:
        md += f"**{match.sentence()}**\n\n"
    atomic.write_text(files["md"], md + table_markdown(points, fpr))
    return ChartOutput(points, match, files)


# --------------------------------------------------------------------------- wandb
def wandb_enabled(flag: bool | None, report_to: Iterable[str] | str | None = None) -> bool:
    """True when the user asked for wandb (flag or ``report_to``) and WANDB_MODE is not disabled."""
    if isinstance(report_to, str):
        report_to = [report_to]
    asked = bool(flag) or "wandb" in set(report_to or ())
    return asked and os.environ.get("WANDB_MODE", "").lower() != "disabled"


def log_to_wandb(name: str, tables: dict[str, tuple[list[str], list[list]]], images: dict[str, Path],
                 project: str = "moodguard", config: dict | None = None) -> bool:
    """Log tables and images to one wandb run; offline-safe, never fatal. Returns success."""
    try:
        import wandb

        run = wandb.init(project=project, name=name, job_type="sweep", config=config or {}, reinit="finish_previous",
                         mode=os.environ.get("WANDB_MODE") or "offline",
                         settings=wandb.Settings(init_timeout=60, silent=True))
        payload = {k: wandb.Table(columns=cols, data=rows) for k, (cols, rows) in tables.items()}
        payload.update({k: wandb.Image(str(p)) for k, p in images.items() if Path(p).is_file()})
        run.log(payload)
        run.finish()
        return True
    except Exception as exc:  # noqa: BLE001  (logging must never break a sweep)
        print(f"moodguard: wandb logging skipped ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return False


def log_chart_to_wandb(chart: ChartOutput, name: str) -> bool:
    cols = list(Point.__dataclass_fields__)
    rows = [[getattr(p, c) for c in cols] for p in chart.points]
    return log_to_wandb(name, {"recall_vs_params": (cols, rows)}, {"recall_vs_params_chart": chart.files["png"]})
