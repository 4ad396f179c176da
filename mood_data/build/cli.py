"""``moodguard data build``: thin entry point over :func:`mood_data.build.build_benchmark`."""
from __future__ import annotations

import argparse
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SOURCES = REPO_ROOT.parent / "shared" / "data" / "sources"
DEFAULT_OUT = REPO_ROOT / "mood_data" / "embedded" / "benchmark"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sources", type=Path, default=DEFAULT_SOURCES,
                        help="raw source pack folder (default: ../shared/data/sources from the repo root)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder (default: mood_data/embedded/benchmark)")
    parser.add_argument("--seed", type=int, default=0, help="sampling / split seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from .builder import build_benchmark

    report = build_benchmark(args.sources, args.out, seed=args.seed)
    n = report["n_rows"]
    print(f"wrote {args.out}: train {n['train']} rows, test {n['test']} rows")
    for group, auc in report["format_baseline_auroc"].items():
        print(f"  format-only AUROC {group}: {auc:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:  # python -m mood_data.build.cli
    from ..errors import MoodguardError
    import sys

    parser = argparse.ArgumentParser(prog="moodguard data build")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except MoodguardError as err:
        print(f"moodguard data build: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
