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

from train.recipe import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, help_ in (("guard", "the guard classifier (sequence classification)"), ("lm", "the causal-LM adapter"),
                        ("judge", "the judge SFT LoRA (rubric prompts -> one answer token; needs judge.enabled=true)")):
        _add_kind(sub.add_parser(kind, help=help_, description=help_))


def _add_kind(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="recipes/<family>/<size>.yaml")
    parser.add_argument("--accelerate-config", default=None, metavar="NAME",
                        help="accelerate_configs/<NAME>.yaml (default: the recipe's accelerate.config; 'none' = in-process)")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N", help="override the config's num_processes")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--parallel-members", type=int, default=None, metavar="N",
                        help="train N seed members at once, one process each (the section's parallel_members)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, e.g. guard.learning_rate=1e-4")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.num_processes is not None:
        overrides.append(f"accelerate.num_processes={args.num_processes}")
    if args.parallel_members is not None:
        overrides.append(f"{args.kind}.parallel_members={args.parallel_members}")
    if args.accelerate_config is not None:
        overrides.append(f"accelerate.config={'null' if args.accelerate_config == 'none' else args.accelerate_config}")
    recipe = load_recipe(args.recipe, overrides)  # validate before launching anything
    from train.launch import adapter_folders, run_training

    rc = run_training(args.kind, recipe, args.recipe, overrides, args.resume)
    if rc == 0:
        print("\n".join(str(p) for p in adapter_folders(recipe, args.kind)))
    return rc
