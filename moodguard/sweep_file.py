"""The sweep file (docs/sweeps.md): a list of recipes with overrides and seeds, the monitors, the
chart FPR and Slurm options; ``base:`` inheritance between sweep files. One-line RecipeErrors."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from eval.engine.table import parse_monitors
from mood_data.errors import RecipeError
from mood_data.readers import read_yaml
from train.recipe_schema import EvalSection

DEFAULT_MONITORS: tuple[str, ...] = tuple(EvalSection().monitors)  # the recipe default, one place
_SWEEP_KEYS = {"base", "name", "recipes", "monitors", "overrides", "chart", "slurm", "wandb", "description"}
_ENTRY_KEYS = {"path", "name", "overrides", "seeds"}


@dataclass(frozen=True)
class SweepEntry:
    """One run of the sweep: a recipe file, its overrides (``k=v``) and an optional seed."""

    recipe: Path
    overrides: tuple[str, ...] = ()
    name: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    entries: tuple[SweepEntry, ...]
    monitors: tuple[str, ...] = DEFAULT_MONITORS
    overrides: tuple[str, ...] = ()
    chart_fpr: float = 0.01
    slurm: Mapping[str, Any] = field(default_factory=dict)
    wandb: bool = False


def _override_strings(value: Any, where: str) -> tuple[str, ...]:
    """A mapping ``{dotted.key: value}`` or a list of ``"k=v"`` strings -> ``("k=v", ...)``."""
    if value is None:
        return ()
    if isinstance(value, list):
        if not all(isinstance(v, str) and "=" in v for v in value):
            raise RecipeError(f"{where}: expected a list of 'key=value' strings or a mapping")
        return tuple(value)
    if isinstance(value, dict):
        return tuple(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in value.items())
    raise RecipeError(f"{where}: expected a mapping of dotted keys to values, got {type(value).__name__}")


def resolve_recipe_path(text: str, sweep_file: Path) -> Path:
    """Absolute paths as given; relative ones against the cwd, then the repo root, then the sweep file."""
    from train.recipe_files import REPO_ROOT

    p = Path(text)
    if p.is_absolute():
        return p
    for base in (Path.cwd(), REPO_ROOT, sweep_file.parent):
        if (base / p).is_file():
            return (base / p).resolve()
    return (REPO_ROOT / p).resolve()


def _sweep_doc(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The sweep mapping with its ``base:`` chain applied: a sweep inherits every key of its
    base (a path relative to itself) except ``name``; its own keys replace the base's, and
    ``overrides`` are concatenated (base first, so the sweep's own win)."""
    doc = read_yaml(path, RecipeError, what="sweep file")
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}: expected a mapping with keys {sorted(_SWEEP_KEYS)}")
    for key in doc:
        if key not in _SWEEP_KEYS:
            raise RecipeError(f"{path}: key '{key}': unknown key (allowed: {', '.join(sorted(_SWEEP_KEYS))})")
    base = doc.pop("base", None)
    if base is None:
        return doc
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{path}: key 'base': expected a path to another sweep file")
    bpath = path.parent / base
    if not bpath.is_file():
        raise RecipeError(f"{path}: key 'base': base file not found: {base}")
    if bpath.resolve() in seen + (path.resolve(),):
        raise RecipeError(f"{path}: key 'base': inheritance cycle through {base}")
    parent = _sweep_doc(bpath, seen + (path.resolve(),))
    parent.pop("name", None)
    merged = {**parent, **doc}
    if "overrides" in parent and "overrides" in doc:
        merged["overrides"] = list(_override_strings(parent["overrides"], f"{bpath}: key 'overrides'")
                                   + _override_strings(doc["overrides"], f"{path}: key 'overrides'"))
    # recipe paths in the base stay relative to the base file
    if "recipes" in parent and "recipes" not in doc:
        merged["recipes"] = [_rebase_entry(item, bpath) for item in parent["recipes"]]
    return merged


def _rebase_entry(item: Any, base_file: Path) -> Any:
    """A base sweep's recipe entry with its path resolved against the base file."""
    if isinstance(item, str):
        return str(resolve_recipe_path(item, base_file))
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        return {**item, "path": str(resolve_recipe_path(item["path"], base_file))}
    return item


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Parse and check a sweep YAML (format in docs/sweeps.md); one-line RecipeErrors."""
    path = Path(path)
    doc = _sweep_doc(path)
    recipes = doc.get("recipes")
    if not isinstance(recipes, list) or not recipes:
        raise RecipeError(f"{path}: key 'recipes': expected a non-empty list")
    entries = []
    for i, item in enumerate(recipes):
        where = f"{path}: key 'recipes[{i}]'"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise RecipeError(f"{where}: expected a recipe path or a mapping with 'path'")
        for key in item:
            if key not in _ENTRY_KEYS:
                raise RecipeError(f"{where}.{key}: unknown key (allowed: {', '.join(sorted(_ENTRY_KEYS))})")
        recipe = resolve_recipe_path(item["path"], path)
        overrides = _override_strings(item.get("overrides"), f"{where}.overrides")
        seeds = item.get("seeds")
        if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or not seeds):
            raise RecipeError(f"{where}.seeds: expected a non-empty list of integers")
        for seed in seeds or [None]:
            entries.append(SweepEntry(recipe, overrides, item.get("name"), seed))
    monitors = doc.get("monitors", list(DEFAULT_MONITORS))
    if not isinstance(monitors, list) or not monitors or not all(isinstance(m, str) and m for m in monitors):
        raise RecipeError(f"{path}: key 'monitors': expected a non-empty list of monitor names")
    try:
        monitors = parse_monitors(monitors)  # the detector table's one parser
    except RecipeError as err:
        raise RecipeError(f"{path}: key 'monitors': {err}") from None
    chart = doc.get("chart") or {}
    fpr = chart.get("fpr", 0.01) if isinstance(chart, dict) else None
    if not isinstance(fpr, (int, float)) or not 0 < fpr < 1:
        raise RecipeError(f"{path}: key 'chart.fpr': expected a number in (0, 1)")
    slurm = doc.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise RecipeError(f"{path}: key 'slurm': expected a mapping of sbatch options")
    return Sweep(
        name=str(doc.get("name") or path.stem), path=path.resolve(), entries=tuple(entries),
        monitors=tuple(monitors), overrides=_override_strings(doc.get("overrides"), f"{path}: key 'overrides'"),
        chart_fpr=float(fpr), slurm=slurm, wandb=bool(doc.get("wandb", False)),
    )


__all__ = ["DEFAULT_MONITORS", "Sweep", "SweepEntry", "load_sweep", "resolve_recipe_path"]
