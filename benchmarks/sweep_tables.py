"""Markdown tables of a finished sweep folder, as published in docs/real-models.md.

    python benchmarks/sweep_tables.py runs/sweeps/embedded-real [--fpr 0.01]

Per backbone: parameters, ID AUROC, overall recall at the FPR for every monitor (95 % bootstrap
interval of the run's analysis.json), seconds per conversation and the wall time of each stage
(state.json); then recall per OOD domain, guard alone vs the last monitor. Reads only what the
sweep wrote; no model is loaded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.engine.metrics import fpr_key  # noqa: E402
from mood_data.readers import read_json  # noqa: E402

STAGES = ("train-guard", "train-lm", "fit", "evaluate")


def _ci(group: dict, key: str, fpr: str | None = None) -> str:
    value = group[key][fpr] if fpr else group[key]
    lo, hi = group[f"{key}_ci"][fpr] if fpr else group[f"{key}_ci"]
    return f"{value:.3f} [{lo:.2f}, {hi:.2f}]"


def load_sweep(folder: Path) -> tuple[dict, list[str], list[str], dict]:
    """(state.json stages, runs in sweep order, monitors, {(run, monitor): (analysis, meta)})."""
    state = read_json(folder / "state.json")["stages"]
    runs = list(dict.fromkeys(stage.split("/")[0] for stage in state))
    monitors = sorted({p.name for r in runs for p in (folder / r / "eval").glob("*") if p.is_dir()},
                      key=lambda m: (m.count("+"), m))
    out = {}
    for r in runs:
        for m in monitors:
            a, meta = folder / r / "eval" / m / "analysis.json", folder / r / "eval" / m / "meta.json"
            if a.is_file() and meta.is_file():
                out[(r, m)] = (read_json(a), read_json(meta))
    return state, runs, monitors, out


def tables(folder: Path, fpr: float = 0.01) -> str:
    state, runs, monitors, res = load_sweep(folder)
    k = fpr_key(fpr)
    lines = [f"Recall = TPR at {fpr:.1%} FPR against the pooled ID-safe test rows; [95 % bootstrap interval].", ""]
    head = ["backbone", "params", "guard ID AUROC", "guard ID TPR"] + [f"overall recall: {m}" for m in monitors] + \
           ["s / conv (guard)", f"s / conv ({monitors[-1]})"] + [f"{s} (min)" for s in STAGES]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        if (r, "guard") not in res:
            lines.append(f"| {r} | not evaluated |" + " |" * (len(head) - 2))
            continue
        ga, gm = res[(r, "guard")]
        row = [r, f"{gm['params']:,}", _ci(ga["groups"]["id"], "auroc"), _ci(ga["groups"]["id"], "tpr", k)]
        row += [_ci(res[(r, m)][0]["overall"], "tpr", k) if (r, m) in res else "–" for m in monitors]
        row += [f"{gm['seconds_per_conversation']:.4f}",
                f"{res[(r, monitors[-1])][1]['seconds_per_conversation']:.4f}" if (r, monitors[-1]) in res else "–"]
        row += [f"{state[f'{r}/{s}']['seconds'] / 60:.1f}" if state.get(f"{r}/{s}", {}).get("status") == "done" else "–"
                for s in STAGES]
        lines.append("| " + " | ".join(row) + " |")
    total = sum(v.get("seconds", 0) for v in state.values() if v.get("status") == "done")
    lines += ["", f"Sum of the stage wall times: {total / 60:.1f} min.", ""]
    # per OOD domain: guard alone vs the last monitor
    last = monitors[-1]
    done = [r for r in runs if (r, "guard") in res and (r, last) in res]
    domains = res[(done[0], "guard")][0]["overall"]["domains"] if done else []
    head = ["domain"] + [f"{r}: guard → {last}" for r in done]
    lines += [f"Recall per OOD domain at {fpr:.1%} FPR, guard alone → {last}:", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in domains + ["id"]:
        cells = []
        for r in done:
            g, f = res[(r, "guard")][0]["groups"].get(d), res[(r, last)][0]["groups"].get(d)
            cells.append("–" if g is None or f is None else f"{_ci(g, 'tpr', k)} → {_ci(f, 'tpr', k)}")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--fpr", type=float, default=0.01)
    args = ap.parse_args(argv)
    print(tables(args.folder, args.fpr), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
