"""The cost-recall view: every single monitor and every cascade, overall recall at an FPR against
the measured seconds per conversation, one panel per backbone (run).

Reads only run folders (``analysis.json``, ``meta.json`` and a cascade's ``cascade.json``): a
cascade's point sits in the panel of the run holding it, next to its stages; a stage of another
run (a cross-backbone cascade) is drawn there too, labelled with its run. Writes
``cost_vs_recall.{png,svg,csv,md}``.
"""
from __future__ import annotations

import csv
import io
import math
import os
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from mood_data import atomic
from mood_data.errors import MoodguardError
from mood_data.readers import read_json

from ..engine.metrics import OVERALL, value_at_fpr
from .scaling import EvalFolder, find_eval_folders

CASCADE_FILE = "cascade.json"  # a cascade's eval folder (eval.run.cascade writes it)


@dataclass(frozen=True)
class CostPoint:
    panel: str  # the run (backbone) whose panel shows the point
    run: str  # the run the monitor belongs to
    monitor: str
    kind: str  # "monitor" or "cascade"
    seconds_per_conversation: float | None
    tpr: float | None
    tpr_lo: float | None
    tpr_hi: float | None
    escalation_rate: float | None  # cascades: share of the test rows leaving stage 1
    stages: str  # cascades: "guard > guard+maha+ppl"
    device: str | None

    @property
    def label(self) -> str:
        name = self.monitor if self.run == self.panel else f"{self.run}:{self.monitor}"
        if self.kind == "cascade" and self.escalation_rate is not None:
            return f"{name} ({self.stages}, {100 * self.escalation_rate:.0f}% escalated)"
        return name


def _point(f: EvalFolder, fpr: float, panel: str) -> CostPoint:
    overall = f.analysis.get(OVERALL) or {}
    ci = value_at_fpr(overall.get("tpr_ci", {}), fpr) or (None, None)
    cascade = f.path / CASCADE_FILE
    doc = read_json(cascade, MoodguardError) if cascade.is_file() else None
    esc = ((doc or {}).get("test") or {}).get("escalation_rate") or [None]
    secs = f.meta.get("seconds_per_conversation")
    return CostPoint(panel, f.run, f.monitor, "cascade" if doc else "monitor",
                     float(secs) if isinstance(secs, (int, float)) else None, value_at_fpr(overall.get("tpr", {}), fpr),
                     ci[0], ci[1], esc[0], " > ".join(s.get("label", "?") for s in (doc or {}).get("stages") or []),
                     f.meta.get("device"))


def cost_points(folders: Sequence[EvalFolder], fpr: float = 0.01) -> list[CostPoint]:
    """One point per eval folder in its run's panel, plus, in a cascade's panel, each stage of
    another run (read from the stage's eval folder, when it is there)."""
    points = [_point(f, fpr, f.run) for f in folders]
    seen = {(p.panel, str(f.path.resolve())) for p, f in zip(points, folders)}
    for f in folders:
        cascade = f.path / CASCADE_FILE
        if not cascade.is_file():
            continue
        for st in read_json(cascade, MoodguardError).get("stages") or []:
            if Path(str(st.get("run", ""))).name == f.path.parents[1].name:
                continue  # a stage of this run: its folder is among the run's own
            # where the evaluation found it, else beside this run (a sweep folder that moved)
            tries = [Path(str(st.get("eval_folder", ""))),
                     f.path.parents[2] / Path(str(st.get("run", ""))).name / "eval" / str(st.get("monitor", ""))]
            folder = next((t for t in tries if (t / "analysis.json").is_file()), None)
            if folder is None or (f.run, str(folder.resolve())) in seen:
                continue
            seen.add((f.run, str(folder.resolve())))
            points += [_point(g, fpr, f.run) for g in find_eval_folders(folder)]
    points.sort(key=lambda p: (p.panel, p.kind == "cascade", p.seconds_per_conversation or 0.0, p.monitor))
    return points


def table_csv(points: Sequence[CostPoint]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CostPoint.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: ("" if v is None else v) for k, v in asdict(p).items()})
    return buf.getvalue()


