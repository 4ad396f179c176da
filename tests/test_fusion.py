"""eval.fusion: ID-only fitting (perturbation test), lambda choice, rank / min / mean / logistic values."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from eval.engine.fusion import LAMBDA_GRID, METHODS, Fusion
from mood_data.domains import ID_DOMAINS, OOD_DOMAINS, DomainRegistry
from mood_data.errors import BundleError, DataError


def _data(seed=0):
    rng = np.random.default_rng(seed)
    n_id, n_ood = 300, 140
    domains = [ID_DOMAINS[i % 3] for i in range(n_id)] + [OOD_DOMAINS[i % 7] for i in range(n_ood)]
    malign = np.r_[rng.random(n_id) < 0.4, np.ones(n_ood, bool)].astype(int)
    scores = {
        "guard": rng.normal(size=n_id + n_ood) + 2.0 * malign,
        "maha": rng.gamma(2.0, 3.0, size=n_id + n_ood) + 1.0 * malign,
        "ppl": rng.normal(5.0, 2.0, size=n_id + n_ood),
    }
    return scores, malign, domains


@pytest.mark.parametrize("method", METHODS)
def test_fit_ignores_ood_rows_and_rows_outside_fit_mask(method):
    scores, malign, domains = _data()
    is_ood = np.array([d in OOD_DOMAINS for d in domains])
    fit_mask = np.arange(len(domains)) % 2 == 0
    fused = Fusion.fit(method, scores, malign, domains, fit_mask=fit_mask)
    rng = np.random.default_rng(1)
    moved = {k: np.where(is_ood | ~fit_mask, v + rng.normal(0, 100, v.size), v) for k, v in scores.items()}
    flipped = np.where(is_ood | ~fit_mask, 1 - malign, malign)
    again = Fusion.fit(method, moved, flipped, domains, fit_mask=fit_mask)
    assert again.params == fused.params
    assert fused.params["n_fit"] == int((~is_ood & fit_mask).sum())
    # a fit_mask that also selects OOD rows still only uses ID rows
    assert Fusion.fit(method, moved, flipped, domains, fit_mask=fit_mask | is_ood).params == fused.params


def test_min_mean_z_scores_on_id_safe_rows():
    # ID-safe: a = [1, 3] (mu 2, sd 1); b = [10, 30] (mu 20, sd 10). Unsafe / OOD rows don't count.
    scores = {"a": np.array([1.0, 3.0, 100.0, -50.0]), "b": np.array([10.0, 30.0, -7.0, 999.0])}
    domains = ["hh-rlhf-helpful", "function-calling", "hh-rlhf-harmless", "jailbroken"]
    malign = [0, 0, 1, 1]
    f_min = Fusion.fit("min", scores, malign, domains)
    assert f_min.params["mu"] == {"a": 2.0, "b": 20.0} and f_min.params["sigma"] == {"a": 1.0, "b": 10.0}
    new = {"a": np.array([4.0, 2.0]), "b": np.array([0.0, 50.0])}  # z: a = [2, 0], b = [-2, 3]
    np.testing.assert_allclose(f_min.apply(new), [-2.0, 0.0])
    np.testing.assert_allclose(Fusion.fit("mean", scores, malign, domains).apply(new), [0.0, 1.5])


def test_lambda_hand_example():
    # z-scores already (safe mean 0, sd 1). fused = a + lam * b.
    # Safe fused sorted (lam <= 1): -1-lam, -1+lam, 1-lam, 1+lam -> thr@1% = 1 + 0.94 lam.
    # u1 (a=2, b=-2) flagged iff 2 - 2 lam > 1 + 0.94 lam <=> lam < 1/2.94 = 0.340;
    # u2 (a=0.5, b=0.9) is never flagged. Base TPR (lam=0) = 1/2, so lam* = largest grid
    # value below 0.340 = 10**-0.5 on {0} U logspace(-3, 1, 25).
    scores = {"a": np.array([-1, 1, -1, 1, 2, 0.5, 9.0]), "b": np.array([1, -1, -1, 1, -2, 0.9, 9.0])}
    domains = ["hh-rlhf-helpful"] * 6 + ["scheming"]
    malign = [0, 0, 0, 0, 1, 1, 1]
    f = Fusion.fit("lambda", scores, malign, domains, anchor="a")
    assert f.params["lam"] == pytest.approx(10 ** -0.5)
    assert f.params["anchor_tpr"] == 0.5 and f.params["tpr"] == 0.5
    grid, grid_tpr = np.array(f.params["grid"]), np.array(f.params["grid_tpr"])
    assert grid_tpr[0] == 0.5 and np.all(grid_tpr[grid > 0.35] == 0.0) and np.all(grid_tpr[grid < 0.34] == 0.5)
    np.testing.assert_allclose(f.apply({"a": np.array([1.0]), "b": np.array([2.0])}), [1 + 2 * 10 ** -0.5])
    g = Fusion.fit("lambda", scores, malign, domains, anchor="a", grid=[0.1, 0.3, 0.35, 4.0])
    assert g.params["lam"] == 0.3
    assert LAMBDA_GRID[0] == 0.0 and len(LAMBDA_GRID) == 26


def test_rank_fusion_values():
    scores = {"a": np.array([1.0, 2, 3, 4]), "b": np.array([10.0, 20, 30, 40])}
    f = Fusion.fit("rank", scores, [0, 0, 0, 0], ["hh-rlhf-helpful"] * 4)
    out = f.apply({"a": np.array([2.5, 0.0, 2.0, 9.0]), "b": np.array([40.0, 5.0, 20.0, 41.0])})
    # ECDF: a=2.5 -> 2/4, b=40 -> 4/4 ; a=0 -> 0, b=5 -> 0 ; ties count (<=): 2/4, 2/4 ; 1, 1
    np.testing.assert_allclose(out, [0.75, 0.0, 0.5, 1.0])


def test_logistic_equals_sklearn_on_id_z_scores(tmp_path):
    scores, malign, domains = _data(3)
    f = Fusion.fit("logistic", scores, malign, domains)
    ids = np.array([d in ID_DOMAINS for d in domains])
    x = np.stack([scores[k] for k in ("guard", "maha", "ppl")], axis=1)
    safe = x[ids & (malign == 0)]
    z = (x - safe.mean(0)) / safe.std(0)
    lr = LogisticRegression(max_iter=1000).fit(z[ids], malign[ids])
    np.testing.assert_allclose(f.apply(scores), lr.decision_function(z), rtol=1e-6, atol=1e-8)
    f.save(tmp_path / "fusion.json")
    back = Fusion.load(tmp_path / "fusion.json")
    np.testing.assert_array_equal(back.apply(scores), f.apply(scores))


def test_save_load_every_method_and_errors(tmp_path):
    scores, malign, domains = _data(5)
    for m in METHODS:
        f = Fusion.fit(m, scores, malign, domains, registry=DomainRegistry())
        f.save(tmp_path / f"{m}.json")
        np.testing.assert_array_equal(Fusion.load(tmp_path / f"{m}.json").apply(scores), f.apply(scores))
    (tmp_path / "bad.json").write_text('{"fusion": {"method": "lambda", "detectors": ["a"], "mu": {}, "sigma": {}}}')
    with pytest.raises(BundleError, match="bad.json: field 'fusion.anchor': missing"):
        Fusion.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="detector 'maha' missing"):
        Fusion.fit("mean", scores, malign, domains).apply({"guard": scores["guard"], "ppl": scores["ppl"]})
    with pytest.raises(DataError, match="need at least 2 ID-safe"):
        Fusion.fit("mean", scores, malign, domains, fit_mask=np.zeros(len(domains), bool))
