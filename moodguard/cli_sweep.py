"""``moodguard sweep | chart | report | compare | demo`` (thin wrappers; logic in moodguard.sweep_*,
eval.report.scaling, eval.report.report, eval.report.compare)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from mood_data.errors import MoodguardError


def _fpr(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"FPR must be in (0, 1), got {v}")
    return v


# --------------------------------------------------------------------------- sweep
def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML, e.g. recipes/sweeps/embedded.yaml")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/<sweep name>)")
    p.add_argument("--emit", choices=("slurm", "shell"), help="write slurm job scripts / print commands instead of running")
    p.add_argument("--only", metavar="STAGE", help="run only this stage: train-guard, train-lm, fit, evaluate")
    p.add_argument("--run", action="append", metavar="NAME", help="restrict to these runs (repeatable)")
    p.add_argument("--mark-done", action="store_true", help="record the selected stages as finished (used by slurm jobs)")
    p.add_argument("--fpr", type=_fpr, help="FPR of the chart (default: the sweep's chart.fpr)")
    p.add_argument("--wandb", action="store_true", help="log the stage table and the chart to wandb")
    p.add_argument("--domains", metavar="YAML", default=None,
                   help="domains YAML declaring custom ID/OOD domains for every run (same as data.registry=YAML)")


def _sweep_and_dir(path: str, out: str | None, domains: str | None = None):
    import dataclasses

    from mood_data.domains import registry_override

    from .sweep_file import load_sweep

    sweep = load_sweep(path)
    if domains:
        sweep = dataclasses.replace(sweep, overrides=(*sweep.overrides, *registry_override(domains)))
    return sweep, Path(out or Path("runs") / "sweeps" / sweep.name).resolve()


def run_sweep_command(sweep_path: str, out: str | None = None, emit: str | None = None, only: str | None = None,
                      runs=None, mark_done: bool = False, fpr: float | None = None, wandb: bool = False,
                      domains: str | None = None) -> Path:
    from eval.report.scaling import wandb_enabled

    from .sweep_emit import emit_shell, emit_slurm
    from .sweep_plan import plan_sweep, select
    from .sweep_run import finish, prepare_out_dir, run_stages

    sweep, out_dir = _sweep_and_dir(sweep_path, out, domains)
    stages = select(plan_sweep(sweep, out_dir), only, runs)
    if emit == "shell":
        print(emit_shell(sweep, stages, out_dir), end="")
        return out_dir
    prepare_out_dir(sweep, out_dir)
    if emit == "slurm":
        submit = emit_slurm(sweep, stages, out_dir)
        print(f"wrote {len(stages) + 1} job scripts; submit with: bash {submit}")
        return out_dir
    t0 = time.perf_counter()
    res = run_stages(stages, out_dir, mark_only=mark_done)
    print(f"sweep {sweep.name}: ran {len(res.ran)}, skipped {len(res.skipped)} stage(s) in {time.perf_counter() - t0:.1f}s")
    if only is None and not runs and not mark_done:
        files = finish(sweep, out_dir, wandb=wandb_enabled(wandb or sweep.wandb), fpr=fpr)
        print(f"chart: {files['chart.png']}\nreport: {files['html']}")
    return out_dir


def run_sweep(args) -> int:
    run_sweep_command(args.sweep, args.out, args.emit, args.only, args.run, args.mark_done, args.fpr, args.wandb,
                      args.domains)
    return 0


# --------------------------------------------------------------------------- chart
def add_chart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_dir", help="sweep folder (run folders with eval/<monitor>/analysis.json)")
    p.add_argument("--fpr", type=_fpr, default=0.01, help="FPR at which recall is read (default 0.01)")
    p.add_argument("--guard", default="guard", help="the guard-alone monitor (default: guard)")
    p.add_argument("--reference", help="guard+OOD monitor to match (default: best at the smallest size)")
    p.add_argument("--wandb", action="store_true", help="log the table and the chart to wandb")


def run_chart(args) -> int:
    from eval.report.scaling import log_chart_to_wandb, make_chart, wandb_enabled

    from eval.report.cost import make_cost_chart

    chart = make_chart(args.sweep_dir, fpr=args.fpr, guard_monitor=args.guard, reference=args.reference)
    print(chart.match.sentence() if chart.match else "no guard-alone monitor in the sweep: nothing to match")
    cost = make_cost_chart(args.sweep_dir, fpr=args.fpr, out_dir=chart.files["png"].parent, required=False)
    for f in [*chart.files.values(), *(cost.files.values() if cost else ())]:
        print(f"wrote {f}")
    if wandb_enabled(args.wandb):
        log_chart_to_wandb(chart, f"{Path(args.sweep_dir).resolve().name}-chart")
    return 0


# --------------------------------------------------------------------------- report
def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="a run root, a sweep folder or one eval/<monitor> folder")
    p.add_argument("--fpr", type=_fpr, default=0.01, help="FPR of the chart and the cost table (default 0.01)")
    p.add_argument("--gpu-hour-cost", type=float, default=None, help="USD per GPU-hour, applied to GPU runs only (default 2.0)")
    p.add_argument("--cpu-hour-cost", type=float, default=None,
                   help="USD per CPU-hour to price CPU runs at (default: CPU runs are not priced)")
    p.add_argument("--out", help="folder for report.html/report.md (default: ROOT)")
    p.add_argument("--embed-plots", action=argparse.BooleanOptionalAction, default=None,
                   help="embed every per-group plot (a self-contained page) / link them; default: embed "
                        "only while they total under 1 MB")


def run_report(args) -> int:
    from eval.report.report import DEFAULT_GPU_HOUR_COST, write_report

    cost = DEFAULT_GPU_HOUR_COST if args.gpu_hour_cost is None else args.gpu_hour_cost
    files = write_report(args.root, fpr=args.fpr, gpu_hour_cost=cost, out_dir=args.out,
                         cpu_hour_cost=args.cpu_hour_cost, embed_plots=args.embed_plots)
    print(f"report: {files['html']}\nmarkdown: {files['md']}")
    return 0


# --------------------------------------------------------------------------- compare
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("old", help="old eval folder, run root or sweep folder")
    p.add_argument("new", help="new eval folder, run root or sweep folder")
    p.add_argument("--fpr", type=_fpr, default=0.01, help="fixed FPR (default 0.01)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 1 when a domain regressed, or when a group of OLD could not be compared (NaN, no "
                        "ID-safe rows, missing in NEW): nothing compared is never a pass")
    p.add_argument("--domains", metavar="YAML", default=None,
                   help="the domains YAML the runs were evaluated with (custom ID domains hold the negatives)")


def run_compare(args) -> int:
    import sys

    from eval.report.compare import compare_roots, format_deltas, gate_failures
    from mood_data.domains import load_registry

    registry = load_registry(args.domains)  # before any folder is read: a bad file is one line
    deltas = compare_roots(args.old, args.new, fpr=args.fpr, n_boot=args.n_boot, seed=args.seed, registry=registry)
    print(format_deltas(deltas, args.fpr), end="")
    failed = gate_failures(deltas)
    if args.fail_on_regression and failed:
        n_reg = sum(d.regressed for d in failed)
        named = "; ".join(f"{d.monitor + ':' if d.monitor else ''}{d.group}: "
                          f"{'regressed' if d.regressed else d.note or 'NaN'}" for d in failed[:3])
        print(f"moodguard compare: failing (--fail-on-regression): {n_reg} regressed, {len(failed) - n_reg} not "
              f"compared ({named}{'; ...' if len(failed) > 3 else ''})", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- demo
def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="sweep folder (default: runs/demo or runs/demo-smoke)")
    p.add_argument("--smoke", action="store_true", help="the CI version: much smaller data, fewer steps")


def run_demo(args) -> int:
    from train.recipe_files import RECIPES_DIR

    name = "embedded-smoke" if args.smoke else "embedded"
    sweep = RECIPES_DIR / "sweeps" / f"{name}.yaml"
    if not sweep.is_file():
        raise MoodguardError(f"{sweep}: sweep file not found (is the package installed from the repo?)")
    t0 = time.perf_counter()
    out_dir = run_sweep_command(str(sweep), args.out or f"runs/demo{'-smoke' if args.smoke else ''}")
    print(f"demo finished in {time.perf_counter() - t0:.0f}s; open {out_dir / 'report.html'}")
    return 0
