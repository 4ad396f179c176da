"""``moodguard`` command line: a thin dispatcher.

The top layer: it names train/eval modules, nothing below names it.

Each subcommand lives in its own module that defines ``add_arguments(parser)`` and
``run(args) -> int``. Only the chosen subcommand's module is imported, so ``moodguard data
stats`` does not pay for importing torch-heavy training code.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from mood_data.errors import MoodguardError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("moodguard.cli_data", "build, validate and inspect MOOD datasets"),
    "models": ("moodguard.cli_models", "build the embedded tiny backbones; convert SmolLM2"),
    "train": ("moodguard.cli_train", "train a guard or causal-LM LoRA adapter from a recipe"),
    "recipes": ("moodguard.cli_recipes", "validate and show recipes"),
    "fit": ("moodguard.cli_fit", "fit OOD detector statistics on the train split"),
    "evaluate": ("moodguard.cli_evaluate", "evaluate monitors; write mood-bench run folders"),
    "export": ("moodguard.cli_bundle", "export a monitor bundle"),
    "score": ("moodguard.cli_bundle", "score conversations with a monitor bundle"),
    "push": ("moodguard.cli_bundle", "upload a run, adapter or bundle (with its model card) to the Hugging Face Hub"),
    "refresh": ("moodguard.cli_refresh", "update a deployed monitor on new data: drift, update, gate, lineage"),
    "lineage": ("moodguard.cli_refresh", "print where a bundle came from (its chain of refreshes)"),
    "sweep": ("moodguard.cli_sweep", "run a scaling sweep over recipes"),
    "chart": ("moodguard.cli_sweep", "chart recall vs parameter count for a sweep"),
    "report": ("moodguard.cli_sweep", "HTML + markdown report for a run or sweep"),
    "compare": ("moodguard.cli_sweep", "per-domain recall deltas between two runs"),
    "demo": ("moodguard.cli_sweep", "the embedded end-to-end demo"),
}


def _available() -> dict[str, tuple[str, str]]:
    out = {}
    for name, (module, help_) in COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            out[name] = (module, help_)
    return out


class Parser(argparse.ArgumentParser):
    """An argument parser whose leaf commands parse *intermixed*: ``key=value`` overrides may
    come before, between or after flags (``train guard --recipe R --resume guard.max_steps=2``,
    ``fit --recipe R a=1 --device cpu b=2``). A parser with sub-commands (or a ``REMAINDER``
    positional, ``data build``) parses the ordinary way and hands the rest to the sub-command."""

    _intermixing = False

    def _intermixable(self) -> bool:
        return not any(isinstance(a, argparse._SubParsersAction) or a.nargs in (argparse.REMAINDER, argparse.PARSER)
                       for a in self._actions)

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing or not self._intermixable():
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = Parser(
        prog="moodguard", description="moodguard: train, fit, evaluate and report guard monitors for LLM conversations.",
        epilog="Quiet by default (no library progress bars or expected loader notices in logs); -v shows them.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show library progress bars, loader reports and notices (hidden by default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in _available().items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == command:
            mod = importlib.import_module(module)
            adder = getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments
            adder(p)
            p.set_defaults(_module=mod, _name=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from mood_data.console import configure

    command = next((a for a in argv if not a.startswith("-")), None)
    head = argv[:argv.index(command)] if command else argv
    configure("-v" in head or "--verbose" in head)  # before any library import of the subcommand
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args._argv = argv  # what a command re-executes under `accelerate launch` (--num-processes)
    runner = getattr(args._module, f"run_{args._name}", None) or args._module.run
    import warnings

    from mood_data.atomic import io_error, remove_temporaries_on_signal

    # peft reads transformers' deprecated `is_gradient_checkpointing` on every adapter load: a
    # library-internal FutureWarning the user can do nothing about, printed on every `score`
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        with remove_temporaries_on_signal(f"moodguard {args._name}"):  # SIGTERM: temporaries removed
            return int(runner(args) or 0)
    except MoodguardError as err:
        print(f"moodguard {args._name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment (disk full, permissions, a folder that is a file): one line
        print(f"moodguard {args._name}: error: {io_error(err.filename or '(I/O)', err, 'I/O error')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moodguard {args._name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
