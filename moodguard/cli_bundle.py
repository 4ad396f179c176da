"""``moodguard export`` (write a monitor bundle) and ``moodguard score`` (use one)."""
from __future__ import annotations

import argparse

from train.detector_table import NAMES

from .cli_common import add_recipe_arguments, recipe_from_args


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--monitor", default="guard+maha+ppl",
                   help=f"the monitor to export: detectors joined by '+' ({', '.join(NAMES)}; default guard+maha+ppl)")
    p.add_argument("--out", required=True, help="bundle folder to write (replaced atomically)")
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")


def run_export(args) -> int:
    from eval.bundle import export_bundle

    out = export_bundle(recipe_from_args(args), args.out, args.monitor, source=args.source,
                        predict_safe=args.predict_safe)
    print(f"bundle written: {out}")
    return 0


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monitor", required=True, help="a bundle folder written by `moodguard export`")
    p.add_argument("input", help="jsonl file with a 'conversation' (string) or 'messages' (list) per row")
    p.add_argument("--out", default=None, help="write one JSON row per conversation here (default: stdout)")
    p.add_argument("--base", default=None, help="override the base model path/name recorded in the bundle")
    p.add_argument("--batch-size", type=int, default=None, help="override the bundle's batch size")


def run_score(args) -> int:
    import json
    import sys

    from eval.bundle import Monitor, read_conversations, score_file

    rows_in = read_conversations(args.input)  # input errors before the (slow) model load
    monitor = Monitor.load(args.monitor, base=args.base, batch_size=args.batch_size)
    rows = score_file(monitor, None, args.out, rows_in=rows_in)
    if args.out is None:
        for r in rows:
            sys.stdout.write(json.dumps(r) + "\n")
    n_flag = {k: sum(r["flags"][k] for r in rows) for k in monitor.thresholds}
    latency = rows[0]["latency_s"] if rows else 0.0
    n_cut = sum(r["truncated"] for r in rows)
    print(f"{monitor.name}: {len(rows)} conversations, {latency * 1000:.1f} ms per conversation; flagged "
          + ", ".join(f"{n}/{len(rows)} at FPR {k}" for k, n in n_flag.items())
          + f"; left-truncated to {monitor.settings.max_length} tokens: {n_cut}", file=sys.stderr)
    return 0


# the dispatcher's fallback names
add_arguments, run = add_export_arguments, run_export
