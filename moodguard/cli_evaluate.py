"""``moodguard evaluate --recipe R [--monitors guard,guard+maha] [--source S] [k=v ...]``."""
from __future__ import annotations

import argparse

from eval.engine.planner import help_text

from .cli_common import add_parallel_argument, add_recipe_arguments, context_from_args, parallel_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    add_parallel_argument(p)
    p.add_argument("--monitors", default=None,
                   help="comma-separated monitors: detectors joined by '+', first = anchor "
                        f"({help_text()}); checked like the recipe's eval.monitors (it replaces them)")
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the intervals (default 1000)")
    p.add_argument("--no-plots", action="store_true", help="skip the per-group histogram / ROC plots")
    p.add_argument("--calibration-split", choices=("test", "validation"), default=None,
                   help="where thresholds come from: 'test' = the test ID-safe rows (mood-bench's convention, the "
                        "default) or 'validation' = the held-out ID validation slice the fusion is fitted on "
                        "(recipe key eval.calibration_split)")


def table(analyses: dict[str, dict], fpr: float = 0.01) -> str:
    """Compact per-domain TPR@fpr table: one row per group, one column per monitor."""
    from eval.engine.metrics import per_domain_table

    rows = {m: {r["group"]: r["tpr"] for r in per_domain_table(a, fpr)} for m, a in analyses.items()}
    groups = list(dict.fromkeys(g for r in rows.values() for g in r))
    names = list(analyses)
    width = max([len(g) for g in groups] + [8])
    head = f"{'TPR@' + format(fpr * 100, 'g') + '%FPR':<{width}}  " + "  ".join(f"{m:>{max(len(m), 6)}}" for m in names)
    lines = [head]
    for g in groups:
        cells = []
        for m in names:
            v = rows[m].get(g)
            cells.append(f"{'-' if v is None else format(v, '.3f'):>{max(len(m), 6)}}")
        lines.append(f"{g:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def run(args) -> int:
    import json

    from mood_data.errors import MoodguardError
    from mood_data.runlock import output_lock

    if args.monitors is not None and not [m for m in args.monitors.split(",") if m.strip()]:
        raise MoodguardError(f"--monitors: empty list {args.monitors!r} (give e.g. guard,guard+maha; omit the "
                             "flag for the recipe's eval.monitors)")
    if args.n_boot < 0:
        raise MoodguardError(f"--n-boot: must be >= 0, got {args.n_boot}")
    if args.monitors:  # through the recipe's own check: eval.monitors=[...] as one more override
        args.overrides = [*args.overrides, "eval.monitors=" + json.dumps([m for m in args.monitors.split(",") if m.strip()])]
    ctx = context_from_args(args)  # resolved (and validated) once, before any launch
    with output_lock(ctx.model.run_root, "output_dir"):  # the launched ranks inherit the lock
        return parallel_run(args, lambda: _evaluate(args, ctx))


def _evaluate(args, ctx) -> int:
    import json

    from eval.engine.parallel import main_print
    from eval.run.evaluate import run_evaluate

    folders = run_evaluate(ctx, n_boot=args.n_boot, plots=not args.no_plots)
    analyses = {m: json.loads((d / "analysis.json").read_text(encoding="utf-8")) for m, d in folders.items()}
    main_print(table(analyses, 0.01))
    for m, d in folders.items():
        main_print(f"{m}: {d}")
    return 0
