"""Reading recipe files: the ``base:`` inheritance chain, deep merging, ``key=value`` overrides
and the origin of every key (which file, or which override, set it).

    recipes/_base.yaml  ->  recipes/<family>/_family.yaml  ->  recipes/<family>/<size>.yaml

Mappings are deep-merged (the child wins), lists and scalars are replaced. Overrides with dotted
keys (``guard.learning_rate=1e-4``) are applied last; values are parsed with
``yaml.safe_load``. Nothing here knows the schema (:mod:`train.recipe_schema`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from mood_data.errors import RecipeError
from mood_data.readers import YamlTooLarge, read_yaml, safe_load_bounded, short_repr

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO_ROOT / "recipes"
ACCELERATE_CONFIGS_DIR = REPO_ROOT / "accelerate_configs"


def display_path(path: str | os.PathLike) -> str:
    """``path`` relative to the working directory when it is below it (shorter messages)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def recipe_name(path: str | os.PathLike) -> str:
    """``recipes/qwen2.5/7b.yaml`` -> ``qwen2.5-7b``; a file elsewhere -> its stem."""
    p = Path(path).resolve()
    try:
        rel = p.relative_to(RECIPES_DIR)
        return "-".join(rel.with_suffix("").parts)
    except ValueError:
        return p.stem


def accelerate_config_path(name: str) -> Path:
    return ACCELERATE_CONFIGS_DIR / f"{name}.yaml"


def accelerate_config_names() -> list[str]:
    return sorted(p.stem for p in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))


def list_recipes(root: str | os.PathLike = RECIPES_DIR) -> list[Path]:
    """Every concrete recipe under ``root`` (files starting with ``_`` are bases; sweeps are
    another format)."""
    root = Path(root)
    return sorted(
        p for p in root.rglob("*.yaml")
        if not p.name.startswith("_") and "sweeps" not in p.relative_to(root).parts
    )


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: expected key=value (dotted keys, e.g. guard.learning_rate=1e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: empty key")
    try:
        parsed = safe_load_bounded(value) if value.strip() else None
    except YamlTooLarge as err:
        raise RecipeError(f"override {short_repr(text)}: value refused ({err})") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({type(err).__name__})") from None
    return key, parsed


def _read_yaml(path: Path, where: str) -> dict:
    if not path.is_file():
        raise RecipeError(f"{where}: recipe file not found: {display_path(path)}")
    data = read_yaml(display_path(path), RecipeError, what="recipe file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{display_path(path)}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base: dict, child: dict, base_origin: dict, child_file: str, prefix: str = "") -> tuple[dict, dict]:
    """Deep-merge ``child`` onto ``base``; returns (merged, origin) where origin maps every
    dotted key to the file that set it."""
    merged = dict(base)
    origin = dict(base_origin)
    for key, value in child.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            sub, origin = _merge(merged[key], value, origin, child_file, dotted + ".")
            merged[key] = sub
        else:
            for k in [k for k in origin if k == dotted or k.startswith(dotted + ".")]:
                del origin[k]
            merged[key] = value
        origin[dotted] = child_file
    return merged, origin


def _load_chain(path: Path, stack: tuple[Path, ...], where: str) -> tuple[dict, dict]:
    path = path.resolve()
    if path in stack:
        cycle = " -> ".join(display_path(p) for p in (*stack, path))
        raise RecipeError(f"{display_path(stack[-1])}: key 'base': inheritance cycle: {cycle}")
    data = _read_yaml(path, where)
    shown = display_path(path)
    base = data.pop("base", None)
    if base is None:
        parent, origin = {}, {}
    else:
        if not isinstance(base, str) or not base:
            raise RecipeError(f"{shown}: key 'base': expected a relative path string, got {short_repr(base)}")
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise RecipeError(f"{shown}: key 'base': base file not found: {display_path(base_path)}")
        parent, origin = _load_chain(base_path, (*stack, path), shown)
    return _merge(parent, data, origin, shown)


def resolve_mapping(path: str | os.PathLike, overrides: Iterable[str] = ()) -> tuple[dict, dict]:
    """The merged (not yet validated) mapping of a recipe and the origin of every key."""
    path = Path(path)
    merged, origin = _load_chain(path, (), "recipe")
    shown = display_path(path)
    for text in overrides:
        key, value = parse_override(text)
        parts = key.split(".")
        node = merged
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                if nxt is not None:
                    raise RecipeError(f"{shown}: key '{'.'.join(parts[: i + 1])}': override {text!r} descends into a non-mapping")
                nxt = node[part] = {}
            node = nxt
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]], origin = _merge(node[parts[-1]], value, origin, f"{shown} (override)", key + ".")
        else:
            node[parts[-1]] = value
        origin[key] = f"{shown} (override)"
    return merged, origin


__all__ = ["ACCELERATE_CONFIGS_DIR", "RECIPES_DIR", "REPO_ROOT", "accelerate_config_names", "accelerate_config_path",
           "display_path", "list_recipes", "parse_override", "recipe_name", "resolve_mapping"]
