"""``moodguard export`` (write a monitor bundle) and ``moodguard score`` (use one)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from eval.engine.table import NAMES

from .cli_common import (add_device_argument, add_parallel_argument, add_recipe_arguments, check_num_processes,
                         context_from_args, parallel_run)


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)
    p.add_argument("--monitor", default="guard+maha+ppl",
                   help=f"the monitor to export: detectors joined by '+' ({', '.join(NAMES)}; default guard+maha+ppl)")
    p.add_argument("--out", required=True,
                   help="bundle folder to write: new, empty, or a bundle moodguard wrote (replaced atomically, "
                        "its own files deleted); any other existing path is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="write the bundle even where --out holds something else: that is moved aside to "
                        "<out>.moodguard-old-<time>, never deleted (never the working folder or the run itself)")
    p.add_argument("--source", default=None, help="data source (default: the recipe's data.source)")
    p.add_argument("--cascade", action="store_true",
                   help="export the recipe's evaluated cascade (its cascade: section) instead of --monitor: every "
                        "stage's bundle, the fitted bands and the cascade's thresholds (docs/cascade.md)")


def run_export(args) -> int:
    from eval.run.bundle import check_export_out, export
    from mood_data.runlock import output_file_lock, output_lock

    ctx = context_from_args(args, [args.monitor])
    check_export_out(args.out, args.overwrite, (Path.cwd(), ctx.model.run_root))  # before the lock and the work
    with output_lock(ctx.model.run_root, "output_dir"), output_file_lock(args.out):
        if args.cascade:
            from eval.run.cascade_bundle import export_cascade

            out = export_cascade(ctx, args.out, overwrite=args.overwrite)
        else:
            out = export(ctx, args.out, overwrite=args.overwrite)
    print(f"bundle written: {out}")
    return 0


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monitor", required=True,
                   help="a bundle folder written by `moodguard export` (a monitor, or a cascade: --cascade)")
    p.add_argument("input", help="jsonl file with a 'conversation' (string) or 'messages' (list) per row")
    p.add_argument("--out", default=None,
                   help="write one JSON row per conversation here, committed in chunks (default: stdout)")
    p.add_argument("--base", default=None, help="override the base model path/name recorded in the bundle")
    p.add_argument("--batch-size", type=int, default=None, help="override the bundle's batch size (>= 1)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a bundle whose monitor.json sets trust_remote_code to run its base model's own "
                        "Python code (refused without this flag)")
    p.add_argument("--resume", action="store_true",
                   help="keep the chunks a killed run committed for --out (each checked against its row count "
                        "and sha256; a damaged one is rescored) and score only the rest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file, or start afresh over a killed run's chunks (refused "
                        "without it)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="score only shard I of N (0-based, contiguous rows; e.g. $SLURM_ARRAY_TASK_ID/8)")
    # `--shard -1/3` is a (bad) value, not an unknown option: argparse would only say "expected one argument"
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+/-?\d+$")
    p.add_argument("--chunk-size", type=int, default=None, metavar="ROWS",
                   help="conversations scored and committed at a time (default 512; bounds memory)")
    add_device_argument(p)
    add_parallel_argument(p)


def check_out_file(out: str | None) -> None:
    """``--out`` must be a writable file path: checked BEFORE the (slow) model load and scoring."""
    import os
    from pathlib import Path

    from mood_data.errors import OutputError

    if out is None:
        return
    p = Path(out)
    if p.is_dir():
        raise OutputError(f"{p}: --out is a folder (expected a file path)")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: --out: not a folder (cannot create {p})")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: --out: folder is not writable (cannot create {p})")


def run_score(args) -> int:
    import contextlib

    from eval.run.streaming import check_output, parse_shard, scan_input
    from mood_data.errors import MoodguardError
    from mood_data.runlock import output_file_lock

    if args.resume and args.out is None:
        raise MoodguardError("--resume: needs --out (the chunks of a killed run are kept next to that file)")
    if args.batch_size is not None and args.batch_size < 1:
        raise MoodguardError(f"--batch-size: must be >= 1, got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise MoodguardError(f"--chunk-size {args.chunk_size}: expected a positive number of rows")
    check_num_processes(args.num_processes)
    check_out_file(args.out)  # before the (slow) model load and scoring
    shard = parse_shard(args.shard)
    check_output(args.out, args.input, resume=args.resume, overwrite=args.overwrite)
    scan = scan_input(args.input)  # input errors before the (slow) model load
    # one writer per --out (the launched ranks inherit the lock)
    with output_file_lock(args.out) if args.out is not None else contextlib.nullcontext():
        return parallel_run(args, lambda: _score(args, scan, shard))


def _score(args, scan, shard) -> int:
    import sys

    from eval.engine.parallel import main_print
    from eval.run.cascade_bundle import load_bundle
    from eval.run.streaming import SCORE_CHUNK, score_stream

    monitor = load_bundle(args.monitor, base=args.base, batch_size=args.batch_size, device=args.device,
                          trust_remote_code=args.trust_remote_code)  # a monitor or a cascade bundle
    s = score_stream(monitor, scan, args.out, shard=shard, resume=args.resume, overwrite=args.overwrite,
                     chunk=SCORE_CHUNK if args.chunk_size is None else args.chunk_size)
    per = s.seconds / max(s.rows - s.resumed_rows, 1)
    main_print(f"{monitor.name}: {s.rows} conversations ({s.rows - s.resumed_rows} scored now), "
               f"{per * 1000:.1f} ms per conversation; flagged "
               + ", ".join(f"{s.flagged.get(k, 0)}/{s.rows} at FPR {k}" for k in monitor.thresholds)
               + f"; left-truncated to {monitor.settings.max_length} tokens: {s.truncated}"
               + (f"; unscorable (flagged: fail closed): {s.unscorable}" if s.unscorable else "")
               + "".join(f"; stage {k + 1} scored {n} rows" for k, n in enumerate(getattr(monitor, "rows_scored", ()))),
               file=sys.stderr)
    return 0


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_OR_BUNDLE",
                   help="a run folder (guard/, lm/, eval/), one adapter folder, or a bundle from `moodguard export`")
    p.add_argument("--repo-id", required=True, help="the Hub repository, e.g. my-org/moodguard-tiny-s")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to push to (default: main)")
    p.add_argument("--fpr", type=float, default=0.01, help="FPR of the figures in the model card (default 0.01)")


def run_push(args) -> int:
    from eval.run.hub import push

    res = push(args.path, args.repo_id, private=args.private, revision=args.revision, fpr=args.fpr)
    print(f"pushed {res.kind} {args.path} -> {res.url} ({len(res.files)} files)")
    return 0


# the dispatcher's fallback names
add_arguments, run = add_export_arguments, run_export
