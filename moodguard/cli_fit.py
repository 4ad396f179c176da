"""``moodguard fit --recipe R [--device D] [--num-processes N] [k=v ...]``: fit detector
statistics on the train split (cached)."""
from __future__ import annotations

import argparse

from .cli_common import add_parallel_argument, add_recipe_arguments, context_from_args, parallel_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    add_parallel_argument(p)
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")
    p.add_argument("--monitors", default=None,
                   help="comma-separated monitors to fit for (default: the recipe's eval.monitors, which it "
                        "replaces); fitted detectors (maha, knn) no monitor uses are not fitted")


def run(args) -> int:
    import json

    if args.monitors:  # through the recipe's own check, as evaluate does
        args.overrides = [*args.overrides, "eval.monitors=" + json.dumps([m for m in args.monitors.split(",") if m.strip()])]
    from mood_data.runlock import output_lock

    ctx = context_from_args(args)  # resolved (and validated) once, before any launch
    with output_lock(ctx.model.run_root, "output_dir"):  # the launched ranks inherit the lock
        return parallel_run(args, lambda: _fit(ctx))


def _fit(ctx) -> int:
    from eval.engine.parallel import main_print
    from eval.run.fitting import run_fit

    out = run_fit(ctx)
    for kind, per_layer in out["stats"].items():
        for layer, d in per_layer.items():
            main_print(f"{kind:5s} layer {layer:>3}: {d}")
    main_print(f"calibration (ID validation scores): {out['calibration']}")
    return 0
