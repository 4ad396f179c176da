"""Arguments shared by several commands (fit, evaluate, export): ``--recipe``,
``--predict-safe`` and ``key=value`` overrides, and the one place they become a Recipe."""
from __future__ import annotations

import argparse


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """``--recipe``, ``--predict-safe`` and ``key=value`` overrides (shared by fit/evaluate/export)."""
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/<family>/<size>.yaml)")
    p.add_argument("--predict-safe", action="store_true",
                   help="the guard head outputs a 'safe' score (mood-bench's released adapters): flip it")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. eval.batch_size=4")


def recipe_from_args(args):
    """The recipe of ``--recipe`` + overrides, loaded and validated once for this command."""
    from train.recipe import load_recipe

    return load_recipe(args.recipe, args.overrides)
