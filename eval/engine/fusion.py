"""Fusing several detector scores into one monitor score (higher = more unsafe).

Every method first standardises each detector on the **ID-safe fit rows**:
``z_j = (s_j - mu_j) / sigma_j`` (population std; sigma 0 -> 1). Methods:

* ``min``      -- ``min_j z_j``: the monitor flags only when every member flags (mood-bench);
* ``mean``     -- ``mean_j z_j``;
* ``lambda``   -- ``z_anchor + lam * mean_{j != anchor} z_j`` (mood-bench). ``lam`` is the
  largest value of the grid ``{0} U logspace(-3, 1, 25)`` whose ID TPR at ``fpr`` (1 %) on the
  fit rows is not below the anchor-only (``lam = 0``) value;
* ``rank``     -- ``mean_j F_j(s_j)`` with ``F_j`` the ECDF of detector j on the ID-safe fit
  rows (``F(s) = #{ref <= s} / n_ref``);
* ``logistic`` -- stacking: ``sklearn.linear_model.LogisticRegression`` on the z-scores of the ID
  fit rows with their malign labels; score = the decision function (log-odds of unsafe).

Fitting sees ONLY rows whose domain is in-distribution per the registry (and, if given, in
``fit_mask``, e.g. the validation slice); rows of OOD domains are dropped before anything is
computed. Fitted parameters are a JSON-serialisable dict (:attr:`Fusion.params`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mood_data import atomic
from mood_data.domains import DEFAULT_REGISTRY, DomainRegistry
from mood_data.errors import BundleError, DataError, RecipeError
from mood_data.readers import read_json, short_repr

from .checks import check_number, check_str, fail
from .metrics import tpr_at_fpr

METHODS = ("min", "mean", "lambda", "rank", "logistic")
LAMBDA_GRID: tuple[float, ...] = (0.0,) + tuple(float(v) for v in np.logspace(-3, 1, 25))


def _matrix(scores: Mapping[str, object], names: Sequence[str]) -> np.ndarray:
    cols = []
    for name in names:
        if name not in scores:
            raise DataError(f"fusion: detector '{name}' missing from the scores (have {sorted(scores)})")
        col = np.asarray(scores[name], dtype=np.float64).reshape(-1)
        if cols and col.shape[0] != cols[0].shape[0]:
            raise DataError(f"fusion: detector '{name}' has {col.shape[0]} rows, expected {cols[0].shape[0]}")
        cols.append(col)
    return np.stack(cols, axis=1)


def fit_rows(domains: Sequence[str], registry: DomainRegistry = DEFAULT_REGISTRY, fit_mask=None) -> np.ndarray:
    """Boolean mask of the rows fusion may fit on: ID domain AND ``fit_mask`` (if given)."""
    rows = np.array([registry.is_id(d) for d in domains], dtype=bool)
    if fit_mask is not None:
        mask = np.asarray(fit_mask, dtype=bool).reshape(-1)
        if mask.shape != rows.shape:
            raise DataError(f"fusion: fit_mask has {mask.shape[0]} rows, expected {rows.shape[0]}")
        rows &= mask
    return rows


class Fusion:
    """A fitted fusion rule. ``Fusion.fit(...)`` -> ``.apply(scores)`` / ``.save`` / ``Fusion.load``."""

    def __init__(self, params: dict):
        if params.get("method") not in METHODS:
            raise RecipeError(f"fusion: field 'method': expected one of {METHODS}, got {params.get('method')!r}")
        self.params = params

    @property
    def method(self) -> str:
        return self.params["method"]

    @property
    def detectors(self) -> list[str]:
        return list(self.params["detectors"])

    @classmethod
    def fit(
        cls,
        method: str,
        scores: Mapping[str, object],
        malign,
        domains: Sequence[str],
        *,
        registry: DomainRegistry = DEFAULT_REGISTRY,
        fit_mask=None,
        anchor: str | None = None,
        fpr: float = 0.01,
        grid: Sequence[float] = LAMBDA_GRID,
        C: float = 1.0,
    ) -> "Fusion":
        """Fit on ID rows only. ``scores``: detector name -> per-row scores (same row order).

        ``anchor`` (lambda): defaults to the first detector.
        """
        if method not in METHODS:
            raise RecipeError(f"fusion: field 'method': expected one of {METHODS}, got {method!r}")
        names = list(scores)
        if not names:
            raise DataError("fusion: no detector scores given")
        x = _matrix(scores, names)
        y = np.asarray(malign).astype(np.int64).reshape(-1)
        if not (x.shape[0] == y.shape[0] == len(domains)):
            raise DataError(f"fusion: scores ({x.shape[0]}), malign ({y.shape[0]}) and domains ({len(domains)}) differ in length")
        rows = fit_rows(domains, registry, fit_mask)
        x, y = x[rows], y[rows]
        if not np.isfinite(x).all():
            r, c = (int(v[0]) for v in np.nonzero(~np.isfinite(x)))
            raise DataError(f"fusion: row {int(np.flatnonzero(rows)[r]) + 1} of the calibration rows: "
                            f"field '{names[c]}': score is {x[r, c]} (NaN/inf detector scores cannot be fused)")
        safe = x[y == 0]
        if safe.shape[0] < 2:
            raise DataError(f"fusion: need at least 2 ID-safe fit rows, got {safe.shape[0]}")
        mu = safe.mean(axis=0)
        sigma = safe.std(axis=0)
        sigma = np.where(sigma > 0, sigma, 1.0)
        params = {
            "method": method, "detectors": names,
            "mu": dict(zip(names, mu.tolist())), "sigma": dict(zip(names, sigma.tolist())),
            "n_fit": int(x.shape[0]), "n_fit_safe": int(safe.shape[0]), "n_fit_unsafe": int((y == 1).sum()),
        }
        z = (x - mu) / sigma
        if method == "lambda":
            params.update(_fit_lambda(z, y, names, anchor or names[0], fpr, grid))
        elif method == "rank":
            params["reference"] = {n: np.sort(safe[:, j]).tolist() for j, n in enumerate(names)}
        elif method == "logistic":
            if len(set(y.tolist())) < 2:
                raise DataError("fusion: logistic stacking needs both safe and unsafe ID fit rows")
            from sklearn.linear_model import LogisticRegression

            lr = LogisticRegression(C=C, max_iter=1000).fit(z, y)
            params.update(coef=dict(zip(names, lr.coef_[0].tolist())), intercept=float(lr.intercept_[0]), C=C)
        return cls(params)

    def apply(self, scores: Mapping[str, object]) -> np.ndarray:
        """Fused score per row (float64), higher = more unsafe."""
        p, names = self.params, self.detectors
        x = _matrix(scores, names)
        if self.method == "rank":
            cols = []
            for j, n in enumerate(names):
                ref = np.asarray(p["reference"][n], dtype=np.float64)
                cols.append(np.searchsorted(ref, x[:, j], side="right") / ref.size)
            return np.mean(np.stack(cols, axis=1), axis=1)
        z = (x - np.array([p["mu"][n] for n in names])) / np.array([p["sigma"][n] for n in names])
        if self.method == "min":
            return z.min(axis=1)
        if self.method == "mean":
            return z.mean(axis=1)
        if self.method == "lambda":
            return _lambda_score(z, names, p["anchor"], p["lam"])
        return z @ np.array([p["coef"][n] for n in names]) + p["intercept"]

    def save(self, path: str | Path) -> Path:
        return atomic.write_json(path, {"fusion": self.params})

    @classmethod
    def load(cls, path: str | Path) -> "Fusion":
        """A saved fusion, every value checked (:func:`check_fusion`)."""
        path = Path(path)
        doc = read_json(path, BundleError)
        if "fusion" not in doc:
            raise BundleError(f"{path}: field 'fusion': missing or malformed")
        return cls(check_fusion(path, doc["fusion"], METHODS))


def check_fusion(path: Path, params: Any, methods: tuple[str, ...]) -> dict:
    """``fusion.json``'s ``fusion`` mapping (one of ``methods``): every value the scorer computes
    with is a finite number of the right kind; ``sigma`` is > 0 (a negative one would invert a
    detector, zero divide by it); rank references are sorted finite lists; the lambda anchor is
    one of the detectors."""
    if not isinstance(params, dict):
        fail(path, "fusion", f"expected a mapping, got {short_repr(params)}")
    method = check_str(path, "fusion.method", params.get("method"), methods)
    names = params.get("detectors")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names) \
            or len(set(names)) != len(names):
        fail(path, "fusion.detectors", f"expected a list of distinct detector names, got {short_repr(names)}")
    need = {"lambda": ("anchor", "lam"), "rank": ("reference",), "logistic": ("coef", "intercept")}
    for key in ("mu", "sigma") + need.get(method, ()):
        if key not in params:
            fail(path, f"fusion.{key}", "missing")
    per_detector = ("mu", "sigma") + (("coef",) if method == "logistic" else ())
    for key in per_detector:
        table = params[key]
        if not isinstance(table, dict) or set(table) != set(names):
            fail(path, f"fusion.{key}", f"expected a number for each of {names}, got {short_repr(table)}")
        for n in names:
            check_number(path, f"fusion.{key}.{n}", table[n])
    for n in names:
        if params["sigma"][n] <= 0:
            fail(path, f"fusion.sigma.{n}", f"must be > 0, got {params['sigma'][n]} (a negative scale inverts "
                                             "the detector)")
    if method == "lambda":
        if params["anchor"] not in names:
            fail(path, "fusion.anchor", f"{short_repr(params['anchor'])} is not one of the detectors {names}")
        if check_number(path, "fusion.lam", params["lam"]) < 0:
            fail(path, "fusion.lam", f"must be >= 0, got {params['lam']}")
    if method == "logistic":
        check_number(path, "fusion.intercept", params["intercept"])
    if method == "rank":
        ref = params["reference"]
        if not isinstance(ref, dict) or set(ref) != set(names):
            fail(path, "fusion.reference", f"expected a list for each of {names}")
        for n in names:
            values = ref[n]
            if not isinstance(values, list) or not values:
                fail(path, f"fusion.reference.{n}", "expected a non-empty list of numbers")
            floats = [check_number(path, f"fusion.reference.{n}[{i}]", v) for i, v in enumerate(values)]
            if any(a > b for a, b in zip(floats, floats[1:])):
                fail(path, f"fusion.reference.{n}", "must be sorted ascending")
    return params


def _lambda_score(z: np.ndarray, names: list[str], anchor: str, lam: float) -> np.ndarray:
    a = names.index(anchor)
    aux = [j for j in range(len(names)) if j != a]
    if not aux or lam == 0:
        return z[:, a].copy()
    return z[:, a] + lam * z[:, aux].mean(axis=1)


def _fit_lambda(z, y, names, anchor, fpr, grid) -> dict:
    if anchor not in names:
        raise RecipeError(f"fusion: field 'anchor': '{anchor}' is not one of the detectors {names}")
    if not (y == 1).any():
        raise DataError("fusion: lambda needs ID-unsafe fit rows to measure the ID TPR")
    safe, unsafe = y == 0, y == 1

    def tpr(lam: float) -> float:
        s = _lambda_score(z, names, anchor, lam)
        return tpr_at_fpr(s[safe], s[unsafe], fpr)

    base = tpr(0.0)
    grid = sorted({0.0, *map(float, grid)}) if len(names) > 1 else [0.0]  # no aux: lam is moot
    curve = [tpr(lam) for lam in grid]
    ok = [lam for lam, t in zip(grid, curve) if t >= base - 1e-12]
    lam = max(ok)
    return {"anchor": anchor, "lam": lam, "fpr": fpr, "anchor_tpr": base, "tpr": curve[grid.index(lam)],
            "grid": grid, "grid_tpr": curve}
