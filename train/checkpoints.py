"""Which checkpoint a training run may continue from (and whether it may start at all).

* ``<output_dir>/checkpoints/<adapter>/recipe.json`` records the training-relevant part of the
  recipe that wrote the checkpoints (:func:`training_fingerprint`). ``--resume`` refuses
  checkpoints whose recorded recipe differs from the current one, naming the first differing
  key (a later resume must not silently train with another learning rate).
* ``--resume`` continues from the newest checkpoint that is complete AND readable: a newest
  checkpoint that is corrupt (unparsable ``trainer_state.json``, an empty or broken
  safetensors file) is skipped with one warning line for the previous good one.
* Without ``--resume``, existing checkpoints are an error (like the ``run_*.py`` scripts of
  transformers, which refuse a non-empty output_dir without ``--overwrite_output_dir``): the
  message says to pass ``--resume`` or to delete the folder. Training never silently restarts
  from step 0 over an earlier run's checkpoints.
* The final adapter is staged in a per-run folder (``.<adapter>.<token>.staging``), never a
  fixed shared name.
"""
from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

from mood_data.errors import OutputError, RecipeError
from mood_data.readers import loads_json, short_repr

RECIPE_FILE = "recipe.json"
# section keys that do not change what is trained (book-keeping, scheduling of saves/logs)
_NOT_TRAINING = ("enabled", "parallel_members", "save_steps", "save_total_limit", "logging_steps", "eval_steps")


def training_fingerprint(recipe, kind: str) -> dict[str, Any]:
    """What determines the weights of ``kind``'s adapter: the base model, tokenizer, dtype,
    data settings and the training section (minus book-keeping keys)."""
    d = recipe.to_dict()
    sec = {k: v for k, v in d[kind].items() if k not in _NOT_TRAINING}
    return {"model": d["model"], "tokenizer": d["tokenizer"], "dtype": d["dtype"], "data": d["data"], kind: sec}


def with_new_key_defaults(old: dict, recipe, kind: str) -> dict:
    """A record written before a section key existed (e.g. ``guard.init_head``) trained with that
    key's default: the missing keys of its section read as their defaults, so such checkpoints
    still resume with a recipe that leaves the new keys at their defaults."""
    import dataclasses

    sec = old.get(kind)
    if not isinstance(sec, dict):
        return old
    defaults = dataclasses.asdict(type(recipe.section(kind))())
    return {**old, kind: {**{k: v for k, v in defaults.items() if k not in _NOT_TRAINING}, **sec}}


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(dict.fromkeys([*old, *new])):
            hit = _first_difference(old.get(k), new.get(k), f"{prefix}{k}.")
            if hit:
                return hit
        return None
    if old != new:
        return f"key '{prefix.rstrip('.')}': {short_repr(old)} in the checkpoints, {short_repr(new)} now"
    return None


def checkpoint_steps(ckpt_dir: Path) -> list[Path]:
    """``checkpoint-N`` folders, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from (None when it looks complete and readable)."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return "incomplete (no trainer_state.json: killed while saving?)"
    try:
        doc = loads_json(state.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or not isinstance(doc.get("global_step"), int):
            return "trainer_state.json has no global_step"
    except (OSError, ValueError) as exc:  # not UTF-8 / not JSON / refused are ValueErrors
        return f"trainer_state.json unreadable ({type(exc).__name__})"
    weights = sorted(ckpt.glob("*.safetensors"))
    for w in weights:
        if w.stat().st_size == 0:
            return f"{w.name} is empty"
        try:
            from safetensors import safe_open

            with safe_open(str(w), framework="np") as fh:
                list(fh.keys())
        except Exception as exc:  # safetensors' own error types
            return f"{w.name} unreadable ({' '.join(str(exc).split())[:80] or type(exc).__name__})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if (ckpt / name).is_file() and (ckpt / name).stat().st_size == 0:
            return f"{name} is empty"
    return None


def resume_point(recipe, kind: str, ckpt_dir: Path, resume: bool, *, main_process: bool = True) -> str | None:
    """The checkpoint to pass to ``Trainer.train(resume_from_checkpoint=...)`` (None = step 0),
    after the checks of the module docstring. Records the recipe fingerprint for later resumes
    (main process only)."""
    steps = checkpoint_steps(ckpt_dir)
    current = training_fingerprint(recipe, kind)
    record = ckpt_dir / RECIPE_FILE
    where = f"{recipe.source_file}: key 'output_dir'"
    if steps and not resume:
        raise OutputError(f"{ckpt_dir}: holds {len(steps)} checkpoint(s) of an earlier run (newest {steps[0].name}); "
                          f"pass --resume to continue it, or delete {ckpt_dir} to start over")
    chosen = None
    if steps:
        if record.is_file():
            try:
                old = loads_json(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):  # unreadable, not UTF-8, not JSON, refused (DocumentRefused)
                old = None
            diff = (_first_difference(with_new_key_defaults(old, recipe, kind), current) if isinstance(old, dict)
                    else "its recipe record is unreadable")
            if diff:
                raise RecipeError(f"{where}: --resume refused: {ckpt_dir} was written by a different recipe ({diff}); "
                                  "resume with the same recipe, or train into another output_dir")
        for ckpt in steps:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                chosen = str(ckpt)
                break
            if main_process:
                print(f"moodguard: warning: {ckpt}: skipped for resuming: {problem}", file=sys.stderr)
    if main_process:
        from mood_data.atomic import write_json

        write_json(record, current)
    return chosen


def staging_dir(out_root: Path, name: str, accelerator=None) -> Path:
    """A per-run staging folder for the final adapter (the same path on every rank)."""
    token = [secrets.token_hex(6)]
    if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(token, from_process=0)
    return out_root / f".{name}.{token[0]}.staging"


__all__ = ["RECIPE_FILE", "checkpoint_problem", "checkpoint_steps", "resume_point", "staging_dir",
           "training_fingerprint"]
