"""``moodguard fit --recipe R [k=v ...]``: fit detector statistics on the train split (cached)."""
from __future__ import annotations

import argparse

from .cli_common import add_recipe_arguments, recipe_from_args


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")


def run(args) -> int:
    from eval.monitor import fit_detectors

    recipe = recipe_from_args(args)
    out = fit_detectors(recipe, source=args.source, predict_safe=args.predict_safe)
    for kind, per_layer in out["stats"].items():
        for layer, d in per_layer.items():
            print(f"{kind:5s} layer {layer:>3}: {d}")
    print(f"calibration (ID validation scores): {out['calibration']}")
    return 0
