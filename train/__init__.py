"""Training: guard, causal-LM and judge LoRA adapters from recipes (transformers.Trainer + peft).

Public API (what a notebook needs; imported lazily so ``import train`` stays light)::

    from train import load_recipe, train_guard, train_lm
    recipe = load_recipe("recipes/tiny/s.yaml", ["guard.max_steps=5"])
    train_guard(recipe)              # <run>/guard/
    train_lm(recipe)                 # <run>/lm/

``run_training`` trains the way ``moodguard train`` does (parallel members / accelerate launch /
in-process); ``train_validation_cut`` is the one seeded train/validation cut (the detector table
and the monitor-name parser are the evaluation's: :mod:`eval.engine.table`).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Recipe": "train.recipe_schema", "load_recipe": "train.recipe",
    "train_guard": "train.guard", "train_lm": "train.lm", "train_judge": "train.judge",
    "run_training": "train.launch", "train_validation_cut": "train.data",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
