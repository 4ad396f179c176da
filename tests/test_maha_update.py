"""Exact incremental Mahalanobis update from stored sufficient statistics (issue 24).

A detector fitted on rows A, saved and loaded, then ``updated`` with rows B must equal a full
refit on A + B (mean, precision, shrinkage, scores) within 1e-9 relative, for every estimator and
variant, without the rows of A."""
from __future__ import annotations

import numpy as np
import pytest

from eval.engine.detectors.mahalanobis import MahalanobisDetector
from mood_data.errors import BundleError, DataError


def _rows(n: int, d: int, seed: int, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ a + shift + 3.0  # off-centre: the shift must be handled exactly
    y = (rng.random(n) < 0.4).astype(int)
    return x, y


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


@pytest.mark.parametrize("variant", ["plain", "class_conditional", "relative"])
@pytest.mark.parametrize("estimator", ["empirical", "ledoit_wolf", "oas"])
def test_update_equals_full_refit(tmp_path, variant, estimator):
    d = 12
    old_x, old_y = _rows(300, d, 0)
    new_x, new_y = _rows(120, d, 1, shift=0.7)  # new rows from a moved distribution (drift)
    kw = dict(variant=variant, estimator=estimator, ridge=1e-6, batch_size=64)
    MahalanobisDetector.fit(old_x, old_y, **kw).save(tmp_path, "old")
    old = MahalanobisDetector.load(tmp_path, "old")  # through the files, as a bundle holds them
    assert old.updatable
    upd = old.updated(new_x[:50], new_y[:50]).updated(new_x[50:], new_y[50:])  # two refreshes in a row
    full = MahalanobisDetector.fit(np.vstack([old_x, new_x]), np.concatenate([old_y, new_y]), **kw)
    for prefix, g in full.gaussians.items():
        assert _rel(upd.gaussians[prefix].mean, g.mean) < 1e-9
        assert _rel(upd.gaussians[prefix].precision, g.precision) < 1e-9
        assert upd.gaussians[prefix].n == g.n
    assert upd.meta["shrinkage"] == pytest.approx(full.meta["shrinkage"], rel=1e-9, abs=1e-12)
    probe, _ = _rows(80, d, 2, shift=1.5)
    assert _rel(upd.score(probe), full.score(probe)) < 1e-9
    # and the stored statistics themselves: count, mean, scatter (float64) equal the refit's
    upd.save(tmp_path, "upd")
    again = MahalanobisDetector.load(tmp_path, "upd")
    assert again.sufficient.safe.n == full.sufficient.safe.n == int((np.concatenate([old_y, new_y]) == 0).sum())
    assert _rel(again.sufficient.safe.s2, full.sufficient.safe.s2) < 1e-9
    assert again.sufficient.safe.s2.dtype == np.float64


def test_update_without_new_safe_rows_keeps_the_plain_detector():
    x, y = _rows(200, 6, 3)
    det = MahalanobisDetector.fit(x, y)
    same = det.updated(x[:10], np.ones(10, int))  # unsafe rows only: a plain Gaussian is unchanged
    assert _rel(same.precision, det.precision) < 1e-12 and same.meta["n"] == det.meta["n"]


def test_statistics_saved_without_sufficient_stats_load_but_cannot_update(tmp_path):
    from eval.engine.detectors.tensors import load_tensors, save_tensors

    x, _ = _rows(100, 5, 4)
    MahalanobisDetector.fit(x).save(tmp_path, "m")
    tensors, meta = load_tensors(tmp_path, "m", "mahalanobis")
    old = {k: v for k, v in tensors.items() if not k.startswith("suff_")}  # as written before issue 24
    save_tensors(tmp_path, "legacy", old, {k: v for k, v in meta.items()
                                           if k not in ("tensors", "sha256", "format_version") and not k.startswith("suff_")})
    legacy = MahalanobisDetector.load(tmp_path, "legacy")
    assert not legacy.updatable
    np.testing.assert_allclose(legacy.score(x), MahalanobisDetector.load(tmp_path, "m").score(x))
    with pytest.raises(DataError, match="cannot be updated"):
        legacy.updated(x)


def test_bad_sufficient_statistics_are_one_line_errors(tmp_path):
    from eval.engine.detectors.tensors import load_tensors, save_tensors

    x, _ = _rows(100, 5, 5)
    MahalanobisDetector.fit(x).save(tmp_path, "m")
    tensors, meta = load_tensors(tmp_path, "m", "mahalanobis")
    meta = {k: v for k, v in meta.items() if k not in ("tensors", "sha256", "format_version")}
    save_tensors(tmp_path, "neg", tensors, {**meta, "suff_n": -3})
    with pytest.raises(BundleError, match=r"neg.json: field 'suff_n'"):
        MahalanobisDetector.load(tmp_path, "neg")
    save_tensors(tmp_path, "shape", {**tensors, "suff_scatter": np.zeros((5, 4))}, meta)
    with pytest.raises(BundleError, match=r"shape.safetensors: tensor 'suff_scatter': expected shape \[5, 5\]"):
        MahalanobisDetector.load(tmp_path, "shape")
