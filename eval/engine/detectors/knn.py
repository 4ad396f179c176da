"""Deep nearest-neighbour OOD detector (Sun et al. 2022) on L2-normalised features.

Score = Euclidean distance from the normalised input to its k-th nearest normalised training
(safe) feature; higher = more OOD. Distances come from batched float64 matmuls,
``||u - v||^2 = ||u||^2 + ||v||^2 - 2 u.v`` (the exact norms of the stored float32 reference
rows are used, so near-duplicates get distance ~0, not the ~1e-4 that ``2 - 2 u.v`` gives). The reference set is bounded by ``max_ref`` (seeded subsample
without replacement) so memory and time stay predictable.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mood_data.errors import DataError, RecipeError

from .base import FEATURES, Detector
from .tensors import as_f64, check_shape, load_tensors, save_tensors


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass(frozen=True)
class KNNSettings:
    k: int
    max_ref: int


class KNNDetector(Detector):
    """The ``knn`` detector: distance to the k-th nearest safe train feature. A fitted instance
    holds the reference set; build it with :meth:`fit`, :meth:`fit_stream` / :meth:`fitter` or
    :meth:`load`."""

    name = "knn"
    needs = FEATURES
    requires_fit = True
    Settings = KNNSettings
    KIND = "knn"  # the statistics files' "detector" field

    def __init__(self, reference: np.ndarray, k: int, meta: dict | None = None):
        if k < 1 or k > reference.shape[0]:
            raise RecipeError(f"knn: field 'k': must be in [1, {reference.shape[0]}] (reference rows), got {k}")
        self.reference = np.ascontiguousarray(reference, dtype=np.float32)
        self.k = int(k)
        self.meta = dict(meta or {})

    @classmethod
    def fit(cls, features, malign=None, *, k: int = 50, max_ref: int = 20000, seed: int = 0,
            metadata: dict | None = None) -> "KNNDetector":
        """Reference = normalised safe train rows (all rows if ``malign`` is None), at most ``max_ref``."""
        x = as_f64(features)
        if x.ndim != 2:
            raise DataError(f"features: expected a 2-D [n, d] array, got shape {list(x.shape)}")
        if malign is not None:
            x = x[~np.asarray(malign).reshape(-1).astype(bool)]
        n_total = x.shape[0]
        if n_total > max_ref:
            idx = np.sort(np.random.default_rng(seed).choice(n_total, size=max_ref, replace=False))
            x = x[idx]
        meta = {"k": int(k), "max_ref": int(max_ref), "seed": int(seed), "n_fit": int(n_total),
                "n_ref": int(x.shape[0]), "d": int(x.shape[1]), "metadata": dict(metadata or {})}
        return cls(l2_normalize(x), k, meta)

    @property
    def settings(self) -> KNNSettings:
        return KNNSettings(self.k, int(self.meta.get("max_ref", self.reference.shape[0])))

    @classmethod
    def fitter(cls, settings: KNNSettings) -> "KNNStreamFit":
        """Fitting fed batch by batch (``update(features, malign)``, ``finalize(metadata)``)."""
        return KNNStreamFit(settings.k, settings.max_ref)

    def score(self, features, batch_size: int = 2048) -> np.ndarray:
        """k-th nearest-neighbour distance of each (normalised) row to the reference set."""
        import torch

        x = as_f64(features)
        if x.ndim != 2 or x.shape[1] != self.reference.shape[1]:
            raise DataError(f"features: expected shape [n, {self.reference.shape[1]}], got {list(x.shape)}")
        ref = torch.from_numpy(self.reference).to(torch.float64)
        ref_sq = (ref * ref).sum(dim=1)
        q_all = torch.from_numpy(l2_normalize(x))
        out = np.empty(x.shape[0])
        starts = range(0, x.shape[0], batch_size)
        for i in tqdm(starts, desc="knn", disable=None if len(starts) > 10 else True, leave=False):
            q = q_all[i:i + batch_size]
            d2 = (q * q).sum(dim=1, keepdim=True) + ref_sq[None, :] - 2.0 * (q @ ref.T)
            kth = torch.topk(d2, self.k, dim=1, largest=False).values[:, -1]
            out[i:i + batch_size] = torch.sqrt(torch.clamp(kth, min=0.0)).numpy()
        return out

    def save(self, directory: str | Path, name: str) -> Path:
        return save_tensors(directory, name, {"reference": self.reference},
                            {"detector": self.KIND, **self.meta, "k": self.k})

    @classmethod
    def load(cls, directory: str | Path, name: str) -> "KNNDetector":
        tensors, meta = load_tensors(directory, name, cls.KIND)
        ref = tensors.get("reference")
        path = Path(directory) / f"{name}.safetensors"
        if ref is None or ref.ndim != 2:
            from mood_data.errors import BundleError

            raise BundleError(f"{path}: tensor 'reference': missing or not 2-D")
        check_shape(path, "reference", ref, (meta.get("n_ref"), meta.get("d")))
        meta = {k: v for k, v in meta.items() if k not in ("detector", "tensors", "sha256", "format_version")}
        return cls(ref, int(meta["k"]), meta)


class KNNStreamFit:
    """Collects the SAFE rows' features batch by batch; ``finalize`` fits the reference set
    (``k`` capped at the number of rows)."""

    def __init__(self, k: int, max_ref: int):
        self.k, self.max_ref, self.parts = int(k), int(max_ref), []

    def update(self, features, malign) -> None:
        safe = features[np.asarray(malign) == 0]
        # float32 like the stored reference (a torch batch from the guard pass, or an array)
        self.parts.append(safe.float().numpy() if hasattr(safe, "float") else np.asarray(safe, dtype=np.float32))

    def finalize(self, metadata: dict | None = None) -> KNNDetector:
        x = np.concatenate(self.parts) if self.parts else np.zeros((0, 1))
        return KNNDetector.fit(x, k=min(self.k, max(len(x), 1)), max_ref=self.max_ref, metadata=metadata)
