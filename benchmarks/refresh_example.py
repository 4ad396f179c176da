"""The worked example of docs/refresh.md, and the measurement of the refresh modes.

    python benchmarks/refresh_example.py data --out ex
    python benchmarks/refresh_example.py measure --out /tmp/refresh-modes --json docs-table.json

``data`` writes the example's world into ``--out``:

* ``old/``: the embedded benchmark as a local source WITHOUT the ``function-calling-missing``
  domain (``train.jsonl`` = the embedded train split, ``test.jsonl`` = its test split minus that
  domain): the world before the incident, on which the deployed monitor is trained;
* ``new.jsonl``: the 198 ``function-calling-missing`` conversations (an assistant that says a
  tool call succeeded when the tool does not exist), all unsafe, as the labelled rows of a new
  domain ``tool-missing`` (the incident's rows, reviewed); the refresh holds half of them out;
* ``noisy.jsonl``: the same rows from a labelling job gone wrong: half of the labels flipped at
  random (seeded);
* ``domains.yaml`` (``id: [tool-missing]``) and ``recipe.yaml`` (tiny-s, few steps, capped test
  rows: the example runs in about two minutes on a laptop CPU).

``measure`` runs the example's first refresh in every mode (``continue`` with ``--replay all``,
``--replay 200`` and ``--replay 0``, ``retrain``, ``stats``) from the same deployed bundle and
writes the table of docs/refresh.md: wall time, ID recall and AUROC, recall on the held-out new
rows, the mean recall over the other OOD domains, forgetting (ID recall lost against the
parent) and the gate's decision.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common  # noqa: E402,F401  (offline environment)

NEW_DOMAIN = "tool-missing"
SOURCE_DOMAIN = "function-calling-missing"
MONITOR = "guard+maha"
RECIPE = {
    "base": str(REPO / "recipes" / "tiny" / "s.yaml"),
    "guard": {"max_steps": 150, "max_length": 160, "save_steps": 50},
    "data": {"max_test_unsafe_per_domain": 40, "max_test_safe_per_domain": 150},
    "eval": {"max_length": 160, "batch_size": 32, "monitors": [MONITOR]},
}
# the refresh's update: the deployed recipe's settings, as many guard steps as the first training
REFRESH_OVERRIDES: list[str] = []  # the parent recipe's steps (guard.max_steps 150)


def write_jsonl(path: Path, rows) -> None:
    from mood_data.atomic import write_jsonl as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, rows)


def build_data(out: Path) -> dict:
    """The example's files (module docstring); returns their paths."""
    import yaml

    from mood_data.load import load_splits

    splits = load_splits("embedded")
    cols = {s: {c: list(splits[s][c]) for c in ("id", "conversation", "domain", "malign")} for s in splits}

    def rows(split, keep):
        c = cols[split]
        return [{k: c[k][i] for k in c} for i in range(len(c["id"])) if keep(c["domain"][i])]

    write_jsonl(out / "old" / "train.jsonl", rows("train", lambda d: True))
    write_jsonl(out / "old" / "test.jsonl", rows("test", lambda d: d != SOURCE_DOMAIN))
    incident = [{**r, "id": f"incident-{i:03d}", "domain": NEW_DOMAIN}
                for i, r in enumerate(rows("test", lambda d: d == SOURCE_DOMAIN))]
    write_jsonl(out / "new.jsonl", incident)
    rng = random.Random(0)
    flips = set(rng.sample(range(len(incident)), len(incident) // 2))
    write_jsonl(out / "noisy.jsonl", [{**r, "malign": 1 - r["malign"] if i in flips else r["malign"]}
                                      for i, r in enumerate(incident)])
    (out / "domains.yaml").write_text(yaml.safe_dump({"id": [NEW_DOMAIN]}), encoding="utf-8")
    recipe = {**RECIPE, "data": {**RECIPE["data"], "source": str((out / "old").absolute())},
              "output_dir": str((out / "run").absolute())}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return {"old": out / "old", "new": out / "new.jsonl", "noisy": out / "noisy.jsonl",
            "domains": out / "domains.yaml", "recipe": out / "recipe.yaml", "n_incident": len(incident),
            "n_flipped": len(flips)}


def moodguard(*argv: str) -> int:
    from moodguard.cli import main

    return main([str(a) for a in argv])


def deployed(out: Path) -> Path:
    """The example's deployed monitor: trained on old/, exported to ``out/v1`` (reused when there)."""
    files = build_data(out) if not (out / "recipe.yaml").is_file() else None
    bundle = out / "v1"
    if not (bundle / "manifest.json").is_file():
        recipe = out / "recipe.yaml"
        if not (out / "run" / "guard" / "adapter_config.json").is_file():
            assert moodguard("train", "guard", "--recipe", recipe) == 0
        assert moodguard("export", "--recipe", recipe, "--monitor", MONITOR, "--out", bundle) == 0
    del files
    return bundle


def figures(refresh_dir: Path, gate: dict) -> dict:
    """What the table reports from a refresh folder: per group old / new TPR from gate.json, the
    candidate's ID AUROC from its evaluation."""
    d = {x["group"]: x for x in gate["deltas"]}
    other = [g for g in d if g not in ("id", NEW_DOMAIN, "overall") and not g.endswith("(safe)")]
    analysis = json.loads((refresh_dir / "run" / "eval" / MONITOR / "analysis.json").read_text())
    led = json.loads((refresh_dir / "refresh.json").read_text())["stages"]
    return {"id_recall_old": d["id"]["old"], "id_recall": d["id"]["new"],
            "id_auroc": analysis["groups"]["id"]["auroc"],
            "new_recall_old": d[NEW_DOMAIN]["old"], "new_recall": d[NEW_DOMAIN]["new"],
            "other_ood_old": sum(d[g]["old"] for g in other) / len(other),
            "other_ood": sum(d[g]["new"] for g in other) / len(other),
            "forgetting": d["id"]["old"] - d["id"]["new"],
            "decision": gate["decision"],
            "update_seconds": sum(led[s]["seconds"] for s in ("guard", "lm", "stats", "candidate")),
            "seconds": sum(v["seconds"] for v in led.values())}


SETUPS = {  # name: refresh arguments (after REFRESH_OVERRIDES)
    "continue, new + 5x replayed (default)": ["--mode", "continue"],
    "continue, new + 2x replayed": ["--mode", "continue", "--replay", "2x"],
    "continue, old + new (replay all)": ["--mode", "continue", "--replay", "all"],
    "continue, new only (replay 0)": ["--mode", "continue", "--replay", "0"],
    "retrain, old + new": ["--mode", "retrain"],
    "stats only (adapters kept)": ["--mode", "stats"],
}


def measure(out: Path, setups: list[str]) -> dict:
    bundle = deployed(out)
    results = {}
    for i, name in enumerate(setups):
        rdir = out / f"refresh-{i}"
        t0 = time.perf_counter()
        rc = moodguard("refresh", "--from", bundle, "--data", out / "new.jsonl", "--domains", out / "domains.yaml",
                       "--test-fraction", "0.5", "--out", rdir, *REFRESH_OVERRIDES, *SETUPS[name])
        wall = time.perf_counter() - t0
        gate = json.loads((rdir / "gate.json").read_text())
        results[name] = {"exit": rc, "wall_seconds": round(wall, 1), **figures(rdir, gate)}
        print(json.dumps({name: results[name]}), flush=True)
    return results


def table(results: dict) -> str:
    lines = ["| setup | wall s | ID recall (parent) | candidate ID AUROC* | forgetting | tool-missing recall (parent) | "
             "other OOD mean (parent) | gate |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['wall_seconds']:.0f} | {r['id_recall']:.3f} ({r['id_recall_old']:.3f}) | "
                     f"{r['id_auroc']:.3f} | {r['forgetting']:+.3f} | {r['new_recall']:.3f} ({r['new_recall_old']:.3f}) | "
                     f"{r['other_ood']:.3f} ({r['other_ood_old']:.3f}) | {r['decision']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="write the example's world (old/, new.jsonl, noisy.jsonl, domains.yaml, recipe.yaml)")
    d.add_argument("--out", required=True)
    m = sub.add_parser("measure", help="refresh the example in every mode; print the docs table")
    m.add_argument("--out", required=True)
    m.add_argument("--json", default=None, help="write the figures here too")
    m.add_argument("--setups", default=";".join(SETUPS), help="';'-separated subset of: " + "; ".join(SETUPS))
    args = ap.parse_args(argv)
    if args.cmd == "data":
        info = build_data(Path(args.out))
        print(f"example data in {args.out}: {info['n_incident']} incident rows as '{NEW_DOMAIN}' "
              f"({info['n_flipped']} labels flipped in noisy.jsonl)")
        return 0
    results = measure(Path(args.out), [s.strip() for s in args.setups.split(";") if s.strip()])
    common.write_json(args.json, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
