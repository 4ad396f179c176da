"""Where a bundle came from: ``<bundle>/lineage.json`` (issue 24).

Every bundle records its lineage, covered by its manifest like every other file:

* ``mode``: ``export`` (a bundle exported from a run: the root of a chain), or the refresh mode
  that made it (``continue``, ``retrain``, ``stats``);
* ``parent``: null for a root, else the parent bundle's identity -- the sha256 of its
  ``manifest.json`` (which lists the sha256 of every file of the parent, so one digest pins all
  of it) -- with the path it was read from, its mode and monitor;
* ``ancestors``: the chain above the parent, oldest first (copied from the parent's own
  lineage, so the chain is readable without the older bundles);
* ``data``: fingerprints (sha256 over the ``(id, conversation)`` pairs in order, as the statistics
  caches use, and row counts) of the rows each step used: the train / validation slices of a
  root; the old train rows, the new rows and their train / validation / test parts of a refresh;
* ``gate``: the refresh gate's figures (decision, FPR, each check) of a promoted bundle;
* ``code``: the moodguard version and, when the code is a git checkout, its commit.

:func:`read_lineage` checks every value (one-line :class:`~mood_data.errors.BundleError` naming
the file and field); :func:`format_chain` is what ``moodguard lineage BUNDLE`` prints and
:func:`lineage_markdown` the model card's section. No timestamps: exporting the same run twice
gives the same lineage (and the same bundle bytes).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Mapping, Sequence

from mood_data.errors import BundleError
from mood_data.readers import read_json, short_repr

LINEAGE = "lineage.json"
LINEAGE_FORMAT = 1
MODES = ("export", "continue", "retrain", "stats")
_SHA = re.compile(r"[0-9a-f]{64}")


def code_version() -> dict[str, Any]:
    """``{"moodguard": version, "git": commit or None, "dirty": bool or None}`` of the running code."""
    from importlib import metadata

    try:
        version = metadata.version("moodguard")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        version = None
    root = Path(__file__).resolve().parents[2]
    commit = dirty = None
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip() or None
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit = dirty = None
    return {"moodguard": version, "git": commit, "dirty": dirty}


def data_record(rows) -> dict[str, Any]:
    """``{"rows": n, "sha256": ...}`` of a slice with ``id`` and ``conversation`` columns."""
    from .cache import fingerprint

    ids, conversations = list(rows["id"]), list(rows["conversation"])
    return {"rows": len(ids), "sha256": fingerprint(ids, conversations)}


def root_lineage(monitor: str, cut) -> dict[str, Any]:
    """The lineage of a bundle exported from a run (no parent): its train / validation slices."""
    train, validation = cut
    return {"format": LINEAGE_FORMAT, "monitor": monitor, "mode": "export", "parent": None, "ancestors": [],
            "data": {"train": data_record(train), "validation": data_record(validation)},
            "training": None, "gate": None, "code": code_version()}


def summary(lineage: Mapping, sha256: str) -> dict[str, Any]:
    """One chain entry: a bundle's identity, mode, monitor and gate decision."""
    gate = lineage.get("gate") or None
    return {"sha256": sha256, "mode": lineage.get("mode"), "monitor": lineage.get("monitor"),
            "gate": None if gate is None else {"decision": gate.get("decision"), "reason": gate.get("reason")}}


def child_lineage(parent: Mapping, parent_sha256: str, parent_path: str, *, monitor: str, mode: str,
                  data: Mapping, training: Mapping, gate: Mapping | None = None) -> dict[str, Any]:
    """The lineage of a bundle refreshed from ``parent`` (its lineage and manifest sha256)."""
    if mode not in MODES[1:]:
        raise ValueError(f"refresh mode {mode!r}")
    return {"format": LINEAGE_FORMAT, "monitor": monitor, "mode": mode,
            "parent": {"sha256": parent_sha256, "path": str(parent_path), "mode": parent.get("mode"),
                       "monitor": parent.get("monitor")},
            "ancestors": [*parent.get("ancestors", []), summary(parent, parent_sha256)],
            "data": dict(data), "training": dict(training), "gate": None if gate is None else dict(gate),
            "code": code_version()}


def _fail(path: Path, field: str, what: str) -> None:
    raise BundleError(f"{path}: field '{field}': {what}")


