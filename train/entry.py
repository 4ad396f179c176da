"""The ONE parser of a training command, shared by ``moodguard train <kind>`` and
``python -m train.<kind>`` (what ``accelerate launch`` and parallel members re-execute).

Both read the same arguments (:func:`add_train_arguments`) and turn the flags into the same
recipe overrides (:func:`recipe_overrides`), so the recipe a re-executed process loads is the
one the parent loaded and validated: it is loaded once per process and the child gets the
parent's override list verbatim. The module form adds ``--member`` (one seed member).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Callable, Sequence

KIND_HELP = {"guard": "the guard classifier (sequence classification)", "lm": "the causal-LM adapter",
             "judge": "the judge SFT LoRA (rubric prompts -> one answer token; needs judge.enabled=true)"}


def add_train_arguments(parser: argparse.ArgumentParser, *, member: bool = False) -> None:
    """The arguments of one training kind; ``member``: also ``--member SEED`` (the module form)."""
    parser.add_argument("--recipe", required=True, help="recipes/<family>/<size>.yaml")
    parser.add_argument("--accelerate-config", default=None, metavar="NAME",
                        help="accelerate_configs/<NAME>.yaml (default: the recipe's accelerate.config; 'none' = in-process)")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N", help="override the config's num_processes")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--device", default=None, metavar="cpu|cuda|cuda:N",
                        help="where to train (default: the GPUs when present, else the CPU)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own Python code (auto_map) to run; a recipe key alone never does")
    parser.add_argument("--parallel-members", type=int, default=None, metavar="N",
                        help="train N seed members at once, one process each (the section's parallel_members)")
    if member:
        parser.add_argument("--member", type=int, default=None, metavar="SEED",
                            help="train only this seed member of the seed list (what --parallel members run)")
    parser.add_argument("--domains", metavar="YAML", default=None,
                        help="domains YAML declaring custom ID/OOD domains (same as the override data.registry=YAML)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, e.g. guard.learning_rate=1e-4")


def recipe_overrides(kind: str, args: argparse.Namespace) -> list[str]:
    """The recipe overrides the arguments stand for (the flags become dotted overrides)."""
    from mood_data.domains import registry_override

    overrides = list(args.overrides) + registry_override(getattr(args, "domains", None))
    if args.num_processes is not None:
        overrides.append(f"accelerate.num_processes={args.num_processes}")
    if args.parallel_members is not None:
        overrides.append(f"{kind}.parallel_members={args.parallel_members}")
    if args.accelerate_config is not None:
        overrides.append(f"accelerate.config={'null' if args.accelerate_config == 'none' else args.accelerate_config}")
    return overrides


def apply_device(requested: str | None, recipe) -> None:
    """``--device``: set the environment that makes it hold here and in every launched rank
    (``train.distributed.training_device_environment``; a missing device is a RecipeError)."""
    if requested is None:
        return
    import os

    import torch

    from .distributed import training_device_environment

    procs = recipe.accelerate.num_processes if recipe.accelerate.config else 1
    os.environ.update(training_device_environment(requested, procs, torch.cuda.device_count()))


def module_parser(kind: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m train.{kind}", description=f"train {KIND_HELP[kind]}")
    add_train_arguments(p, member=True)
    return p


def module_main(kind: str, train_fn: Callable[..., Any], argv: Sequence[str] | None = None) -> int:
    """``python -m train.<kind>``: parse, load the recipe once, train in this process (a launched
    rank or a parallel member; it never re-launches)."""
    from mood_data.console import configure
    from mood_data.errors import MoodguardError

    from .distributed import EXIT_STOPPED, TrainingStopped
    from .loop import end_distributed
    from .recipe import load_recipe

    configure()  # the launching command's -v choice arrives through the environment
    from mood_data.children import PARENT_ENV, die_with_launcher

    if os.environ.get(PARENT_ENV) or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        die_with_launcher()  # a rank or member never outlives the command that started it

    from mood_data.runlock import output_lock

    args = module_parser(kind).parse_args(argv)
    ok = False
    try:
        recipe = load_recipe(args.recipe, recipe_overrides(kind, args), trust_remote_code=args.trust_remote_code)
        apply_device(args.device, recipe)
        # ranks > 0 of a direct `accelerate launch -m train.<kind>` write nothing: rank 0 locks
        # (a process we launched inherits its parent's lock through the environment)
        rank0 = os.environ.get("RANK", "0") == "0"
        with output_lock(recipe.output_dir, "output_dir") if rank0 else contextlib.nullcontext():
            train_fn(recipe, args.resume, None if args.member is None else [args.member])
        ok = True
    except MoodguardError as err:
        print(f"moodguard train {kind}: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as stop:
        ok = True  # every rank stopped at the same step: a clean teardown
        print(f"moodguard train {kind}: {stop}", file=sys.stderr)
        return EXIT_STOPPED
    finally:
        end_distributed(ok)
    return 0
