"""``moodguard data build|validate|stats``: thin entry points over ``mood_data.load`` / ``stats``."""
from __future__ import annotations

import argparse
import importlib
import warnings
from pathlib import Path
from typing import Any, Sequence

from mood_data.errors import DataError
from mood_data.leakage import LeakageWarning
from mood_data.load import load_split_file, load_splits
from mood_data.records import SPLITS, infer_split
from mood_data.stats import StatRow, compute_stats

BUILD_MODULE = "mood_data.build.cli"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{build,validate,stats}", required=True)

    # `build` belongs to mood_data/build/cli.py; its arguments are parsed in run() so that the
    # module is imported only when `data build` runs.
    b = sub.add_parser("build", help="build the embedded benchmark (see `moodguard data build --help`)",
                       add_help=False, prefix_chars="\0")
    b.add_argument("build_args", nargs=argparse.REMAINDER)

    v = sub.add_parser("validate", help="validate a MOOD source (file, folder, hub id, embedded)",
                       description="Validate a MOOD source; prints a one-line OK summary or the first error.")
    v.add_argument("source", help="a file, a folder with train.*/test.*, a hub id, or 'embedded'")
    _common(v)
    v.add_argument("--allow-leakage", action="store_true",
                   help="report train/test duplicate conversations as a warning instead of an error")

    s = sub.add_parser("stats", help="rows, malign rate and lengths per split x domain",
                       description="Per split x domain: rows, malign rate, char (and token) length p50/p90/max.")
    s.add_argument("source", nargs="?", default="embedded", help="as for validate (default: embedded)")
    _common(s)
    s.add_argument("--tokenizer", default=None,
                   help="tokenizer folder / hub id / embedded:NAME for token lengths; 'none' for chars only "
                        "(default: embedded:tiny-s when built)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="only this split; a single file is read as this split (default: from its name, else test)")
    p.add_argument("--domains", metavar="YAML", default=None, help="domains YAML adding custom ID/OOD domains")
    p.add_argument("--template", default="mood",
                   help="chat template for a 'messages' column: 'mood' (built-in) or a tokenizer path")


def load_source(source: str, *, split: str | None, domains: str | None, template: str = "mood",
                allow_leakage: bool = False) -> tuple[dict, dict | None]:
    """Load what the command line names: ``(splits, leakage report or None)``."""
    if source != "embedded" and Path(source).is_file():
        name = split or infer_split(source) or "test"
        return {name: load_split_file(source, name, registry=domains, template=template)}, None
    splits = (split,) if split else SPLITS
    with warnings.catch_warnings():  # the summary line reports allowed leakage itself
        warnings.simplefilter("ignore", LeakageWarning)
        loaded = load_splits(source, splits=splits, registry=domains, allow_leakage=allow_leakage, template=template)
    return loaded, loaded.leakage


def summary_line(source: str, splits: dict, leakage: dict | None) -> str:
    parts = []
    for name, ds in splits.items():
        domains = set(ds["domain"])
        malign = list(ds["malign"])
        parts.append(f"{name} {len(ds)} rows ({len(domains)} domains, {sum(malign)} malign)")
    line = f"OK {source}: " + ", ".join(parts)
    if leakage is not None:
        line += f"; leakage: {leakage['n_test_rows']} test rows"
        if leakage["n_test_rows"]:
            line += " (" + ", ".join(f"{d}={c}" for d, c in leakage["by_domain"].items()) + ")"
    return line


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[StatRow]) -> str:
    """An aligned plain-text table (token columns only when any row has them)."""
    tokens = any(r.tokens_max is not None for r in rows)
    header = ["split", "domain", "kind", "rows", "malign", "chars_p50", "chars_p90", "chars_max"]
    if tokens:
        header += ["tokens_p50", "tokens_p90", "tokens_max"]
    table = [header]
    for r in rows:
        line = [r.split, r.domain, r.kind, str(r.rows), f"{r.malign_rate:.3f}",
                _fmt(r.chars_p50), _fmt(r.chars_p90), _fmt(r.chars_max)]
        if tokens:
            line += [_fmt(r.tokens_p50), _fmt(r.tokens_p90), _fmt(r.tokens_max)]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    text_cols = {0, 1, 2}
    out = []
    for row in table:
        cells = [c.ljust(w) if i in text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def _stats_tokenizer(name: str | None):
    from mood_data.embedded import default_tokenizer_path, model_path

    if name is not None and name.lower() == "none":
        return None
    if name is None:
        name = default_tokenizer_path()
        if name is None:
            return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_path(str(name))), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{name}: cannot load tokenizer ({str(exc).strip().splitlines()[0]})") from None


def run_build(args: argparse.Namespace) -> int:
    try:
        mod = importlib.import_module(BUILD_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name and BUILD_MODULE.startswith(exc.name):
            raise DataError(f"data build: {BUILD_MODULE} is not available in this installation") from None
        raise
    parser = argparse.ArgumentParser(prog="moodguard data build", description=(mod.__doc__ or "").strip().split("\n")[0] or None)
    mod.add_arguments(parser)
    return int(mod.run(parser.parse_args(args.build_args)) or 0)


def run_validate(args: argparse.Namespace) -> int:
    splits, leakage = load_source(args.source, split=args.split, domains=args.domains, template=args.template,
                                  allow_leakage=args.allow_leakage)
    print(summary_line(args.source, splits, leakage))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from mood_data.domains import load_registry

    splits, leakage = load_source(args.source, split=args.split, domains=args.domains, template=args.template,
                                  allow_leakage=True)
    rows = compute_stats(splits, tokenizer=_stats_tokenizer(args.tokenizer), registry=load_registry(args.domains))
    print(format_table(rows))
    if leakage is not None and leakage["n_test_rows"]:
        print(f"warning: {leakage['n_test_rows']} test rows also appear in train "
              f"({', '.join(f'{d}={c}' for d, c in leakage['by_domain'].items())})")
    return 0


_RUNNERS = {"build": run_build, "validate": run_validate, "stats": run_stats}


def run(args: argparse.Namespace) -> int:
    return _RUNNERS[args.data_command](args)
