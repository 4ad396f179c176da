"""``moodguard recipes validate [PATHS]`` (default: every recipe under recipes/) and
``moodguard recipes show R [key=value ...] [--explain]`` (prints the resolved YAML; with
``--explain`` every resolved value with its help text and the file that set it)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mood_data.errors import MoodguardError, RecipeError

from train.recipe import explain
from train.recipe_files import RECIPES_DIR, display_path, list_recipes

from .cli_common import load_checked_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("validate", help="validate recipes (default: all under recipes/)")
    v.add_argument("paths", nargs="*", help="recipe files or folders")
    s = sub.add_parser("show", help="print the fully resolved recipe as YAML")
    s.add_argument("recipe")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--explain", action="store_true",
                   help="every resolved value with its help text and the file (or override) that set it")


def _expand(paths: list[str]) -> list[Path]:
    if not paths:
        return list_recipes(RECIPES_DIR)
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += list_recipes(p)
        elif p.is_file():
            out.append(p)
        else:
            raise RecipeError(f"{p}: recipe file not found")
    return out


def explained(recipe) -> str:
    """``key: value  # origin`` and an indented help line per resolved value."""
    import yaml

    lines = []
    for row in explain(recipe):
        value = yaml.safe_dump(row.value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        lines.append(f"{row.key}: {value}    # {row.origin}")
        if row.help:
            lines.append(f"    {row.help}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.action == "show":
        recipe = load_checked_recipe(args.recipe, args.overrides)
        sys.stdout.write(explained(recipe) if args.explain else recipe.to_yaml())
        return 0
    files = _expand(args.paths)
    errors = 0
    for path in files:
        try:
            load_checked_recipe(path)
            print(f"ok     {display_path(path)}")
        except MoodguardError as err:
            errors += 1
            print(f"moodguard recipes: error: {err}", file=sys.stderr)
    print(f"{len(files) - errors}/{len(files)} recipes valid")
    return 2 if errors else 0
