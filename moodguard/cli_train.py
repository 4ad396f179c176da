"""``moodguard train guard|lm|judge --recipe R [--accelerate-config NAME] [--num-processes N]
[--parallel-members N] [--resume] [key=value ...]``.

With an accelerate config (the flag, or the recipe's ``accelerate.config``) the command
re-executes itself as ``accelerate launch --config_file accelerate_configs/<NAME>.yaml -m
train.<kind> ...``; otherwise it trains in-process. ``--accelerate-config none`` forces
in-process. With a seed list and ``--parallel-members N`` (``<kind>.parallel_members``) it runs
N seed members at once, each as its own ``python -m train.<kind> --member S`` (or ``accelerate
launch``) process.
"""
from __future__ import annotations

import argparse

from train import entry  # the one parser shared with python -m train.<kind>

from .cli_common import load_checked_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, help_ in entry.KIND_HELP.items():
        entry.add_train_arguments(sub.add_parser(kind, help=help_, description=help_))


def run(args: argparse.Namespace) -> int:
    overrides = entry.recipe_overrides(args.kind, args)
    # loaded and validated once; passed along from here (trust_remote_code: only with the flag)
    recipe = load_checked_recipe(args.recipe, overrides, trust_remote_code=args.trust_remote_code)
    entry.apply_device(args.device, recipe)
    from train.launch import adapter_folders, run_training

    rc = run_training(args.kind, recipe, args.recipe, overrides, args.resume)
    if rc == 0:
        print("\n".join(str(p) for p in adapter_folders(recipe, args.kind)))
    return rc
