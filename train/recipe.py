"""Recipes: one YAML file per backbone size that configures the guard, the causal-LM adapter
and the evaluation. The one loader, :func:`load_recipe`; the jobs it runs have their modules:

* :mod:`train.recipe_files` -- the ``base:`` chain, deep merge, ``key=value`` overrides and the
  origin (file) of every key;
* :mod:`train.recipe_schema` -- the typed sections, every field with its help text;
* :mod:`train.recipe_typing` -- the typed parser (one-line errors naming file and key) and
  :func:`explain` rows;
* :mod:`train.recipe_checks` -- the value checks (ranges, combinations, size bounds).

Every problem raises :class:`~mood_data.errors.RecipeError` with one line naming the file that
set the key and the dotted key, e.g. ``recipes/qwen2.5/7b.yaml: key 'guard.lerning_rate':
unknown key``. The loaded :class:`Recipe` is the configuration of a command's entry point; the
library below it receives plain values resolved from it (training sections, or the evaluation's
context: :mod:`eval.run.context`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable

from .recipe_checks import check_recipe
from .recipe_files import display_path, recipe_name, resolve_mapping
from .recipe_schema import Recipe
from .recipe_typing import Explained, build, explain_values, where

_WARNED_TRUST: set[str] = set()


def trust_remote_code_setting(requested: bool, asked: bool, where: str) -> bool:
    """``trust_remote_code`` is on only when the person running the command asks for it
    (``--trust-remote-code``); a recipe key alone never turns it on (``requested``). A recipe that
    sets it gets ONE warning per file and process: ignored without the flag, or a reminder that
    the model's own Python code will run."""
    if requested and where not in _WARNED_TRUST:
        _WARNED_TRUST.add(where)
        if asked:
            note = "the model's own Python code will run (--trust-remote-code given)"
        else:
            note = "ignored: a recipe never turns it on; pass --trust-remote-code to run the model's own code"
        print(f"moodguard: warning: {where}: key 'trust_remote_code': {note}", file=sys.stderr)
    return bool(asked)


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = (), *, trust_remote_code: bool = False) -> Recipe:
    """Resolve inheritance and overrides, validate, and return the typed :class:`Recipe`
    (``recipe.origins``: the file or override that set each key).

    ``trust_remote_code`` is the caller's explicit consent (the CLI's ``--trust-remote-code``);
    the recipe's own ``trust_remote_code`` key only triggers a warning (see
    :func:`trust_remote_code_setting`)."""
    path = Path(path)
    merged, origin = resolve_mapping(path, list(overrides))
    shown = display_path(path)
    recipe = build(Recipe, merged, "", origin, shown)
    check_recipe(recipe, origin, shown)
    recipe.trust_remote_code = trust_remote_code_setting(recipe.trust_remote_code, trust_remote_code,
                                                         where("trust_remote_code", origin, shown))
    if recipe.name is None:
        recipe.name = recipe_name(path)
        origin["name"] = f"the path of {shown}"
    if recipe.output_dir is None:
        recipe.output_dir = str(Path("runs") / recipe.name)
        origin["output_dir"] = "default (runs/<name>)"
    recipe.source_file = str(path.resolve())
    recipe.origins = origin
    return recipe


def explain(recipe: Recipe) -> list[Explained]:
    """Each resolved value of ``recipe`` with its help text and the file that set it
    (``moodguard recipes show R --explain``)."""
    return explain_values(recipe, recipe.origins)


__all__ = ["explain", "load_recipe", "trust_remote_code_setting"]
