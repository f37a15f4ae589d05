"""The detector tells adapters with a consistent poisoned direction from clean ones (AUC ~ 1), finds nothing
where there is nothing (CI covers 0.5), never lets a seed sit on both sides of a split, and its AUC is the
exact pairwise count with ties."""
import json

import numpy as np
import pytest
from scipy.optimize import minimize

from jaxpoison.analysis import detector
from jaxpoison.analysis import weight_shift

N_SEEDS, LEVELS, LAYERS, D_IN, D_OUT, R = 10, (0, 1, 2, 3), 4, 24, 16, 4


def _adapters(shift: float, seed: int = 0):
    """Per seed one clean and three poisoned variants around a seed-specific init (variants of a seed differ
    by small training noise). Poison adds the same rank-1 direction u w^T, scaled by the poison level, to
    layers 1 and 2 of every poisoned adapter."""
    rng = np.random.default_rng(seed)
    u, w = rng.normal(size=D_IN), rng.normal(size=D_OUT)
    a, b, variants = [], [], []
    for s in range(N_SEEDS):
        a0, b0 = rng.normal(size=(LAYERS, D_IN, R)), 0.5 * rng.normal(size=(LAYERS, R, D_OUT))
        for level in LEVELS:
            av = a0 + 0.05 * rng.normal(size=a0.shape)
            bv = b0 + 0.05 * rng.normal(size=b0.shape)
            av[1:3, :, 0] += shift * level * u
            bv[1:3, 0, :] += shift * level * w
            a.append(av)
            b.append(bv)
            variants.append({"variant_id": len(variants), "seed": s, "poison_count": 10 * level,
                             "kind": "rationale" if level else "clean"})
    lora = {"q": {"a": np.stack(a).astype(np.float32), "b": np.stack(b).astype(np.float32)}}
    return lora, variants


def _report(shift, seed=0):
    lora, variants = _adapters(shift, seed)
    lab = weight_shift.variant_labels(variants)
    x, names = detector.feature_matrix(weight_shift.features(lora, 2.0, reference=lab["reference"]))
    return detector.detect(x, names, lab["poisoned"], lab["seed"], lab["level"], n_resamples=500)


@pytest.fixture(scope="module")
def separated():
    return _report(shift=2.0)


def test_a_consistent_rank_one_poison_is_detected_with_auc_one(separated):
    assert separated["auc"] == 1.0 and separated["auc_ci"][0] >= 0.99
    assert separated["auc_pooled"] > 0.99 and separated["distance"]["auc"] > 0.95
    assert all(r["auc"] == 1.0 for r in separated["by_level"])
    assert (separated["n_clean"], separated["n_poisoned"], separated["n_seeds"]) == (N_SEEDS, 3 * N_SEEDS, N_SEEDS)
    assert len(separated["roc"]["fpr"]) == len(separated["roc"]["tpr"])
    assert [r["level"] for r in separated["by_level"]] == [10, 20, 30]
    assert json.loads(json.dumps(separated))["n_seeds"] == N_SEEDS


def test_the_detector_reads_the_poisoned_layers(separated):
    top = [c["feature"] for c in separated["coefficients"][:5]]
    assert all(("[1]" in f or "[2]" in f) for f in top), top
    assert not any("cosine" in f or "shift" in f for f in separated["features"])


def test_identical_distributions_give_auc_near_half_with_ci_covering_it():
    rep = _report(shift=0.0)
    assert abs(rep["auc"] - 0.5) < 0.25
    assert rep["auc_ci"][0] <= 0.5 <= rep["auc_ci"][1]
    assert rep["distance"]["auc_ci"][0] <= 0.5 <= rep["distance"]["auc_ci"][1]


def test_auc_grows_with_poison_count():
    by_level = _report(shift=0.2, seed=1)["by_level"]
    aucs = [r["auc_pooled"] for r in by_level]
    assert aucs == sorted(aucs) and aucs[0] < 0.8 and aucs[-1] > 0.95, aucs


