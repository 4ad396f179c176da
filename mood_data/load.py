"""Load MOOD splits from the embedded benchmark, local files/folders or the hub, and validate them.

The one entry point, :func:`load_splits`; its jobs have their modules: :mod:`mood_data.records`
(reading a file's rows), :mod:`mood_data.validate` (the row schema), :mod:`mood_data.sources`
(which files a source names) and :mod:`mood_data.leakage` (train / test overlap). Every problem is
a one-line :class:`~mood_data.errors.DataError` of the form ``<file>: row <n>: field '<field>':
<problem>`` (see ``docs/data.md``). The result is one ``datasets.Dataset`` per split with exactly
the columns ``id`` (str), ``conversation`` (str), ``domain`` (str) and ``malign`` (int 0/1).

Row numbers are 1-based: the line number for JSON lines, the record number (header not
counted) for CSV, the position in the array / table for JSON, parquet and hub splits.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

from .domains import DEFAULT_REGISTRY, DomainRegistry, load_registry
from .errors import DataError
from .leakage import LeakageWarning, leakage_message, leakage_report
from .records import SPLITS, Record, first_line, infer_split, read_hub_records, read_records
from .sources import looks_like_local, not_found, split_files
from .validate import validate_records


class Splits(dict):
    """``{split: datasets.Dataset}``; ``.leakage`` holds the train/test leakage report
    (``None`` when only one split was loaded)."""

    leakage: dict | None = None


def _features():
    from datasets import Features, Value

    return Features({"id": Value("string"), "conversation": Value("string"),
                     "domain": Value("string"), "malign": Value("int64")})


def _to_dataset(cols: dict, *, label: str, split: str):
    from datasets import Dataset, DatasetInfo

    features = _features()
    info = DatasetInfo(description=json.dumps({"source": label, "split": split}), features=features)
    return Dataset.from_dict(cols, features=features, info=info)


def _resolve_registry(registry: DomainRegistry | str | os.PathLike | None) -> DomainRegistry:
    if registry is None:
        return DEFAULT_REGISTRY
    if isinstance(registry, DomainRegistry):
        return registry
    return load_registry(registry)


def _resolve_template(template: Any) -> Any:
    """``"mood"`` (built-in), a tokenizer object, or a tokenizer path / ``embedded:`` name."""
    if template is None or template == "mood":
        return "mood"
    if isinstance(template, (str, os.PathLike)):
        from transformers import AutoTokenizer

        from .embedded import model_path

        try:
            return AutoTokenizer.from_pretrained(str(model_path(str(template))), trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{template}: cannot load a tokenizer for its chat template ({first_line(exc)})") from None
    return template


def _load_records(records: Iterable[Record], *, label: str, split: str, registry: DomainRegistry, template: Any):
    cols, numbers = validate_records(records, label=label, split=split, registry=registry, template=template)
    return _to_dataset(cols, label=label, split=split), numbers


def load_split_file(path: str | Path, split: str | None = None, *, registry: DomainRegistry | str | None = None,
                    template: Any = "mood"):
    """Load and validate one local file as ``split`` (default: from the file name, else test)."""
    split = split or infer_split(path) or "test"
    _check_split_names((split,))
    ds, _ = _load_records(read_records(path), label=str(path), split=split,
                          registry=_resolve_registry(registry), template=_resolve_template(template))
    return ds


def _check_split_names(splits: Sequence[str]) -> None:
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"split {s!r}: unknown split (expected one of {', '.join(SPLITS)})")


def cap_groups(ds, max_unsafe: int | None = None, max_safe: int | None = None, seed: int = 0):
    """At most ``max_unsafe`` rows of every (domain, malign=1) group and ``max_safe`` of every
    (domain, malign=0) group, chosen with a seeded permutation, original order kept. For quick
    runs (the demo); ``None`` keeps the group whole."""
    import numpy as np

    caps = {1: max_unsafe, 0: max_safe}
    for cap in caps.values():
        if cap is not None and (not isinstance(cap, int) or cap < 1):
            raise DataError(f"test row cap: expected a positive integer, got {cap!r}")
    if max_unsafe is None and max_safe is None:
        return ds
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (dom, mal) in enumerate(zip(ds["domain"], ds["malign"])):
        groups.setdefault((dom, int(mal)), []).append(i)
    keep: list[int] = []
    for key in sorted(groups):
        idx, cap = groups[key], caps[key[1]]
        keep += idx if cap is None or len(idx) <= cap else [idx[j] for j in rng.permutation(len(idx))[:cap]]
    return ds if len(keep) == len(ds) else ds.select(sorted(keep))


def load_splits(source: str | os.PathLike | None = None, *, splits: Sequence[str] = SPLITS,
                registry: DomainRegistry | str | os.PathLike | None = None, allow_leakage: bool = False,
                template: Any = "mood") -> Splits:
    """Load, validate and leakage-check MOOD splits; see the module docstring and docs/data.md.

    ``source``: ``None``/``"embedded"`` (the embedded benchmark), a folder with ``train.*`` /
    ``test.*``, a single file (then ``splits`` must name exactly one split), or anything else
    that is not an existing local path: a hub id for ``datasets.load_dataset``.
    """
    from .embedded import benchmark_dir

    splits = tuple(splits)
    _check_split_names(splits)
    if not splits:
        raise DataError("splits: no split requested")
    reg = _resolve_registry(registry)
    tmpl = _resolve_template(template)

    sources: dict[str, tuple[str, Iterable[Record]]] = {}
    if source is None or str(source) == "embedded":
        folder = benchmark_dir()
        if not folder.is_dir():
            raise DataError(f"embedded: benchmark not found at {folder} (build it with `moodguard data build`)")
        for split, path in split_files(folder, splits).items():
            sources[split] = (str(path), read_records(path))
    elif Path(source).is_dir():
        for split, path in split_files(source, splits).items():
            sources[split] = (str(path), read_records(path))
    elif Path(source).is_file():
        if len(splits) != 1:
            raise DataError(f"{source}: a single file holds one split; name it (splits=('test',), --split test) "
                            "or give a folder with train.* and test.* files")
        sources[splits[0]] = (str(source), read_records(source))
    elif Path(source).exists():  # a FIFO, socket or device: say what it is, never block reading it
        from .readers import regular_file

        regular_file(Path(source), DataError)
    elif looks_like_local(str(source)):
        raise DataError(not_found(str(source)))
    else:
        for split in splits:
            sources[split] = (f"{source}[{split}]", read_hub_records(str(source), split))

    out = Splits()
    numbers: dict[str, list[int]] = {}
    labels = {split: label for split, (label, _) in sources.items()}
    for split, (label, records) in sources.items():
        out[split], numbers[split] = _load_records(records, label=label, split=split, registry=reg, template=tmpl)

    if "train" in out and "test" in out:
        report = leakage_report(out["train"], out["test"])
        out.leakage = report
        out["test"].info.description = json.dumps({**json.loads(out["test"].info.description), "leakage": report})
        if report["n_test_rows"]:
            message = leakage_message(report, labels, numbers)
            if not allow_leakage:
                raise DataError(f"{message}; pass --allow-leakage (allow_leakage=True) to load anyway")
            warnings.warn(message, LeakageWarning, stacklevel=2)
    return out


__all__ = ["Splits", "cap_groups", "load_split_file", "load_splits"]
