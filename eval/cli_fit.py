"""``moodguard fit --recipe R [k=v ...]``: fit detector statistics on the train split (cached)."""
from __future__ import annotations

import argparse


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """``--recipe``, ``--predict-safe`` and ``key=value`` overrides (shared by fit/evaluate/export)."""
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/<family>/<size>.yaml)")
    p.add_argument("--predict-safe", action="store_true",
                   help="the guard head outputs a 'safe' score (mood-bench's released adapters): flip it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. eval.batch_size=4")


def recipe_from_args(args):
    from train.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")


def run(args) -> int:
    from .monitor import fit_detectors

    recipe = recipe_from_args(args)
    out = fit_detectors(recipe, source=args.source, predict_safe=args.predict_safe)
    for kind, per_layer in out["stats"].items():
        for layer, d in per_layer.items():
            print(f"{kind:5s} layer {layer:>3}: {d}")
    print(f"calibration (ID validation scores): {out['calibration']}")
    return 0
