"""The data of a refresh (``moodguard refresh``, docs/refresh.md): the parent's old rows, the new
rows read through the normal loader and validator, de-duplicated against the old rows by content
hash, and split train / validation / test with the seeded, stratified rule of training.

* **Old rows**: the parent's data source (its recipe's ``data`` section): the seeded train /
  validation cut it was fitted on (:func:`train.data.validation_cut`; a folder a refresh wrote
  holds that cut as ``train.jsonl`` + ``validation.jsonl``, read as given) and its test split.
* **New rows** (``--data``: one file, or a folder with ``train.*`` / ``test.*``): validated with
  the refresh's registry (the parent's plus ``--domains``: new domains are declared there).
  Rows whose conversation (normalised like the leakage check: lower case, whitespace collapsed)
  is already in the old train or test split, or earlier in the new data, are dropped and
  reported. Rows of ID domains are split: a seeded, stratified ``test_fraction`` is held out
  for the gate, the rest is cut train / validation with ``data.validation_fraction`` (the
  same function, seed 0); rows of OOD domains are test rows only (nothing fits on them).
* **What each part fits** (nothing fits on a test row): the guard / LM train on old train + new
  train (or new train + a seeded replay sample of old train rows); Mahalanobis fits on the safe
  rows of old train + new train; the fusion on the ID rows of old validation + new validation;
  the gate and the thresholds read old test + new test.

Written under ``<out>/data/``: ``full/`` (``train.jsonl`` = old + new train, ``validation.jsonl``
= old + new validation, ``test.jsonl`` = old + new test: the candidate's data source, and the old
rows of the next refresh), ``replay/train.jsonl`` (replay mode), ``new-{train,validation,test}.jsonl``,
``dedup.json`` and ``domains.yaml`` (the merged registry, when there is one).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mood_data import atomic
from mood_data.domains import DomainRegistry, load_registry
from mood_data.errors import DataError
from mood_data.leakage import conversation_hash
from mood_data.readers import read_yaml

COLUMNS = ("id", "conversation", "domain", "malign")
VALIDATION = "validation"  # the explicit validation slice of a folder a refresh wrote


@dataclass
class OldData:
    """The parent's rows: its fitted cut and its test split (``datasets.Dataset`` each)."""

    train: Any
    validation: Any
    test: Any
    all_train: Any  # the whole train split (de-duplication looks at every row of it)


@dataclass
class NewData:
    """The new rows after de-duplication, split; ``report``: what was dropped and why."""

    rows: Any
    train: Any
    validation: Any
    test: Any
    report: dict = field(default_factory=dict)


def merge_registries(paths: Sequence[str | Path | None], out: Path) -> Path | None:
    """One domains YAML declaring the custom domains of every file in ``paths`` (the parent's
    registry and ``--domains``); None when there are none. A domain declared as two kinds is a
    one-line DataError naming the file."""
    merged: dict[str, list[str]] = {"id": [], "ood": [], "opt_in": []}
    kind_of: dict[str, tuple[str, str]] = {}
    any_file = False
    for p in paths:
        if p is None:
            continue
        any_file = True
        load_registry(p)  # its own checks first (names, keys, built-in clashes)
        doc = read_yaml(Path(p), DataError, what="domains file") or {}
        for kind in merged:
            for name in doc.get(kind) or []:
                if name in kind_of and kind_of[name][0] != kind:
                    raise DataError(f"{p}: key '{kind}': domain '{name}' is declared as '{kind_of[name][0]}' in "
                                    f"{kind_of[name][1]}")
                if name not in kind_of:
                    kind_of[name] = (kind, str(p))
                    merged[kind].append(name)
    if not any_file:
        return None
    import yaml

    atomic.write_text(out, yaml.safe_dump(merged, sort_keys=False))
    load_registry(out)
    return out


def explicit_validation(source: str | None) -> Path | None:
    """The ``validation.*`` file of a folder a refresh wrote (its cut, held as given), else None."""
    folder = Path(source) if source not in (None, "embedded") else None
    if folder is None or not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().startswith(f"{VALIDATION}."))
    return found[0] if found else None


