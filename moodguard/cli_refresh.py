"""``moodguard refresh`` (keep a deployed monitor current on new data, behind a gate) and
``moodguard lineage`` (where a bundle came from). docs/refresh.md."""
from __future__ import annotations

import argparse


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