def check_lineage(doc: Any, path: Path) -> dict:
    """Type-check a lineage document (one-line BundleError naming ``path`` and the field)."""
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: expected a JSON object")
    if doc.get("format") != LINEAGE_FORMAT:
        _fail(path, "format", f"unsupported lineage format {short_repr(doc.get('format'))}")
    if doc.get("mode") not in MODES:
        _fail(path, "mode", f"expected one of {', '.join(MODES)}, got {short_repr(doc.get('mode'))}")
    if not isinstance(doc.get("monitor"), str):
        _fail(path, "monitor", f"expected a string, got {short_repr(doc.get('monitor'))}")
    parent = doc.get("parent")
    if (parent is None) != (doc["mode"] == "export"):
        _fail(path, "parent", "an exported bundle has no parent and a refreshed one has one")
    if parent is not None:
        if not isinstance(parent, dict) or not _SHA.fullmatch(str(parent.get("sha256"))):
            _fail(path, "parent.sha256", f"expected a sha256 hex digest, got {short_repr((parent or {}).get('sha256'))}")
    ancestors = doc.get("ancestors")
    if not isinstance(ancestors, list):
        _fail(path, "ancestors", f"expected a list, got {short_repr(ancestors)}")
    for i, a in enumerate(ancestors):
        if not isinstance(a, dict) or not _SHA.fullmatch(str(a.get("sha256"))):
            _fail(path, f"ancestors[{i}].sha256", "expected a sha256 hex digest")
    if parent is not None and (not ancestors or ancestors[-1]["sha256"] != parent["sha256"]):
        _fail(path, "ancestors", "the last ancestor must be the parent")
    data = doc.get("data")
    if not isinstance(data, dict):
        _fail(path, "data", f"expected a mapping, got {short_repr(data)}")
    for key, rec in data.items():
        if not isinstance(rec, dict) or not _SHA.fullmatch(str(rec.get("sha256"))) \
                or not isinstance(rec.get("rows"), int) or isinstance(rec.get("rows"), bool):
            _fail(path, f"data.{key}", "expected {rows: int, sha256: hex digest}")
    for key in ("gate", "training", "code"):
        if doc.get(key) is not None and not isinstance(doc.get(key), dict):
            _fail(path, key, f"expected a mapping or null, got {short_repr(doc.get(key))}")
    return doc


def read_lineage(bundle: str | Path) -> dict:
    """The checked ``lineage.json`` of ``bundle`` (one line when it is missing or malformed)."""
    path = Path(bundle) / LINEAGE
    if not path.is_file():
        raise BundleError(f"{path}: file not found (a bundle exported before lineages were recorded has none)")
    return check_lineage(read_json(path, BundleError), path)


def _gate_text(gate: Mapping | None) -> str:
    if not gate:
        return "-"
    reason, decision = gate.get("reason"), str(gate.get("decision"))
    if not reason:
        return decision
    return str(reason) if str(reason).startswith(decision) else f"{decision}: {reason}"


def format_chain(lineage: Mapping, sha256: str, folder: str | Path, parent_check: str | None = None) -> str:
    """The chain root -> this bundle, one line each, then this bundle's data and code (what
    ``moodguard lineage`` prints); ``parent_check``: what was found at the parent's path."""
    entries = [*lineage.get("ancestors", []), summary(lineage, sha256)]
    lines = [f"lineage of {folder} ({len(entries)} bundle{'s' if len(entries) > 1 else ''}, root first):"]
    for i, e in enumerate(entries, 1):
        here = "  <- this bundle" if i == len(entries) else ""
        lines.append(f"  {i}. {e['sha256'][:16]}  {e.get('mode')}  {e.get('monitor')}  gate: {_gate_text(e.get('gate'))}"
                     f"{here}")
    parent = lineage.get("parent")
    if parent:
        lines.append(f"parent: {parent['sha256']} read from {parent.get('path')}"
                     + (f" ({parent_check})" if parent_check else ""))
    for key, rec in (lineage.get("data") or {}).items():
        lines.append(f"data {key}: {rec['rows']} rows, sha256 {rec['sha256'][:16]}")
    training = lineage.get("training") or {}
    if training:
        lines.append("training: " + ", ".join(f"{k} {v}" for k, v in training.items()))
    code = lineage.get("code") or {}
    lines.append(f"code: moodguard {code.get('moodguard')}" + (f", git {code['git'][:12]}" if code.get("git") else "")
                 + (" (uncommitted changes)" if code.get("dirty") else ""))
    return "\n".join(lines)


def lineage_markdown(lineage: Mapping) -> str:
    """The model card's ``## Lineage`` section (values through the card's sanitisers)."""
    from train.card import card_prose, card_ref, card_value

    entries: Sequence[Mapping] = [*lineage.get("ancestors", [])]
    lines = ["## Lineage", "", "Root first; a bundle is named by the sha256 of its `manifest.json` "
             "(`moodguard lineage <folder>` prints the chain and checks the parent).", "",
             "| # | bundle | mode | monitor | gate |", "|---|---|---|---|---|"]
    for i, e in enumerate(entries, 1):
        lines.append(f"| {i} | `{card_value(e.get('sha256'), 16)}` | {card_value(e.get('mode'))} | "
                     f"{card_value(e.get('monitor'))} | {card_prose(_gate_text(e.get('gate')))} |")
    lines.append(f"| {len(entries) + 1} | this bundle | {card_value(lineage.get('mode'))} | "
                 f"{card_value(lineage.get('monitor'))} | {card_prose(_gate_text(lineage.get('gate')))} |")
    lines.append("")
    parent = lineage.get("parent")
    if parent:
        lines.append(f"- Parent: `{card_value(parent.get('sha256'))}` ({card_ref(str(parent.get('path')))})")
    for key, rec in (lineage.get("data") or {}).items():
        lines.append(f"- Data `{card_value(key)}`: {int(rec['rows'])} rows, sha256 `{card_value(rec['sha256'], 16)}`")
    code = lineage.get("code") or {}
    lines.append(f"- Code: moodguard {card_value(code.get('moodguard'))}"
                 + (f", git `{card_value(code.get('git'), 12)}`" if code.get("git") else ""))
    return "\n".join(lines) + "\n"


__all__ = ["LINEAGE", "LINEAGE_FORMAT", "MODES", "check_lineage", "child_lineage", "code_version", "data_record",
           "format_chain", "lineage_markdown", "read_lineage", "root_lineage", "summary"]
