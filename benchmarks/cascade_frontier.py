"""The cost-recall frontier of a cascade over escalation budgets, from evaluated run folders.

    python benchmarks/cascade_frontier.py RUN [RUN ...] [--stages guard,guard+maha+ppl]
        [--budgets 0,0.05,0.1,0.2,0.3,0.4,0.5,0.7,1] [--cross RUN_B] [--fill] [--time 600] [--n-boot 200]
        [--json OUT]

Each RUN is a run folder whose stage monitors were evaluated by ``moodguard evaluate`` (with
``validation.json``: this version or later). For every budget (``cascade.max_escalation_rate``)
the cascade is fitted and evaluated exactly as ``moodguard evaluate`` does
(:func:`eval.run.cascade.evaluate_cascade`, no forward pass), written to
``RUN/eval/cascade[-<stage 1 unless guard>]-<budget %>/``. ``--cross RUN_B``: stage 2 is RUN_B's last stage monitor
(another backbone), folders ``RUN/eval/cross-<budget %>/``. ``--fill``: ``cascade.fill_budget``
(each budget spent), folders ``...-fill-<budget %>/``.

``--time N``: also exports the guard, the full monitor and the 30 % cascade as bundles and
scores N test conversations with each (``Monitor.score`` / ``Cascade.score``, in this
process, one torch thread, after one warm-up batch; the scorers interleaved, the best of 3
rounds): the wall seconds per conversation of really running them, next to the cost the
evaluation computes from the measured pass times.

Prints a markdown table (overall recall at 1 % FPR, cost per conversation, both relative to the
full monitor) and writes the figures as JSON (``--json``).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402,F401  (offline environment)


def cascade_context(run: Path, name: str, stages: list[str], budget: float, cross: Path | None, fill: bool = False):
    from eval.run.context import resolve
    from train.recipe import load_recipe

    spec = [{"monitor": m} for m in stages]
    if cross is not None:
        spec[-1] = {"run": str(cross.resolve()), "monitor": stages[-1]}
    return resolve(load_recipe(run / "recipe.yaml", [f"output_dir={run}", f"cascade.name={name}",
                                                     f"cascade.max_escalation_rate={budget}",
                                                     f"cascade.fill_budget={str(fill).lower()}",
                                                     f"cascade.stages={json.dumps(spec)}"]))


def frontier(run: Path, stages: list[str], budgets: list[float], cross: Path | None, n_boot: int,
             fill: bool = False) -> list[dict]:
    from eval.run.cascade import evaluate_cascade

    rows = []
    for b in budgets:
        first = "" if stages[0] == "guard" else f"-{stages[0]}"
        name = f"{'cross' if cross else 'cascade'}{first}{'-fill' if fill else ''}-{round(100 * b):03d}"
        folder = evaluate_cascade(cascade_context(run, name, stages, b, cross, fill), n_boot=n_boot, plots=False)
        doc = json.loads((folder / "cascade.json").read_text())
        analysis = json.loads((folder / "analysis.json").read_text())
        rows.append({"run": run.name, "budget": b, "folder": str(folder),
                     "fit_escalation": doc["fit"]["escalation_rate"], "fit_id_recall": doc["fit"]["id_recall"],
                     "test_escalation": doc["test"]["escalation_rate"][0],
                     "cost": doc["test"]["cost_per_conversation"], "overall": analysis["overall"]["tpr"]["0.01"],
                     "overall_ci": analysis["overall"]["tpr_ci"]["0.01"], "id": analysis["groups"]["id"]["tpr"]["0.01"],
                     "stages": doc["stages"]})
    return rows


def single(folder: Path) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    analysis = json.loads((folder / "analysis.json").read_text())
    return {"cost": meta["seconds_per_conversation"], "overall": analysis["overall"]["tpr"]["0.01"],
            "overall_ci": analysis["overall"]["tpr_ci"]["0.01"], "id": analysis["groups"]["id"]["tpr"]["0.01"],
            "device": meta.get("device")}


def timed(run: Path, stages: list[str], n: int, repeats: int = 3) -> dict:
    """Wall seconds per conversation of really scoring n test rows with the stage bundles and the
    30 % cascade bundle (bundles exported to a temporary folder)."""
    from eval.run.bundle import Monitor, export
    from eval.run.cascade_bundle import Cascade, export_cascade

    ctx = cascade_context(run, "cascade-030", stages, 0.3, None)
    rows = [json.loads(line) for line in open(ctx.model.run_root / "eval" / "cascade-030" / "results.jsonl")]
    convs = [r["conversation"] for r in rows[:: max(1, len(rows) // n)]][:n]
    import torch

    torch.set_num_threads(1)  # a shared CPU: one thread each, the scorers interleaved, the best of `repeats`
    out = {"n": len(convs), "repeats": repeats, "threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        scorers = {st.monitor: Monitor.load(export(st.context, Path(tmp) / st.monitor)) for st in ctx.cascade.stages}
        scorers["cascade-030"] = Cascade.load(export_cascade(ctx, Path(tmp) / "cascade"))
        best = {name: float("inf") for name in scorers}
        for name, scorer in scorers.items():
            scorer.score(convs[:32])  # warm-up
        for _ in range(repeats):
            for name, scorer in scorers.items():
                t0 = time.perf_counter()
                scored = scorer.score(convs)
                best[name] = min(best[name], (time.perf_counter() - t0) / len(convs))
                if name == "cascade-030":
                    out["cascade_escalated"] = sum(r["stage"] == 2 for r in scored) / len(convs)
        out.update(best)
    return out


def markdown(rows: list[dict], singles: dict, fpr: float = 0.01) -> str:
    lines = [f"| run | monitor | budget | escalated (ID fit / test) | s / conversation | cost vs full | "
             f"overall recall @ {fpr:g} FPR [95% CI] | recall vs full | ID recall |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run, s in singles.items():
        full = s[max(s, key=lambda m: (s[m]["cost"], m.count("+")))]
        for m, v in s.items():
            lines.append(f"| {run} | {m} | | | {v['cost']:.4f} | {100 * v['cost'] / full['cost']:.0f}% | "
                         f"{v['overall']:.3f} [{v['overall_ci'][0]:.3f}, {v['overall_ci'][1]:.3f}] | "
                         f"{100 * v['overall'] / full['overall']:.0f}% | {v['id']:.3f} |")
        for r in (r for r in rows if r["run"] == run):
            lines.append(f"| {run} | {Path(r['folder']).name} | {100 * r['budget']:.0f}% | "
                         f"{100 * r['fit_escalation']:.1f}% / {100 * r['test_escalation']:.1f}% | {r['cost']:.4f} | "
                         f"{100 * r['cost'] / full['cost']:.0f}% | {r['overall']:.3f} [{r['overall_ci'][0]:.3f}, "
                         f"{r['overall_ci'][1]:.3f}] | {100 * r['overall'] / full['overall']:.0f}% | {r['id']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--stages", default="guard,guard+maha+ppl")
    p.add_argument("--budgets", default="0,0.05,0.1,0.2,0.3,0.4,0.5,0.7,1")
    p.add_argument("--cross", type=Path, default=None, help="the run of the last stage (another backbone)")
    p.add_argument("--fill", action="store_true", help="cascade.fill_budget: spend each budget (folders *-fill-*)")
    p.add_argument("--n-boot", type=int, default=200)
    p.add_argument("--time", type=int, default=0, metavar="N", help="also score N test rows with the bundles")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from benchmarks.common import write_json

    stages = args.stages.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    rows, singles, timing = [], {}, {}
    for run in args.runs:
        rows += frontier(run, stages, budgets, args.cross, args.n_boot, args.fill)
        singles[run.name] = {m: single(run / "eval" / m) for m in stages}
        if args.cross is not None:
            singles[run.name][f"{args.cross.name}:{stages[-1]}"] = single(args.cross / "eval" / stages[-1])
        if args.time:
            timing[run.name] = timed(run, stages, args.time)
    print(markdown(rows, singles))
    if timing:
        print(json.dumps(timing, indent=1))
    if args.json:
        write_json(args.json, {"rows": rows, "singles": singles, "timing": timing, "argv": sys.argv[1:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
