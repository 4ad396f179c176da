"""Cache keys and the score caches under ``<run>/stats/``: a slice's fingerprint, the key of a
set of parts, and reading / writing cached ID-validation (calibration) scores."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from mood_data import atomic
from mood_data.errors import BundleError
from mood_data.readers import loads_json, read_json

STATS_VERSION = 1


def fingerprint(ids: Sequence[str], conversations: Sequence[str]) -> str:
    """sha256 over the (id, conversation) pairs of a slice, in order."""
    h = hashlib.sha256()
    for i, c in zip(ids, conversations):
        h.update(str(i).encode())
        h.update(b"\0")
        h.update(c.encode())
        h.update(b"\1")
    return h.hexdigest()


def cache_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a cache folder except its ``meta.json`` (which records them)."""
    from mood_data.readers import sha256_file

    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"}


def cache_intact(folder: Path) -> bool:
    """A cache folder whose files still have the sha256 its ``meta.json`` recorded (an edited,
    truncated or missing file -> False, and the entry is recomputed rather than trusted). Only
    the recorded files are hashed: nothing else in the folder is ever read."""
    from mood_data.readers import sha256_file

    try:
        meta = loads_json((folder / "meta.json").read_text(encoding="utf-8"))
        recorded = meta.get("sha256") if isinstance(meta, dict) else None
        if not isinstance(recorded, dict) or not recorded:
            return False
        return all("/" not in name and sha256_file(folder / name) == digest for name, digest in recorded.items())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON, refused (DocumentRefused)
        return False


def cache_key(**parts) -> str:
    blob = json.dumps({"version": STATS_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def read_calibration(d: Path) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    from safetensors.numpy import load_file

    t = load_file(str(d / "scores.safetensors"))
    meta = read_json(d / "meta.json", BundleError)
    malign = t.pop("malign").astype(np.int64)
    return t, malign, meta["domains"]


def calibration_ids(d: Path) -> list:
    """The ids of the ID validation rows of a calibration cache folder, in score order."""
    return list(read_json(d / "meta.json", BundleError)["ids"])


def cached_scores(stats_root: Path, kind: str, parts: dict, compute) -> dict[str, np.ndarray]:
    """Extra detectors' scores on the ID validation slice (``compute() -> {name: scores}``),
    cached under ``<run>/stats/calibration-<kind>-<key>/`` like
    :func:`eval.run.fitting.calibration_scores`."""
    from safetensors.numpy import load_file, save_file

    d = stats_root / f"calibration-{kind}-{cache_key(kind=kind, **parts)}"
    if (d / "scores.safetensors").is_file() and cache_intact(d):
        return {k: v.astype(np.float64) for k, v in load_file(str(d / "scores.safetensors")).items()}
    scores = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in compute().items()}
    with atomic.atomic_dir(d) as tmp:
        save_file(scores, str(tmp / "scores.safetensors"))
        atomic.write_json(tmp / "meta.json", {"kind": kind, "parts": parts, "sha256": cache_digests(tmp)})
    return scores


__all__ = ["STATS_VERSION", "cache_digests", "calibration_ids", "cache_intact", "cache_key", "cached_scores", "fingerprint",
           "read_calibration"]
