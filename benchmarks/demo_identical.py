"""Are two ``moodguard demo`` sweep folders the same where it matters? (a refactor's proof)

    python benchmarks/demo_identical.py BEFORE AFTER

Compares, byte for byte, every ``results.jsonl`` and ``analysis.json`` of every run's eval
folders and the chart's ``.csv`` / ``.md`` files (the figures a reader sees; ``meta.json`` and
the reports hold wall times and are not compared). Prints one line per file and a summary;
exit 1 when a file differs or is missing on one side.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

PATTERNS = ("*/eval/*/results.jsonl", "*/eval/*/analysis.json", "chart/*.csv", "chart/*.md")


def compared_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for pattern in PATTERNS for p in root.glob(pattern) if p.is_file()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare(before: Path, after: Path) -> tuple[list[str], int]:
    """``(problems, number of identical files)``."""
    a, b = compared_files(before), compared_files(after)
    problems = [f"only in {before}: {f}" for f in sorted(a - b)] + [f"only in {after}: {f}" for f in sorted(b - a)]
    same = 0
    for f in sorted(a & b):
        if digest(before / f) == digest(after / f):
            same += 1
        else:
            problems.append(f"differs: {f}")
    return problems, same


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    before, after = map(Path, argv)
    problems, same = compare(before, after)
    for line in problems:
        print(line)
    print(f"{same} files byte-identical, {len(problems)} problems "
          f"({', '.join(PATTERNS)})")
    return 1 if problems or not same else 0


if __name__ == "__main__":
    sys.exit(main())
