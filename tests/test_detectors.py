"""eval.engine.detectors: Mahalanobis (empirical / Ledoit-Wolf / OAS, streaming, variants), kNN, logits, I/O."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.covariance import OAS, LedoitWolf

from eval.engine.detectors.knn import KNNDetector
from eval.engine.detectors.logits import energy, guard_logprob, guard_margin, max_logit
from eval.engine.detectors.mahalanobis import GaussianAccumulator, MahalanobisDetector, MahalanobisFitter
from mood_data.errors import BundleError, DataError


def _gauss(n=300, d=8, seed=0, offset=50.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d))
    return rng.multivariate_normal(offset + np.arange(d), a @ a.T + 0.1 * np.eye(d), size=n)


def _stream(x, chunk=37):
    acc = GaussianAccumulator()
    for i in range(0, x.shape[0], chunk):
        acc.update(x[i:i + chunk])
    return acc


@pytest.mark.parametrize("estimator,ref", [("ledoit_wolf", LedoitWolf), ("oas", OAS)])
@pytest.mark.parametrize("n", [30, 400])  # n ~ d (strong shrinkage) and n >> d
def test_shrinkage_matches_sklearn(estimator, ref, n):
    x = _gauss(n=n, d=12, seed=n)
    g = _stream(x).finalize(estimator, ridge=0.0)
    sk = ref(assume_centered=False).fit(x)
    assert g.shrinkage == pytest.approx(sk.shrinkage_, rel=1e-6)
    np.testing.assert_allclose(g.covariance, sk.covariance_, rtol=1e-6, atol=1e-9 * np.abs(sk.covariance_).max())
    np.testing.assert_allclose(g.mean, sk.location_, rtol=1e-12)


def test_empirical_is_unbiased_cov_plus_ridge_and_scores_match_reference():
    x = _gauss()
    g = _stream(x).finalize("empirical", ridge=1e-3)
    cov = np.cov(x, rowvar=False) + 1e-3 * np.eye(x.shape[1])
    np.testing.assert_allclose(g.covariance, cov, rtol=1e-10)
    q = _gauss(n=20, seed=9)
    inv = np.linalg.inv(cov)
    ref = np.array([(r - x.mean(0)) @ inv @ (r - x.mean(0)) for r in q])
    np.testing.assert_allclose(g.score(q), ref, rtol=1e-8)
    det = MahalanobisDetector.fit(torch.tensor(x, dtype=torch.float32), estimator="empirical", ridge=1e-3)
    np.testing.assert_allclose(det.score(q), ref, rtol=1e-4)  # float32 input, float64 maths


def test_precision_is_inverse_or_pinv_when_singular():
    from eval.engine.detectors.mahalanobis import stable_precision

    x = _gauss(n=200, d=6)
    cov = np.cov(x.T)
    np.testing.assert_allclose(stable_precision(cov), np.linalg.inv(cov), rtol=1e-8)
    few = _gauss(n=5, d=8, seed=3)  # rank 4 < d: singular, falls back to the pseudo-inverse
    g = GaussianAccumulator().update(few).finalize("empirical", ridge=0.0)
    np.testing.assert_allclose(g.precision, np.linalg.pinv(np.cov(few.T), hermitian=True), rtol=1e-6, atol=1e-8)
    assert np.isfinite(g.score(few)).all()


def test_streaming_chunks_and_merge_equal_one_shot():
    x = _gauss(n=250, seed=2)
    one = GaussianAccumulator().update(x)
    a, b, c = GaussianAccumulator().update(x[:17]), _stream(x[17:100], 9), _stream(x[100:], 50)
    merged = GaussianAccumulator().merge(a).merge(b.merge(c))  # different shifts everywhere
    for est in ("empirical", "ledoit_wolf", "oas"):
        g1, g2 = one.finalize(est), merged.finalize(est)
        np.testing.assert_allclose(g2.mean, g1.mean, rtol=1e-12)
        np.testing.assert_allclose(g2.covariance, g1.covariance, rtol=1e-9, atol=1e-12)
        assert g2.shrinkage == pytest.approx(g1.shrinkage, rel=1e-9)
    assert merged.n == one.n == 250
    m1, s1, q1 = one.centred()
    xc = x - x.mean(0)
    assert q1 == pytest.approx(np.sum(np.sum(xc**2, axis=1) ** 2), rel=1e-10)


def test_variants_against_numpy():
    rng = np.random.default_rng(4)
    xs, xu = _gauss(n=120, d=5, seed=4), _gauss(n=80, d=5, seed=5, offset=53.0)
    x = np.r_[xs, xu]
    y = np.r_[np.zeros(120, int), np.ones(80, int)]
    perm = rng.permutation(200)
    x, y = x[perm], y[perm]
    q = _gauss(n=10, d=5, seed=6, offset=51.0)

    def md(q, m, cov):
        inv = np.linalg.inv(cov)
        return np.einsum("nd,de,ne->n", q - m, inv, q - m)

    plain = MahalanobisDetector.fit(x, y, ridge=0.0, batch_size=64)
    np.testing.assert_allclose(plain.score(q), md(q, xs.mean(0), np.cov(xs.T)), rtol=1e-8)
    rel = MahalanobisDetector.fit(x, y, variant="relative", ridge=0.0, batch_size=64)
    np.testing.assert_allclose(rel.score(q), md(q, xs.mean(0), np.cov(xs.T)) - md(q, x.mean(0), np.cov(x.T)), rtol=1e-7)
    tied = ((xs - xs.mean(0)).T @ (xs - xs.mean(0)) + (xu - xu.mean(0)).T @ (xu - xu.mean(0))) / (200 - 2)
    ds, du = md(q, xs.mean(0), tied), md(q, xu.mean(0), tied)
    cc = MahalanobisDetector.fit(x, y, variant="class_conditional", ridge=0.0, batch_size=64)
    np.testing.assert_allclose(cc.score(q), np.minimum(ds, du), rtol=1e-8)
    llr = MahalanobisDetector.fit(x, y, variant="class_conditional", class_score="llr", ridge=0.0)
    np.testing.assert_allclose(llr.score(q), ds - du, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("variant", ["plain", "relative", "class_conditional"])
def test_mahalanobis_save_load_roundtrip_and_tamper(tmp_path, variant):
    x = _gauss(n=100, d=6)
    y = np.arange(100) % 3 == 0
    det = MahalanobisDetector.fit(x, y, variant=variant, estimator="oas", store_covariance=True,
                                  metadata={"layer": -1, "pooling": "last"})
    det.save(tmp_path, "maha")
    meta = json.loads((tmp_path / "maha.json").read_text())
    assert meta["estimator"] == "oas" and meta["variant"] == variant and meta["d"] == 6
    assert meta["metadata"] == {"layer": -1, "pooling": "last"} and len(meta["sha256"]) == 64
    back = MahalanobisDetector.load(tmp_path, "maha")
    np.testing.assert_array_equal(back.score(x[:7]), det.score(x[:7]))
    # flip one byte of tensor data -> sha mismatch
    raw = bytearray((tmp_path / "maha.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (tmp_path / "maha.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="maha.safetensors: sha256"):
        MahalanobisDetector.load(tmp_path, "maha")


def test_mahalanobis_load_rejects_shape_change_and_missing_files(tmp_path):
    det = MahalanobisDetector.fit(_gauss(n=50, d=4))
    det.save(tmp_path, "m")
    meta = json.loads((tmp_path / "m.json").read_text())
    meta["tensors"]["mean"]["shape"] = [5]
    (tmp_path / "m.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"tensor 'mean': expected float64 \[5\]") as ei:
        MahalanobisDetector.load(tmp_path, "m")
    assert "\n" not in str(ei.value)
    with pytest.raises(BundleError, match="nope.json: file not found"):
        MahalanobisDetector.load(tmp_path, "nope")
    with pytest.raises(DataError, match="expected dimension 4"):
        GaussianAccumulator().update(np.ones((3, 4))).update(np.ones((3, 5)))


def test_knn_matches_brute_force_and_roundtrips(tmp_path):
    rng = np.random.default_rng(7)
    train = rng.normal(size=(300, 16))
    malign = rng.random(300) < 0.3
    q = rng.normal(size=(25, 16)) * 3
    det = KNNDetector.fit(train, malign, k=5)
    ref = train[~malign] / np.linalg.norm(train[~malign], axis=1, keepdims=True)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    dist = np.linalg.norm(qn[:, None, :] - ref[None, :, :], axis=2)
    expected = np.sort(dist, axis=1)[:, 4]
    np.testing.assert_allclose(det.score(q, batch_size=7), expected, atol=1e-6)
    det.save(tmp_path, "knn")
    np.testing.assert_array_equal(KNNDetector.load(tmp_path, "knn").score(q), det.score(q))
    small = KNNDetector.fit(train, k=1, max_ref=50, seed=3)
    assert small.reference.shape == (50, 16) and small.meta["n_fit"] == 300
    np.testing.assert_array_equal(small.reference, KNNDetector.fit(train, k=1, max_ref=50, seed=3).reference)
    # a training row is its own nearest neighbour
    np.testing.assert_allclose(KNNDetector.fit(train, k=1).score(train[:5]), 0.0, atol=1e-6)
    (tmp_path / "knn.json").write_text((tmp_path / "knn.json").read_text().replace('"knn"', '"mahalanobis"'))
    with pytest.raises(BundleError, match="field 'detector'"):
        KNNDetector.load(tmp_path, "knn")


def test_logit_scores_hand_values():
    z = np.array([[0.0, 0.0], [1.0, 3.0], [2.0, -1.0]])
    lse = np.log(np.exp(z).sum(axis=1))
    np.testing.assert_allclose(guard_margin(z), [0.0, 2.0, -3.0])
    np.testing.assert_allclose(guard_logprob(torch.tensor(z)), [np.log(0.5), 3 - lse[1], -1 - lse[2]])
    np.testing.assert_allclose(energy(z), [-np.log(2.0), -lse[1], -lse[2]])
    np.testing.assert_allclose(max_logit(z), [0.0, -3.0, -2.0])
    # orientation: confident (large logits) input has lower energy than an unconfident one
    assert energy(np.array([[10.0, 0.0]]))[0] < energy(np.array([[0.1, 0.0]]))[0]
    with pytest.raises(DataError, match=r"expected shape \[n, 2\]"):
        guard_margin(np.zeros(3))


def test_fitter_merge_across_workers_equals_one_shot():
    x = _gauss(n=160, d=5, seed=8)
    y = np.arange(160) % 4 == 0
    one = MahalanobisDetector.fit(x, y, variant="relative", estimator="ledoit_wolf")
    w1 = MahalanobisFitter("relative").update(x[:70], y[:70])
    w2 = MahalanobisFitter("relative").update(x[70:], y[70:])
    merged = w1.merge(w2).finalize("ledoit_wolf")
    np.testing.assert_allclose(merged.score(x[:9]), one.score(x[:9]), rtol=1e-9, atol=1e-9)
    assert merged.meta["n_background"] == 160 and merged.meta["n"] == 120