def load_old(source: str, *, template: str, registry: str | None, fraction: float, max_rows: int | None,
             groups: str = "row") -> OldData:
    """The parent's train split and test split, each read once, and the cut it was fitted on: a
    folder with a ``validation.*`` file beside ``train.*`` (what a refresh writes) holds its cut
    as given; anything else is cut by :func:`train.data.validation_cut` with the parent's
    settings (``data.validation_fraction``, ``data.max_train_rows``, ``data.validation_groups``)."""
    from mood_data.load import load_split_file, load_splits
    from mood_data.sources import has_local_test_split
    from train.data import validation_cut

    if not has_local_test_split(source):
        raise DataError(f"{source}: the parent's data source has no local test split (a refresh gates on the old "
                        "test rows: give the parent a source with train.* and test.* files)")
    splits = load_splits(source, splits=("train", "test"), registry=registry, template=template)
    val_file = explicit_validation(source)
    if val_file is not None:
        train = splits["train"]
        validation = load_split_file(val_file, "train", registry=registry, template=template)
        return OldData(train, validation, splits["test"], concat(train, validation))
    train, validation = validation_cut(source, template=template, registry=registry, fraction=fraction,
                                       max_rows=max_rows, train_split=splits["train"], groups=groups)
    return OldData(train, validation, splits["test"], splits["train"])


def _row_of(path: Path, rid: str) -> int | None:
    """The row number of id ``rid`` in the file ``path`` (for an error message)."""
    from mood_data.records import read_records

    try:
        return next((n for n, r in read_records(path) if isinstance(r, dict) and r.get("id") == rid), None)
    except DataError:
        return None


def read_new(path: str | Path, registry: DomainRegistry | str | None, template: str) -> dict[str, Any]:
    """The new rows through the normal loader: ``{"rows": Dataset}`` for a file, or ``{"train":
    ..., "test": ...}`` for a folder with both splits (train rows must then be ID rows)."""
    from mood_data.load import load_split_file, load_splits

    path = Path(path)
    if path.is_dir():
        return dict(load_splits(path, splits=("train", "test"), registry=registry, template=template))
    if not path.exists():
        raise DataError(f"{path}: file not found (--data: the new rows)")
    return {"rows": load_split_file(path, "test", registry=registry, template=template)}


def deduplicate(new, old: OldData, label: str, source: Path) -> tuple[list[int], dict]:
    """Indices of the new rows to keep and the report of the dropped ones: conversations already
    in the old train or test split, or repeated in the new data (the first kept). An id of the
    old rows is a one-line DataError (ids must be unique across old and new rows)."""
    old_ids = {"old train split": set(old.all_train["id"]), "old test split": set(old.test["id"])}
    for i, rid in enumerate(new["id"]):
        for where, ids in old_ids.items():
            if rid in ids:
                row = _row_of(source, rid) if source.is_file() else None
                loc = f"{label}: row {row}" if row is not None else label
                raise DataError(f"{loc}: field 'id': id {rid!r} is also an id of the {where} (ids must be unique "
                                "across old and new rows)")
    seen = {"old train split": {conversation_hash(c) for c in old.all_train["conversation"]},
            "old test split": {conversation_hash(c) for c in old.test["conversation"]}}
    own: set[str] = set()
    keep, dropped = [], {"old train split": [], "old test split": [], "repeated in the new data": []}
    for i, (rid, conv) in enumerate(zip(new["id"], new["conversation"])):
        h = conversation_hash(conv)
        reason = next((w for w, hs in seen.items() if h in hs), None) or ("repeated in the new data" if h in own else None)
        if reason:
            dropped[reason].append(rid)
            continue
        own.add(h)
        keep.append(i)
    report = {"n_read": len(new), "n_kept": len(keep),
              "dropped": {k: {"rows": len(v), "ids": v[:5]} for k, v in dropped.items()}}
    return keep, report


