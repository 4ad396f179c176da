"""``moodguard refresh`` (keep a deployed monitor current on new data, behind a gate) and
``moodguard lineage`` (where a bundle came from). docs/refresh.md."""
from __future__ import annotations

import argparse


def add_refresh_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, metavar="BUNDLE_OR_RUN",
                   help="the deployed monitor: a bundle (moodguard export, or a refresh's promoted bundle), or a run "
                        "folder whose monitor was evaluated (then exported first); never written")
    p.add_argument("--data", required=True, metavar="NEW",
                   help="the new rows: one file (split train / validation / test here, seeded) or a folder with "
                        "train.* and test.*; same schema as any MOOD data (docs/data.md)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the refresh's folder (new or empty; rerun with the same arguments to continue a killed "
                        "one): drift.json, gate.json, report.md, candidate/, bundle/ (when promoted)")
    p.add_argument("--mode", choices=("continue", "retrain", "stats"), default="continue",
                   help="continue: warm start from the deployed adapters (default); retrain: fresh adapters from the "
                        "base model; stats: adapters kept, statistics updated from their sufficient statistics")
    p.add_argument("--replay", default=None, metavar="all|N|Kx",
                   help="continue mode: train on the new train rows plus N seeded old train rows (Kx: K times the "
                        "new train rows; default 5x), or on every old + new train row (all)")
    p.add_argument("--recipe", default=None,
                   help="training / evaluation settings (default: the deployed bundle's recipe.yaml); its base model "
                        "must be the bundle's")
    p.add_argument("--domains", metavar="YAML", default=None,
                   help="domains YAML declaring the new rows' domains (id: trained on; ood: test only); merged with "
                        "the deployed monitor's")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the new ID rows held out for the gate (seeded, stratified; default 0.2)")
    p.add_argument("--fpr", type=float, default=0.01, help="the deployed FPR the gate compares at (default 0.01)")
    p.add_argument("--id-margin", type=float, default=0.05,
                   help="largest fall of ID recall the gate accepts (default 0.05)")
    p.add_argument("--n-boot", type=int, default=1000, help="paired bootstrap resamples of the gate (default 1000)")
    p.add_argument("--monitor", default=None,
                   help="--from RUN only: which evaluated monitor to refresh (default guard+maha+ppl)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's own Python code (as for export / score)")
    p.add_argument("--device", default=None, metavar="D", help="cpu, cuda or cuda:N (default: the accelerator if any)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides for the update, e.g. guard.max_steps=60")


def run_refresh(args) -> int:
    from eval.run.refresh import RefreshRequest, refresh

    req = RefreshRequest(source=args.source, data=args.data, out=args.out, mode=args.mode, recipe=args.recipe,
                         overrides=tuple(args.overrides), domains=args.domains, replay=args.replay,
                         test_fraction=args.test_fraction, fpr=args.fpr, id_margin=args.id_margin, n_boot=args.n_boot,
                         monitor=args.monitor, device=args.device, trust_remote_code=args.trust_remote_code)
    res = refresh(req)
    print(res.reason)
    print(f"bundle: {res.bundle}" if res.bundle else f"held back: nothing promoted (gate: {res.out / 'gate.json'}, "
          f"candidate: {res.out / 'candidate'})")
    return res.exit_code


def add_lineage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", metavar="BUNDLE", help="a bundle folder (moodguard export or a promoted refresh)")


def run_lineage(args) -> int:
    from eval.run.bundle_check import verify_manifest
    from eval.run.lineage import format_chain, read_lineage
    from mood_data.errors import BundleError, MoodguardError
    from mood_data.readers import sha256_file
    from pathlib import Path

    folder = Path(args.bundle)
    verify_manifest(folder)  # every file, lineage.json included, is what the manifest says
    lineage = read_lineage(folder)
    check = None
    parent = lineage.get("parent")
    if parent:
        ppath = Path(str(parent.get("path")))
        if not (ppath / "manifest.json").is_file():
            check = "not found there now"
        else:
            try:
                verify_manifest(ppath)
                sha = sha256_file(ppath / "manifest.json")
                check = "verified: same sha256" if sha == parent["sha256"] else f"DIFFERS: the bundle there is {sha}"
            except (BundleError, MoodguardError) as exc:
                check = f"the bundle there does not verify ({exc})"
    print(format_chain(lineage, sha256_file(folder / "manifest.json"), folder, check))
    return 0
