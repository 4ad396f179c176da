"""Arguments shared by several commands (fit, evaluate, export, score): ``--recipe``,
``--predict-safe``, ``key=value`` overrides and ``--device`` (the one place they become a
Recipe and, for the evaluation commands, the one resolved context), ``--num-processes`` and the
data-parallel wrapper of fit / evaluate / score."""
from __future__ import annotations

import argparse

CLI_MODULE = "moodguard.cli"  # what `--num-processes N` re-executes under `accelerate launch -m`


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """``--recipe``, ``--predict-safe`` and ``key=value`` overrides (shared by fit/evaluate/export)."""
    p.add_argument("--recipe", required=True, help="recipe YAML (recipes/<family>/<size>.yaml)")
    p.add_argument("--predict-safe", action="store_true",
                   help="the guard head outputs a 'safe' score (mood-bench's released adapters): flip it")
    p.add_argument("--domains", metavar="YAML", default=None,
                   help="domains YAML declaring custom ID/OOD domains (same as the override data.registry=YAML)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code (auto_map) to run; a recipe key alone never does")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. eval.batch_size=4")
    add_device_argument(p)


def add_device_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, metavar="D",
                   help="cpu, cuda or cuda:N (default: the accelerator when there is one; under accelerate launch "
                        "each rank's own GPU)")


def add_parallel_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="data-parallel over N processes (re-executes under accelerate launch: one GPU a rank, "
                        "gloo ranks on CPU); outputs equal one process's")


def check_num_processes(n: int | None) -> None:
    """``--num-processes`` is a positive number (0 or -2 was silently one process)."""
    from mood_data.errors import MoodguardError

    if n is not None and n < 1:
        raise MoodguardError(f"--num-processes {n}: expected a positive number of processes")


def parallel_run(args, body) -> int:
    """Run ``body()`` once per rank: re-execute under ``accelerate launch`` for
    ``--num-processes N``; inside a launch, join its process group (rank 0 writes)."""
    from eval.engine import parallel

    check_num_processes(getattr(args, "num_processes", None))
    if parallel.wants_relaunch(getattr(args, "num_processes", None)):
        return parallel.relaunch(CLI_MODULE, args._argv, args.num_processes, args.device)
    parallel.start(args.device)
    ok = False
    try:
        rc = body()
        ok = rc == 0
        return rc
    finally:
        if parallel.launched():
            parallel.finish(ok)


def load_checked_recipe(path, overrides=(), *, trust_remote_code: bool = False):
    """A recipe loaded and checked whole: its values (:func:`train.recipe.load_recipe`) and its
    ``eval.monitors`` (the evaluation's one parser: :func:`eval.run.context.parse_recipe_monitors`,
    which names the file that set a bad one)."""
    from eval.run.context import parse_recipe_monitors
    from train.recipe import load_recipe

    recipe = load_recipe(path, overrides, trust_remote_code=trust_remote_code)
    parse_recipe_monitors(recipe)
    return recipe


def context_from_args(args, monitors=None):
    """The evaluation context of ``--recipe`` + overrides (``--domains`` and
    ``--calibration-split`` become two more) + ``--source`` / ``--predict-safe`` / ``--device``,
    resolved once (monitors parsed there: ``monitors``, else the recipe's ``eval.monitors``)."""
    from eval.run.context import parse_recipe_monitors, resolve
    from mood_data.domains import registry_override
    from train.recipe import load_recipe

    extra = registry_override(getattr(args, "domains", None))
    if getattr(args, "calibration_split", None):
        extra.append(f"eval.calibration_split={args.calibration_split}")
    recipe = load_recipe(args.recipe, [*args.overrides, *extra], trust_remote_code=args.trust_remote_code)
    if monitors is not None:
        parse_recipe_monitors(recipe)  # the recipe's own monitors are checked even when not used
    return resolve(recipe, monitors, getattr(args, "source", None), predict_safe=args.predict_safe,
                   device=args.device)