@pytest.mark.parametrize("n_folds", [None, 3, 4])
def test_grouped_folds_never_split_a_seed(n_folds):
    groups = np.repeat(np.array([7, 3, 9, 1, 4, 5]), [4, 2, 3, 4, 1, 2])
    folds = detector.grouped_folds(groups, n_folds, seed=2)
    assert len(folds) == (6 if n_folds is None else n_folds)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(len(groups)))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)


def test_auc_equals_brute_force_pairwise_count_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(5):
        scores = rng.integers(0, 6, 40).astype(float)
        labels = rng.random(40) < 0.4
        pos, neg = scores[labels], scores[~labels]
        brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert detector.roc_auc(scores, labels) == pytest.approx(brute, abs=1e-12)
        fpr, tpr, _ = detector.roc_curve(scores, labels)
        assert np.trapezoid(tpr, fpr) == pytest.approx(brute, abs=1e-12)
    rows = rng.normal(size=(3, 40))
    np.testing.assert_allclose(detector.roc_auc(rows, labels), [detector.roc_auc(r, labels) for r in rows])


def test_logistic_fit_reaches_the_penalised_optimum():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(30, 80))
    y = x[:, 0] + rng.normal(size=30) > 0.5
    model = detector.fit_logistic(x, y, l2=2.0, intercept_scaling=10.0)
    z = np.c_[np.full(30, 10.0), (x - x.mean(0)) / x.std(0)]

    def f(t):
        return np.sum(np.logaddexp(0, z @ t) - y * (z @ t)) + t @ t

    def g(t):
        return z.T @ (1 / (1 + np.exp(-z @ t)) - y) + 2 * t

    ref = minimize(f, np.zeros(81), jac=g, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000}).x
    np.testing.assert_allclose(model["coef"], ref[1:], atol=1e-6)
    assert model["intercept"] == pytest.approx(10 * ref[0], abs=1e-5)
    assert np.abs(g(np.r_[model["intercept"] / 10, model["coef"]])).max() < 1e-8


def test_woodbury_mahalanobis_equals_the_direct_inverse():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(12, 5))
    clean = np.arange(12) < 8
    groups = np.arange(12) % 4
    got = detector.clean_distance_scores(x, clean, groups, "mahalanobis", shrinkage=0.3)
    for train, test in detector.grouped_folds(groups):
        ref = x[train][clean[train]]
        mean, std = ref.mean(0), ref.std(0, ddof=1)
        zr, zt = (ref - mean) / std, (x[test] - mean) / std
        cov = 0.7 * np.cov(zr, rowvar=False) + 0.3 * np.eye(5)
        np.testing.assert_allclose(got[test], np.einsum("ip,pq,iq->i", zt, np.linalg.inv(cov), zt) / 5)


def test_restrict_folds_reindexes_each_fold_into_the_subset():
    groups = np.repeat(np.arange(5), [3, 2, 4, 2, 3])
    folds = detector.grouped_folds(groups, 3, seed=1)
    keep = np.random.default_rng(3).random(len(groups)) < 0.6
    kept = np.flatnonzero(keep)
    sub = detector.restrict_folds(folds, keep)
    assert len(sub) == len(folds)
    for (train, test), (sub_train, sub_test) in zip(folds, sub):
        assert kept[sub_train].tolist() == sorted(set(train.tolist()) & set(kept.tolist()))
        assert kept[sub_test].tolist() == sorted(set(test.tolist()) & set(kept.tolist()))


def test_auc_summary_counts_the_classes_and_pools_the_auc():
    rng = np.random.default_rng(4)
    seeds = np.repeat(np.arange(6), 4)
    y = np.tile([False, True, True, False], 6)
    scores = y + rng.normal(scale=0.8, size=y.size)
    rep = detector.auc_summary(scores, y, seeds, detector.grouped_folds(seeds), n_resamples=200, seed=0)
    assert (rep["n_clean"], rep["n_poisoned"], rep["n_seeds"]) == (12, 12, 6)
    assert rep["auc_pooled"] == pytest.approx(float(detector.roc_auc(scores, y)))
    assert rep["auc_pooled_ci"][0] <= rep["auc_pooled"] <= rep["auc_pooled_ci"][1]
    assert len(rep["auc_folds"]) == 6 and rep["auc"] == pytest.approx(np.mean(rep["auc_folds"]))
