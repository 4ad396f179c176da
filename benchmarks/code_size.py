"""Lines per package and the largest modules (the numbers of docs/architecture.md).

    python benchmarks/code_size.py [--top N] [--json OUT]

Counts every line of the ``*.py`` files of mood_data, train, eval (and its subpackages) and
moodguard; a package's own row counts its files outside its subpackages.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mood_data", "train", "eval", "moodguard")


def module_lines() -> dict[str, int]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((REPO / pkg).rglob("*.py")):
            out[p.relative_to(REPO).as_posix()] = len(p.read_text(encoding="utf-8").splitlines())
    return out


def package_of(rel: str) -> str:
    """The innermost package folder of a module path (``eval/engine/detectors``)."""
    return rel.rsplit("/", 1)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    lines = module_lines()
    total = sum(lines.values())
    per_top = {pkg: sum(n for m, n in lines.items() if m.startswith(pkg + "/")) for pkg in PACKAGES}
    per_folder: dict[str, int] = {}
    for m, n in lines.items():
        per_folder[package_of(m)] = per_folder.get(package_of(m), 0) + n
    print(f"{'package':<28}{'lines':>7}{'share':>7}")
    for pkg, n in per_top.items():
        print(f"{pkg:<28}{n:>7}{100 * n / total:>6.0f}%")
        for folder, k in sorted(per_folder.items()):
            if folder.startswith(pkg + "/") or (folder == pkg and any(f.startswith(pkg + "/") for f in per_folder)):
                print(f"  {folder:<26}{k:>7}")
    print(f"{'total':<28}{total:>7}   ({len(lines)} modules, median {statistics.median(lines.values()):.0f} lines)")
    print(f"largest {args.top}:")
    for m, n in sorted(lines.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {m:<40}{n:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"packages": per_top, "folders": per_folder, "modules": lines},
                                              indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
