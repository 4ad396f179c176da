"""Mahalanobis OOD detector with streaming float64 Gaussian statistics.

Streaming: :class:`GaussianAccumulator` keeps, relative to a fixed shift ``c`` (the first
batch's mean, for numerical conditioning), ``n``, ``S1 = sum y``, ``S2 = sum y y^T``,
``T = sum ||y||^2 y`` and ``Q = sum ||y||^4`` with ``y = x - c``. Memory is O(d^2); features are
never kept. Moving the shift by ``delta`` is an exact polynomial identity (:func:`_reshift`), so
``merge`` of accumulators with different shifts and the centred moments at ``finalize`` are
exact. The fourth-moment terms ``T, Q`` give ``sum ||x - mean||^4``, which is what the
Ledoit-Wolf shrinkage intensity needs; OAS needs only the covariance.

Estimators (``finalize``), with ``C = scatter / n``, ``p = d``, ``mu = tr(C) / p``:

* ``empirical``: ``scatter / (n - k) + ridge I`` (k = number of class means; k = 1 is the
  unbiased covariance used by mood-bench);
* ``ledoit_wolf``: sklearn's ``LedoitWolf(assume_centered=False)``:
  ``beta = (sum||x-m||^4 / n - ||C||_F^2) / (p n)``, ``delta = ||C - mu I||_F^2 / p``,
  ``s = min(beta, delta) / delta``, ``cov = (1 - s) C + s mu I (+ ridge I)``;
* ``oas``: sklearn's ``OAS``: ``alpha = mean(C**2)``,
  ``s = min((alpha + mu^2) / ((n + 1)(alpha - mu^2 / p)), 1)``, same shrunk form.

Score = squared Mahalanobis distance ``(x - m)^T P (x - m)`` (row-wise, batched); ``P`` is the
inverse of the covariance in float64 (Cholesky solve; pseudo-inverse if singular). Variants:

* ``plain`` -- one Gaussian on the safe train rows (mood-bench; the default);
* ``class_conditional`` -- safe and unsafe means with one tied (pooled within-class)
  covariance. ``class_score="min"`` (default, Lee et al. 2018): ``min_c MD_c(x)``, large when
  the input is far from *both* training classes, i.e. an OOD score; the guard head covers
  safe-vs-unsafe. ``class_score="llr"``: ``MD_safe(x) - MD_unsafe(x)`` (2x the Gaussian
  log-likelihood ratio unsafe/safe; higher = closer to the unsafe class);
* ``relative`` -- Ren et al. 2021: ``MD_safe(x) - MD_background(x)`` with the background
  Gaussian fitted on all train rows (safe and unsafe), same estimator.

All scores: higher = more unsafe / OOD.

Sufficient statistics (``moodguard refresh``): a detector fitted here keeps, per fitted class,
the accumulator in centred form -- count ``n``, ``mean``, ``scatter = sum (x-m)(x-m)^T`` and the
two higher moments the shrinkage estimators need (``third = sum ||x-m||^2 (x-m)``, ``q4 = sum
||x-m||^4``), all float64 -- and saves them beside the mean and precision (``suff_*`` tensors).
:meth:`MahalanobisDetector.updated` adds new rows to them (the exact merge of
:meth:`GaussianAccumulator.merge`) and finalises again: the same detector as a full refit on the
old and the new rows, without a pass over the old rows. A detector saved before these statistics
existed loads and scores as before, but cannot be updated (:attr:`MahalanobisDetector.updatable`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mood_data.errors import DataError, RecipeError

from .base import FEATURES, Detector
from .tensors import as_f64, check_shape, load_tensors, save_tensors

ESTIMATORS = ("empirical", "ledoit_wolf", "oas")
VARIANTS = ("plain", "class_conditional", "relative")
CLASS_SCORES = ("min", "llr")


def _reshift(n: int, s1, s2, t, q, delta):
    """Moments of ``y - delta`` from the moments of ``y`` (exact identities)."""
    e = float(delta @ delta)
    s1d = float(s1 @ delta)
    tr = float(np.trace(s2))
    s2d = s2 @ delta
    q_new = q + 4.0 * float(delta @ s2d) + n * e * e - 4.0 * float(t @ delta) + 2.0 * e * tr - 4.0 * e * s1d
    t_new = t - delta * tr - 2.0 * s2d + 2.0 * delta * s1d + e * s1 - n * e * delta
    s2_new = s2 - np.outer(s1, delta) - np.outer(delta, s1) + n * np.outer(delta, delta)
    s1_new = s1 - n * delta
    return s1_new, s2_new, t_new, q_new


@dataclass
class GaussianAccumulator:
    """Streaming first, second and fourth-order moments of feature rows (float64)."""

    n: int = 0
    shift: np.ndarray | None = None
    s1: np.ndarray | None = None
    s2: np.ndarray | None = None
    t: np.ndarray | None = None
    q: float = 0.0

    @property
    def d(self) -> int | None:
        return None if self.shift is None else int(self.shift.shape[0])

    def _init(self, shift: np.ndarray) -> None:
        d = shift.shape[0]
        self.shift = shift.copy()
        self.s1, self.s2, self.t = np.zeros(d), np.zeros((d, d)), np.zeros(d)

    def update(self, features) -> "GaussianAccumulator":
        """Add rows ``features[n, d]`` (numpy or torch, any float dtype)."""
        x = as_f64(features)
        if x.ndim != 2:
            raise DataError(f"features: expected a 2-D [n, d] array, got shape {list(x.shape)}")
        if x.shape[0] == 0:
            return self
        if self.shift is None:
            self._init(x.mean(axis=0))
        elif x.shape[1] != self.d:
            raise DataError(f"features: expected dimension {self.d}, got {x.shape[1]}")
        y = x - self.shift
        a = np.einsum("nd,nd->n", y, y)
        self.n += x.shape[0]
        self.s1 += y.sum(axis=0)
        self.s2 += y.T @ y
        self.t += y.T @ a
        self.q += float(a @ a)
        return self

    def merge(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        """Add another accumulator's rows (e.g. from another process or chunk) in place."""
        if other.n == 0:
            return self
        if self.shift is None:
            self._init(other.shift)
        elif other.d != self.d:
            raise DataError(f"merge: dimension {other.d} does not match {self.d}")
        s1, s2, t, q = _reshift(other.n, other.s1, other.s2, other.t, other.q, self.shift - other.shift)
        self.n += other.n
        self.s1 += s1
        self.s2 += s2
        self.t += t
        self.q += q
        return self

    def centred(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(mean, scatter = sum (x-m)(x-m)^T, sum ||x-m||^4)``."""
        if self.n == 0:
            raise DataError("Gaussian fit: no rows were given")
        delta = self.s1 / self.n
        _, s2, _, q = _reshift(self.n, self.s1, self.s2, self.t, self.q, delta)
        s2 = 0.5 * (s2 + s2.T)
        return self.shift + delta, s2, max(q, 0.0)

    def centred_state(self) -> "GaussianAccumulator":
        """The same rows' accumulator shifted to their mean: ``shift`` = mean, ``s2`` = scatter,
        ``t`` = sum ||x-m||^2 (x-m), ``q`` = sum ||x-m||^4 (``s1`` = 0 up to rounding, dropped):
        the sufficient statistics a detector stores (:meth:`MahalanobisDetector.updated`)."""
        if self.n == 0:
            return GaussianAccumulator()
        delta = self.s1 / self.n
        _, s2, t, q = _reshift(self.n, self.s1, self.s2, self.t, self.q, delta)
        out = GaussianAccumulator(self.n, self.shift + delta, np.zeros_like(self.s1), 0.5 * (s2 + s2.T), t, float(q))
        return out

    def finalize(self, estimator: str = "empirical", ridge: float = 1e-6) -> "GaussianStats":
        mean, scatter, q = self.centred()
        cov, shrink = covariance_from_scatter(scatter, q, self.n, estimator, ridge, n_means=1)
        return GaussianStats(mean=mean, covariance=cov, n=self.n, estimator=estimator, ridge=ridge, shrinkage=shrink)


def covariance_from_scatter(
    scatter: np.ndarray, q4: float, n: int, estimator: str, ridge: float, n_means: int = 1
) -> tuple[np.ndarray, float]:
    """Covariance (and shrinkage intensity) from centred moments; see the module docstring."""
    if estimator not in ESTIMATORS:
        raise RecipeError(f"mahalanobis: field 'estimator': expected one of {ESTIMATORS}, got {estimator!r}")
    p = scatter.shape[0]
    eye = np.eye(p)
    if estimator == "empirical":
        if n - n_means <= 0:
            raise DataError(f"Gaussian fit: need more than {n_means} rows for an empirical covariance, got {n}")
        return scatter / (n - n_means) + ridge * eye, 0.0
    c = scatter / n
    mu = float(np.trace(c)) / p
    if p == 1:
        shrink = 0.0
    elif estimator == "ledoit_wolf":
        fro2 = float(np.sum(c * c))
        beta = (q4 / n - fro2) / (p * n)
        delta = (fro2 - 2.0 * mu * float(np.trace(c)) + p * mu * mu) / p
        beta = min(beta, delta)
        shrink = 0.0 if beta == 0 else beta / delta
    else:  # oas
        alpha = float(np.mean(c * c))
        den = (n + 1) * (alpha - mu * mu / p)
        shrink = 1.0 if den == 0 else min((alpha + mu * mu) / den, 1.0)
    cov = (1.0 - shrink) * c + (shrink * mu + ridge) * eye
    return cov, float(shrink)


def stable_precision(cov: np.ndarray) -> np.ndarray:
    """Inverse of a covariance in float64: Cholesky solve when positive definite, else the
    symmetric pseudo-inverse (singular covariance, e.g. ``ridge=0`` with n <= d)."""
    from scipy.linalg import LinAlgError, cho_factor, cho_solve

    cov = np.asarray(cov, dtype=np.float64)
    try:
        factor = cho_factor(cov, lower=True, check_finite=True)
        piv = np.diag(factor[0]) ** 2
        if piv.min() <= 1e-12 * piv.max():  # numerically singular: Cholesky "succeeded" on noise
            raise LinAlgError("ill-conditioned")
        prec = cho_solve(factor, np.eye(cov.shape[0]))
    except LinAlgError:
        prec = np.linalg.pinv(cov, hermitian=True)
    return 0.5 * (prec + prec.T)


def mahalanobis_sq(features, mean: np.ndarray, precision: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """Row-wise ``(x - m)^T P (x - m)`` in float64, batched (never an N x N matrix)."""
    x = as_f64(features)
    if x.ndim != 2 or x.shape[1] != mean.shape[0]:
        raise DataError(f"features: expected shape [n, {mean.shape[0]}], got {list(x.shape)}")
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], batch_size):
        xc = x[i:i + batch_size] - mean
        out[i:i + batch_size] = np.einsum("nd,nd->n", xc @ precision, xc)
    return out


@dataclass
class GaussianStats:
    """A fitted Gaussian: mean, covariance, precision (float64)."""

    mean: np.ndarray
    covariance: np.ndarray
    n: int
    estimator: str = "empirical"
    ridge: float = 1e-6
    shrinkage: float = 0.0
    precision: np.ndarray | None = None

    def __post_init__(self):
        if self.precision is None:
            self.precision = stable_precision(self.covariance)

    def score(self, features) -> np.ndarray:
        return mahalanobis_sq(features, self.mean, self.precision)


@dataclass
class MahalanobisFitter:
    """Streaming fit of a :class:`MahalanobisDetector` (per-class accumulators, mergeable)."""

    variant: str = "plain"
    safe: GaussianAccumulator = field(default_factory=GaussianAccumulator)
    unsafe: GaussianAccumulator = field(default_factory=GaussianAccumulator)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise RecipeError(f"mahalanobis: field 'variant': expected one of {VARIANTS}, got {self.variant!r}")

    def update(self, features, malign=None) -> "MahalanobisFitter":
        """Add train rows; ``malign`` (0/1 per row) defaults to all safe. ``plain`` skips unsafe rows."""
        x = as_f64(features)
        if malign is None:
            self.safe.update(x)
            return self
        y = np.asarray(malign).reshape(-1).astype(bool)
        if y.shape[0] != x.shape[0]:
            raise DataError(f"features: {x.shape[0]} rows but {y.shape[0]} malign labels")
        self.safe.update(x[~y])
        if self.variant != "plain":
            self.unsafe.update(x[y])
        return self

    def merge(self, other: "MahalanobisFitter") -> "MahalanobisFitter":
        self.safe.merge(other.safe)
        self.unsafe.merge(other.unsafe)
        return self

    def finalize(
        self,
        estimator: str = "empirical",
        ridge: float = 1e-6,
        *,
        class_score: str = "min",
        store_covariance: bool = False,
        metadata: dict | None = None,
    ) -> "MahalanobisDetector":
        if self.safe.n == 0:
            raise DataError(f"mahalanobis ({self.variant}): no safe train rows to fit on")
        if self.variant != "plain" and self.unsafe.n == 0:
            raise DataError(f"mahalanobis ({self.variant}): no unsafe train rows to fit on")
        if class_score not in CLASS_SCORES:
            raise RecipeError(f"mahalanobis: field 'class_score': expected one of {CLASS_SCORES}, got {class_score!r}")
        meta = {"variant": self.variant, "estimator": estimator, "ridge": float(ridge), "class_score": class_score,
                "n": self.safe.n, "d": self.safe.d, "metadata": dict(metadata or {})}
        if self.variant == "plain":
            g = self.safe.finalize(estimator, ridge)
            gauss = {"": g}
            meta["shrinkage"] = g.shrinkage
        elif self.variant == "relative":
            g = self.safe.finalize(estimator, ridge)
            bg = copy.deepcopy(self.safe).merge(self.unsafe).finalize(estimator, ridge)
            gauss = {"": g, "bg_": bg}
            meta.update(shrinkage=g.shrinkage, bg_shrinkage=bg.shrinkage, n_background=bg.n)
        else:
            (m_s, sc_s, q_s), (m_u, sc_u, q_u) = self.safe.centred(), self.unsafe.centred()
            n = self.safe.n + self.unsafe.n
            cov, shrink = covariance_from_scatter(sc_s + sc_u, q_s + q_u, n, estimator, ridge, n_means=2)
            g = GaussianStats(mean=m_s, covariance=cov, n=n, estimator=estimator, ridge=ridge, shrinkage=shrink)
            gu = GaussianStats(mean=m_u, covariance=cov, n=n, estimator=estimator, ridge=ridge,
                               shrinkage=shrink, precision=g.precision)
            gauss = {"": g, "unsafe_": gu}
            meta.update(shrinkage=shrink, n=n, n_safe=self.safe.n, n_unsafe=self.unsafe.n)
        return MahalanobisDetector(gauss, meta, store_covariance=store_covariance,
                                   sufficient=MahalanobisFitter(self.variant, self.safe.centred_state(),
                                                                self.unsafe.centred_state()))


# the accumulators a detector stores (tensor prefix, MahalanobisFitter field)
SUFFICIENT = (("suff_", "safe"), ("suff_unsafe_", "unsafe"))


@dataclass(frozen=True)
class MahalanobisSettings:
    estimator: str  # one of ESTIMATORS
    variant: str  # one of VARIANTS
    ridge: float


class MahalanobisDetector(Detector):
    """The ``maha`` detector: squared Mahalanobis distance of one layer's pooled guard features.
    A fitted instance holds the Gaussian(s); build it with :meth:`fit` (in memory),
    :meth:`fit_stream` / :meth:`fitter` (batch by batch) or :meth:`load`."""

    name = "maha"
    needs = FEATURES
    requires_fit = True
    Settings = MahalanobisSettings
    KIND = "mahalanobis"  # the statistics files' "detector" field

    def __init__(self, gaussians: dict[str, GaussianStats], meta: dict, store_covariance: bool = False,
                 sufficient: MahalanobisFitter | None = None):
        self.gaussians = gaussians
        self.meta = meta
        self.store_covariance = store_covariance
        self.sufficient = sufficient  # the fitted rows' centred accumulators (None: saved without them)

    @property
    def updatable(self) -> bool:
        """True when the detector holds its sufficient statistics (it can take new rows exactly)."""
        return self.sufficient is not None

    def updated(self, features, malign=None, *, metadata: dict | None = None) -> "MahalanobisDetector":
        """The detector refitted on its own rows plus ``features`` (``malign`` per row as in
        :meth:`MahalanobisFitter.update`), from the stored sufficient statistics: equal to a full
        refit on old + new rows up to float64 rounding, without the old rows. Same estimator,
        ridge, variant and class score; ``metadata`` replaces the recorded cache parts."""
        if self.sufficient is None:
            raise DataError("mahalanobis: these statistics were saved without their sufficient statistics "
                            "(count, mean, scatter): they cannot be updated, only refitted")
        fitter = copy.deepcopy(self.sufficient).update(features, malign)
        return fitter.finalize(self.meta["estimator"], self.meta["ridge"], class_score=self.meta["class_score"],
                               store_covariance=self.store_covariance,
                               metadata=self.meta.get("metadata") if metadata is None else metadata)

    @property
    def settings(self) -> MahalanobisSettings:
        return MahalanobisSettings(self.meta["estimator"], self.meta["variant"], float(self.meta["ridge"]))

    @classmethod
    def fitter(cls, settings: MahalanobisSettings) -> "MahalanobisStreamFit":
        """Fitting fed batch by batch (``update(features, malign)``, ``finalize(metadata)``)."""
        return MahalanobisStreamFit(MahalanobisFitter(settings.variant), settings.estimator, settings.ridge)

    variant = property(lambda self: self.meta["variant"])
    mean = property(lambda self: self.gaussians[""].mean)
    precision = property(lambda self: self.gaussians[""].precision)

    @classmethod
    def fit(cls, features, malign=None, *, variant: str = "plain", estimator: str = "empirical",
            ridge: float = 1e-6, class_score: str = "min", batch_size: int = 8192,
            store_covariance: bool = False, metadata: dict | None = None) -> "MahalanobisDetector":
        """One-shot fit on in-memory train features (streamed in ``batch_size`` chunks)."""
        x = as_f64(features)
        y = None if malign is None else np.asarray(malign).reshape(-1)
        fitter = MahalanobisFitter(variant)
        for i in range(0, x.shape[0], batch_size):
            fitter.update(x[i:i + batch_size], None if y is None else y[i:i + batch_size])
        return fitter.finalize(estimator, ridge, class_score=class_score,
                               store_covariance=store_covariance, metadata=metadata)

    def score(self, features) -> np.ndarray:
        """Per-row score, higher = more OOD / unsafe (see the module docstring)."""
        g = self.gaussians[""]
        d_in = g.score(features)
        if self.variant == "plain":
            return d_in
        if self.variant == "relative":
            return d_in - self.gaussians["bg_"].score(features)
        d_u = self.gaussians["unsafe_"].score(features)
        return np.minimum(d_in, d_u) if self.meta["class_score"] == "min" else d_in - d_u

    def save(self, directory: str | Path, name: str) -> Path:
        tensors = {}
        for prefix, g in self.gaussians.items():
            tensors[f"{prefix}mean"] = g.mean
            if prefix != "unsafe_":  # the class-conditional precision is tied
                tensors[f"{prefix}precision"] = g.precision
                if self.store_covariance:
                    tensors[f"{prefix}covariance"] = g.covariance
        meta = dict(self.meta)
        if self.sufficient is not None:
            for prefix, which in SUFFICIENT:
                acc = getattr(self.sufficient, which)
                if acc.n:
                    tensors.update({f"{prefix}mean": acc.shift, f"{prefix}scatter": acc.s2, f"{prefix}third": acc.t})
                    meta[f"{prefix}n"], meta[f"{prefix}q4"] = int(acc.n), float(acc.q)
        return save_tensors(directory, name, tensors, {"detector": self.KIND, **meta})

    @classmethod
    def load(cls, directory: str | Path, name: str) -> "MahalanobisDetector":
        tensors, meta = load_tensors(directory, name, cls.KIND)
        path = Path(directory) / f"{name}.safetensors"
        variant, d = meta.get("variant"), meta.get("d")
        if variant not in VARIANTS or not isinstance(d, int):
            raise_bad(Path(directory) / f"{name}.json", "variant/d", f"{variant!r}/{d!r}")
        prefixes = {"plain": [""], "relative": ["", "bg_"], "class_conditional": ["", "unsafe_"]}[variant]
        gauss = {}
        for prefix in prefixes:
            pkey = "precision" if prefix == "unsafe_" else f"{prefix}precision"
            for key, shape in ((f"{prefix}mean", (d,)), (pkey, (d, d))):
                if key not in tensors:
                    raise_bad(path, key, "missing")
                check_shape(path, key, tensors[key], shape)
            cov = tensors.get(f"{prefix}covariance")
            gauss[prefix] = GaussianStats(
                mean=tensors[f"{prefix}mean"].astype(np.float64),
                covariance=cov if cov is not None else np.full((d, d), np.nan),
                precision=tensors[pkey].astype(np.float64),
                n=int(meta.get("n", 0)), estimator=meta.get("estimator"), ridge=meta.get("ridge"),
                shrinkage=meta.get("shrinkage", 0.0),
            )
        sufficient = _load_sufficient(path, Path(directory) / f"{name}.json", tensors, meta, variant, d)
        meta = {k: v for k, v in meta.items() if k not in ("detector", "tensors", "sha256", "format_version")
                and not k.startswith("suff_")}
        return cls(gauss, meta, store_covariance="covariance" in tensors, sufficient=sufficient)


def _load_sufficient(tpath: Path, jpath: Path, tensors: dict, meta: dict, variant: str, d: int):
    """The stored accumulators (None when the file has none: saved before they were stored)."""
    if "suff_mean" not in tensors:
        return None
    fitter = MahalanobisFitter(variant)
    for prefix, which in SUFFICIENT:
        if f"{prefix}mean" not in tensors:
            continue
        for key, shape in ((f"{prefix}mean", (d,)), (f"{prefix}scatter", (d, d)), (f"{prefix}third", (d,))):
            if key not in tensors:
                raise_bad(tpath, key, "missing")
            check_shape(tpath, key, tensors[key], shape)
        n, q4 = meta.get(f"{prefix}n"), meta.get(f"{prefix}q4")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise_bad(jpath, f"{prefix}n", f"expected a row count >= 1, got {n!r}")
        if not isinstance(q4, (int, float)) or isinstance(q4, bool) or not np.isfinite(q4) or q4 < 0:
            raise_bad(jpath, f"{prefix}q4", f"expected a finite number >= 0, got {q4!r}")
        mean = tensors[f"{prefix}mean"].astype(np.float64)
        setattr(fitter, which, GaussianAccumulator(n, mean, np.zeros(d), tensors[f"{prefix}scatter"].astype(np.float64),
                                                   tensors[f"{prefix}third"].astype(np.float64), float(q4)))
    return fitter


def raise_bad(path: Path, key: str, what: str):
    from mood_data.errors import BundleError

    raise BundleError(f"{path}: field '{key}': invalid ({what})")


@dataclass
class MahalanobisStreamFit:
    """A :class:`MahalanobisFitter` with the recipe's estimator and ridge bound for ``finalize``."""

    fitter: "MahalanobisFitter"
    estimator: str
    ridge: float

    def update(self, features, malign) -> None:
        self.fitter.update(features, malign)

    def finalize(self, metadata: dict | None = None) -> "MahalanobisDetector":
        return self.fitter.finalize(self.estimator, self.ridge, metadata=metadata)