def _f(x, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table_markdown(points: Sequence[CostPoint], fpr: float) -> str:
    """Per panel: each point's cost, its cost and recall relative to the panel's most expensive
    single monitor of the panel's own run (the full monitor a cascade stands in for)."""
    lines = [f"| backbone | monitor | seconds / conversation | cost vs full | recall @ {fpr:g} FPR | 95% CI | "
             "recall vs full | escalated |", "|---|---|---:|---:|---:|---|---:|---:|"]
    for panel in dict.fromkeys(p.panel for p in points):
        mine = [p for p in points if p.panel == panel]
        singles = [p for p in mine if p.kind == "monitor" and p.run == panel and p.seconds_per_conversation]
        full = max(singles, key=lambda p: (p.seconds_per_conversation, p.monitor.count("+")), default=None)
        for p in mine:
            rel_cost = rel_tpr = None
            if full is not None and p.seconds_per_conversation is not None:
                rel_cost = p.seconds_per_conversation / full.seconds_per_conversation
            if full is not None and full.tpr and p.tpr is not None:
                rel_tpr = p.tpr / full.tpr
            ci = f"[{_f(p.tpr_lo, 3)}, {_f(p.tpr_hi, 3)}]" if p.tpr_lo is not None else ""
            esc = f"{100 * p.escalation_rate:.1f}%" if p.escalation_rate is not None else ""
            lines.append(f"| {panel} | {p.label} | {_f(p.seconds_per_conversation)} | "
                         f"{'' if rel_cost is None else f'{100 * rel_cost:.0f}%'} | {_f(p.tpr, 3)} | {ci} | "
                         f"{'' if rel_tpr is None else f'{100 * rel_tpr:.0f}%'} | {esc} |")
    return "\n".join(lines) + "\n"


def draw(points: Sequence[CostPoint], fpr: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(p.panel for p in points))
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    most = max(sum(p.panel == panel for p in points) for panel in panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, (3.4 + 0.16 * most) * nrows), squeeze=False,
                             sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, panels):
        mine = [p for p in points if p.panel == panel and p.tpr is not None and p.seconds_per_conversation]
        for i, p in enumerate(mine):
            cascade = p.kind == "cascade"
            c = colors[i % len(colors)]
            if p.tpr_lo is not None and p.tpr_hi is not None:
                ax.errorbar([p.seconds_per_conversation], [p.tpr], yerr=[[p.tpr - p.tpr_lo], [p.tpr_hi - p.tpr]],
                            color=c, lw=0.8, alpha=0.5, capsize=2)
            ax.plot([p.seconds_per_conversation], [p.tpr], marker="*" if cascade else ("s" if p.run != panel else "o"),
                    ms=13 if cascade else 7, color=c, ls="none", label=p.label, zorder=5 if cascade else 3)
        ax.set_xscale("log")
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(f"seconds per conversation ({', '.join(sorted({str(p.device) for p in mine}))})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)  # hides no point
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for row in axes:
        row[0].set_ylabel(f"overall recall @ {fpr:g} FPR")
    fig.suptitle(textwrap.fill(f"Cost vs recall: every monitor and cascade, overall recall at {fpr:g} FPR vs measured "
                               "seconds per conversation (bars: 95% bootstrap)", 60 * ncols), fontsize=9)
    fig.tight_layout()
    return fig


@dataclass(frozen=True)
class CostChart:
    points: list[CostPoint]
    files: dict[str, Path]


def make_cost_chart(root: str | os.PathLike, fpr: float = 0.01, out_dir: str | os.PathLike | None = None, *,
                    required: bool = True) -> CostChart | None:
    """Write ``<root>/chart/cost_vs_recall.{png,svg,csv,md}`` (or into ``out_dir``). Nothing to
    draw (no folder with a recall and a measured cost) is an error, or None when not ``required``."""
    root = Path(root)
    folders = find_eval_folders(root)
    points = cost_points(folders, fpr)
    if not any(p.tpr is not None and p.seconds_per_conversation for p in points):
        if not required:
            return None
        raise MoodguardError(f"{root}: no eval folder has both a recall at FPR {fpr:g} and a measured cost "
                             "(meta.json: seconds_per_conversation)")
    out = Path(out_dir) if out_dir else root / "chart"
    files = {ext: out / f"cost_vs_recall.{ext}" for ext in ("png", "svg", "csv", "md")}
    fig = draw(points, fpr)
    for ext in ("png", "svg"):
        with atomic.atomic_path(files[ext]) as tmp:
            fig.savefig(tmp, format=ext, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    atomic.write_text(files["csv"], table_csv(points))
    atomic.write_text(files["md"], f"# Cost vs recall at {fpr:g} FPR\n\n" + table_markdown(points, fpr))
    return CostChart(points, files)


__all__ = ["CostChart", "CostPoint", "cost_points", "make_cost_chart", "table_markdown"]