def _cut(ds, fraction: float, what: str, label: str, groups: str = "row"):
    """``(rest, held out)``: the seeded, stratified split of training (train.data), by rows or by
    prompt groups (``data.validation_groups``)."""
    from train.data import train_validation_split

    try:
        parts = train_validation_split(ds, fraction, seed=0, groups=groups)
    except DataError:
        raise DataError(f"{label}: {len(ds)} new ID rows are too few to hold out a {what} part of {fraction:g} "
                        f"(need at least two rows of one (domain, label) cell)") from None
    return parts["train"], parts["validation"]


def split_new(raw: dict[str, Any], old: OldData, registry: DomainRegistry, *, test_fraction: float,
              validation_fraction: float, label: str, source: Path, groups: str = "row") -> NewData:
    """De-duplicate and split the new rows (module docstring)."""
    import datasets

    if "rows" in raw:
        rows = raw["rows"]
    else:
        rows = datasets.concatenate_datasets([raw["train"], raw["test"]])
    keep, report = deduplicate(rows, old, label, source)
    if not keep:
        raise DataError(f"{label}: every new row is already in the parent's data or repeated "
                        f"({report['n_read']} read): nothing to refresh on")
    rows = rows.select(keep)
    is_id = [registry.is_id(d) for d in rows["domain"]]
    id_rows = rows.select([i for i, x in enumerate(is_id) if x])
    ood_rows = rows.select([i for i, x in enumerate(is_id) if not x])
    if "rows" in raw:  # one file: hold out a test part of the ID rows
        if len(id_rows):
            train_all, test_id = _cut(id_rows, test_fraction, "test", label, groups)
        else:
            train_all, test_id = id_rows, id_rows
    else:  # a folder: its own train / test files
        given_test = set(raw["test"]["id"])
        train_all = id_rows.filter(lambda b: [i not in given_test for i in b["id"]], batched=True)
        test_id = id_rows.filter(lambda b: [i in given_test for i in b["id"]], batched=True)
    if len(train_all) == 0:
        raise DataError(f"{label}: no new row of an ID domain to train on ({len(rows)} rows, all of OOD domains "
                        "or held out): declare the new domain under 'id' in --domains")
    if len(train_all) >= 2:
        train, validation = _cut(train_all, validation_fraction, "validation", label, groups)
    else:
        train, validation = train_all, train_all.select([])
    test = datasets.concatenate_datasets([test_id, ood_rows]) if len(ood_rows) else test_id
    report["n_train"], report["n_validation"], report["n_test"] = len(train), len(validation), len(test)
    report["domains"] = {d: {"id": registry.is_id(d), "rows": int(sum(1 for x in rows["domain"] if x == d)),
                             "unsafe": int(sum(1 for x, m in zip(rows["domain"], rows["malign"]) if x == d and m))}
                         for d in sorted(set(rows["domain"]))}
    return NewData(rows, train, validation, test, report)


def replay_sample(old_train, n: int, seed: int = 0):
    """``n`` rows of the old train slice chosen with a seeded permutation (original order kept)."""
    import numpy as np

    n = min(int(n), len(old_train))
    if n <= 0:
        return old_train.select([])
    idx = np.random.default_rng(seed).permutation(len(old_train))[:n]
    return old_train.select(sorted(int(i) for i in idx))


def concat(*parts):
    import datasets

    parts = [p for p in parts if p is not None and len(p)]
    return datasets.concatenate_datasets(parts) if parts else None


def write_rows(path: Path, ds) -> Path:
    """A slice as JSON lines with the four MOOD columns (atomic)."""
    cols = {c: list(ds[c]) for c in COLUMNS} if ds is not None else {c: [] for c in COLUMNS}
    return atomic.write_jsonl(path, ({c: cols[c][i] for c in COLUMNS} for i in range(len(cols["id"]))))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes, sorted)."""
    from mood_data.readers import sha256_file

    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


__all__ = ["NewData", "OldData", "concat", "deduplicate", "file_sha256", "explicit_validation", "load_old", "merge_registries",
           "read_new", "replay_sample", "split_new", "write_rows"]
