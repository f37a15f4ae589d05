"""Can the adapter alone betray the poison? A cross-validated detector, its AUC with a CI, and what it reads.

Why these choices:

* **Adapter-intrinsic features only** (:func:`feature_matrix`): norms, spectra and L-inf statistics of each
  module and layer from :mod:`jaxpoison.analysis.weight_shift`. The clean-twin features (cosine, shift) are
  left out -- a defender never has the clean twin, and they are constant on the clean group. Positive features
  are logged: norms are multiplicative, and a log makes a 10 % shift look the same in every layer.
* **Seeds are the unit of replication.** All variants of one seed share the LoRA init and the clean data order,
  so a seed's clean and poisoned adapters are siblings; splitting them across train and test would let the
  classifier learn the seed, not the poison. Folds are grouped by seed (default leave-one-seed-out).
* **Which AUC, which CI.** ``auc`` is the mean over folds of the AUC inside each held-out fold (every adapter
  there is scored by one model that never saw its seed), with a Nadeau-Bengio corrected t interval; in null
  simulations (5 / 8 / 12 seeds) it covered 84 / 95 / 97 % at nominal 95 %. ``auc_pooled`` ranks all
  out-of-fold scores together (what the ROC curve shows); its CI resamples seeds over fixed scores and
  ignores retraining noise, so it is optimistic (65-86 % coverage in the same simulations) -- kept for
  reference only.
* **L2 logistic regression written out**: Newton steps on standardised features, intercept as a column of
  ``intercept_scaling`` (liblinear's trick, so its penalty is ``l2 / scaling^2``). With far more features
  (7 modules x 30 layers x 7) than adapters the p x p Hessian is replaced by Woodbury's n x n solve, so a fit
  costs O(n^2 p) whatever p is. No sklearn.
* **AUC is the Mann-Whitney statistic with midranks** -- exact ties count one half -- and the ROC curve
  collapses tied scores into one step, so the trapezoid area under it equals the AUC.
* **Unsupervised score**: distance of an adapter from the cloud of clean adapters of the *other* seeds
  (diagonal z-scores, or Mahalanobis with a covariance shrunk towards the identity and inverted through
  Woodbury because there are fewer clean adapters than features). Scoring a clean adapter against a cloud
  that contains it would inflate the AUC.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy.stats import rankdata
from scipy.stats import t as student_t

from jaxpoison.analysis.weight_shift import REFERENCE_FEATURES


# ---------------------------------------------------------------------------------------------------- AUC, ROC

def roc_auc(scores, labels) -> np.ndarray:
    """P(score_pos > score_neg) + 0.5 P(tie) for every leading row of ``scores`` [..., n]; labels [n] bool."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    n1, n0 = labels.sum(), (~labels).sum()
    if n1 == 0 or n0 == 0:
        return np.full(scores.shape[:-1], np.nan)[()]
    ranks = rankdata(scores, axis=-1)
    return ((ranks[..., labels].sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0))[()]


def roc_curve(scores, labels) -> tuple:
    """(fpr, tpr, thresholds) from (0, 0) to (1, 1); tied scores form one (diagonal) step."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    fpr = np.r_[0.0, fp / max(fp[-1], 1)]
    tpr = np.r_[0.0, tp / max(tp[-1], 1)]
    return fpr, tpr, np.r_[np.inf, s[last]]


def _weighted_auc(scores, labels, weights) -> np.ndarray:
    """AUC under multiplicities ``weights`` [R, n] (bootstrap resamples), exact ties: m_pos^T C m_neg."""
    pos, neg = scores[labels], scores[~labels]
    c = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    wp, wn = weights[:, labels], weights[:, ~labels]
    den = wp.sum(1) * wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.einsum("ri,ij,rj->r", wp, c, wn) / den, np.nan)


def cluster_bootstrap_auc_ci(scores, labels, groups, n_resamples: int = 2000, confidence: float = 0.95,
                             seed=0) -> tuple:
    """Percentile CI of the AUC resampling whole groups (seeds) with replacement; resamples without both
    classes are dropped. Returns (low, high)."""
    scores, labels, groups = np.asarray(scores, float), np.asarray(labels, bool), np.asarray(groups)
    uniq, gi = np.unique(groups, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(uniq), (n_resamples, len(uniq)))
    counts = np.stack([np.bincount(d, minlength=len(uniq)) for d in draws])
    auc = _weighted_auc(scores, labels, counts[:, gi].astype(float))
    alpha = (1 - confidence) / 2
    if not np.isfinite(auc).any():
        return np.nan, np.nan
    return tuple(float(q) for q in np.nanquantile(auc, [alpha, 1 - alpha]))


# ------------------------------------------------------------------------------------------ features, folds

def feature_matrix(feats: dict, exclude: Sequence[str] = REFERENCE_FEATURES, log: bool = True) -> tuple:
    """Flatten ``{"module/feature": [V, L] or [V]}`` into X [V, P] and names ``"module/feature[layer]"``
    (``"log "`` prefixed where a strictly positive column was logged)."""
    cols, names = [], []
    for key, value in feats.items():
        if key.split("/", 1)[1] in exclude:
            continue
        value = np.asarray(value, float)
        value = value[:, None] if value.ndim == 1 else value.reshape(value.shape[0], -1)
        for j in range(value.shape[1]):
            col, name = value[:, j], key if np.ndim(feats[key]) == 1 else f"{key}[{j}]"
            if log and np.all(col > 0):
                col, name = np.log(col), "log " + name
            cols.append(col)
            names.append(name)
    return np.stack(cols, 1), names


def grouped_folds(groups, n_folds: Optional[int] = None, seed=0) -> list:
    """(train_idx, test_idx) pairs with every group wholly on one side; leave-one-group-out by default."""
    groups = np.asarray(groups)
    uniq = np.unique(groups)
    if n_folds is None or n_folds >= len(uniq):
        parts = [[g] for g in uniq]
    else:
        parts = np.array_split(np.random.default_rng(seed).permutation(uniq), n_folds)
    folds = []
    for part in parts:
        test = np.isin(groups, part)
        folds.append((np.flatnonzero(~test), np.flatnonzero(test)))
    return folds


def _standardizer(x: np.ndarray) -> tuple:
    mean, std = x.mean(0), x.std(0)
    return mean, np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)


# ------------------------------------------------------------------------------------------ logistic regression

def fit_logistic(x, y, l2: float = 1.0, intercept_scaling: float = 10.0, max_iter: int = 100,
                 tol: float = 1e-9) -> dict:
    """L2-regularised logistic regression on standardised ``x`` [n, p]: minimises
    ``sum(log(1 + e^eta) - y eta) + l2/2 |theta|^2`` by damped Newton with Woodbury steps, until the largest
    gradient entry is below ``tol``.
    Returns ``{"mean", "std", "coef" [p] (per standardised feature), "intercept", "iterations"}``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    mean, std = _standardizer(x)
    z = np.concatenate([np.full((len(x), 1), intercept_scaling), (x - mean) / std], 1)
    gram = z @ z.T
    theta = np.zeros(z.shape[1])

    def objective(t):
        eta = z @ t
        return np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * l2 * t @ t

    f = objective(theta)
    for it in range(max_iter):
        mu = 1.0 / (1.0 + np.exp(-(z @ theta)))
        g = z.T @ (mu - y) + l2 * theta
        r = np.sqrt(mu * (1.0 - mu))
        inner = np.linalg.solve(l2 * np.eye(len(x)) + r[:, None] * gram * r[None, :], r * (z @ g))
        step = (g - z.T @ (r * inner)) / l2
        decrement = g @ step
        if np.abs(g).max() <= tol or decrement <= 1e-24:
            break
        t = 1.0
        while objective(theta - t * step) > f - 0.25 * t * decrement and t > 1e-10:
            t *= 0.5
        if t <= 1e-10:  # no descent left at float64 precision
            break
        theta = theta - t * step
        f = objective(theta)
    return {"mean": mean, "std": std, "coef": theta[1:], "intercept": theta[0] * intercept_scaling,
            "iterations": it + 1}


def predict_logit(model: dict, x) -> np.ndarray:
    """Decision values (log-odds of poisoned) for rows of ``x``."""
    return ((np.asarray(x, float) - model["mean"]) / model["std"]) @ model["coef"] + model["intercept"]


def cross_validated_scores(x, y, groups, l2: float = 1.0, n_folds: Optional[int] = None, seed=0) -> tuple:
    """Out-of-fold decision values [n] from grouped folds and the per-fold coefficients [F, p]."""
    x, y = np.asarray(x, float), np.asarray(y, bool)
    scores, coefs = np.full(len(x), np.nan), []
    for train, test in grouped_folds(groups, n_folds, seed):
        if y[train].all() or not y[train].any():
            raise ValueError("a training fold holds only one class; fix: give every seed clean and poisoned "
                             "variants, or use fewer folds")
        model = fit_logistic(x[train], y[train], l2)
        scores[test] = predict_logit(model, x[test])
        coefs.append(model["coef"])
    return scores, np.stack(coefs)


# ----------------------------------------------------------------------------------------- unsupervised score

def clean_distance_scores(x, clean, groups, method: str = "diag", shrinkage: float = 0.5, n_folds=None,
                          seed=0) -> np.ndarray:
    """Distance of every adapter from the clean adapters of the other folds' seeds, as mean squared z-score
    per feature (``'diag'``) or Mahalanobis with covariance ``(1 - shrinkage) C + shrinkage I`` on z-scores
    (``'mahalanobis'``), also divided by p. Larger = further from clean."""
    if method not in ("diag", "mahalanobis"):
        raise ValueError(f"method must be 'diag' or 'mahalanobis', got {method!r}")
    x, clean = np.asarray(x, float), np.asarray(clean, bool)
    out = np.full(len(x), np.nan)
    for train, test in grouped_folds(groups, n_folds, seed):
        ref = x[train][clean[train]]
        if len(ref) < 2:
            raise ValueError("fewer than 2 clean adapters outside a fold; fix: more seeds with a clean variant")
        mean, std = ref.mean(0), ref.std(0, ddof=1)
        std = np.where(std > 1e-12 * np.maximum(1.0, np.abs(mean)), std, 1.0)
        zt = (x[test] - mean) / std
        if method == "diag":
            out[test] = np.mean(zt ** 2, 1)
            continue
        zr = (ref - mean) / std / np.sqrt(len(ref) - 1)  # C = zr^T zr
        k = (1 - shrinkage) * zr
        inner = np.linalg.solve(shrinkage * np.eye(len(ref)) + k @ zr.T, k @ zt.T)
        out[test] = (np.sum(zt ** 2, 1) - np.sum((zr @ zt.T) * inner, 0)) / shrinkage / x.shape[1]
    return out


# ---------------------------------------------------------------------------------------------------- report

def fold_auc_ci(scores, labels, folds, confidence: float = 0.95) -> dict:
    """Mean of the per-fold AUCs (each fold's adapters ranked by the model that did not see them) with a
    Nadeau-Bengio corrected t interval: variance ``s^2 (1/K + n_test/n_train)``, because folds share training
    data and the naive ``s^2 / K`` is too small. Folds without both classes are skipped."""
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    aucs, ratios = [], []
    for train, test in folds:
        if labels[test].any() and not labels[test].all():
            aucs.append(float(roc_auc(scores[test], labels[test])))
            ratios.append(len(test) / len(train))
    k = len(aucs)
    mean = float(np.mean(aucs)) if k else np.nan
    if k < 2:
        return {"auc": mean, "auc_ci": [np.nan, np.nan], "auc_folds": aucs}
    half = student_t.ppf(0.5 + confidence / 2, k - 1) * np.std(aucs, ddof=1) * np.sqrt(1 / k + np.mean(ratios))
    return {"auc": mean, "auc_ci": [float(max(0.0, mean - half)), float(min(1.0, mean + half))], "auc_folds": aucs}


def auc_summary(scores, y, seeds, folds, n_resamples, seed) -> dict:
    """Both AUCs of one score: the per-fold mean with its corrected interval (:func:`fold_auc_ci` over
    ``folds``) and the pooled AUC with its seed-clustered bootstrap CI, plus n per class and the seed count."""
    low, high = cluster_bootstrap_auc_ci(scores, y, seeds, n_resamples, seed=seed)
    return {**fold_auc_ci(scores, y, folds), "auc_pooled": float(roc_auc(scores, y)),
            "auc_pooled_ci": [low, high], "n_clean": int((~y).sum()), "n_poisoned": int(y.sum()),
            "n_seeds": int(len(np.unique(seeds)))}


def restrict_folds(folds, keep) -> list:
    """The folds re-indexed into the subset ``keep`` (bool [n])."""
    kept = np.flatnonzero(keep)
    return [(np.flatnonzero(np.isin(kept, tr)), np.flatnonzero(np.isin(kept, te))) for tr, te in folds]


def detect(x, names: Sequence[str], poisoned, seeds, levels=None, l2: float = 1.0, n_folds: Optional[int] = None,
           distance: str = "diag", n_resamples: int = 2000, top: int = 20, seed=0) -> dict:
    """The detector report (JSON-ready; an undefined CI is NaN): ``auc`` / ``auc_ci`` (per-fold mean, corrected
    t interval) and ``auc_pooled`` / ``auc_pooled_ci`` (all out-of-fold scores, seed bootstrap) of the
    logistic detector, n per class and seeds, the pooled ROC curve, the coefficients that carry the signal
    (full-data fit, with their spread across folds), the best single features, the same AUCs for the
    clean-distance score, and per poison level (each level vs all non-poisoned adapters) both AUCs.

    ``x`` [V, P] with ``names`` from :func:`feature_matrix`; ``poisoned``, ``seeds``, ``levels`` [V]."""
    x, y, seeds = np.asarray(x, float), np.asarray(poisoned, bool), np.asarray(seeds)
    scores, fold_coefs = cross_validated_scores(x, y, seeds, l2, n_folds, seed)
    dist = clean_distance_scores(x, ~y, seeds, distance, n_folds=n_folds, seed=seed)
    fpr, tpr, _ = roc_curve(scores, y)
    full = fit_logistic(x, y, l2)
    order = np.argsort(-np.abs(full["coef"]))[:top]
    uni = roc_auc(x.T, y)
    uni_order = np.argsort(-np.abs(uni - 0.5))[:top]
    folds = grouped_folds(seeds, n_folds, seed)
    report = {**auc_summary(scores, y, seeds, folds, n_resamples, seed), "features": list(names),
              "cv": "leave-one-seed-out" if n_folds is None else f"{n_folds}-fold grouped by seed", "l2": l2,
              "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
              "coefficients": [{"feature": names[j], "coef": float(full["coef"][j]),
                                "fold_mean": float(fold_coefs[:, j].mean()),
                                "fold_sd": float(fold_coefs[:, j].std())} for j in order],
              "univariate_auc": [{"feature": names[j], "auc": float(uni[j])} for j in uni_order],
              "distance": {"method": distance, **auc_summary(dist, y, seeds, folds, n_resamples, seed)},
              "scores": scores.tolist(), "distance_scores": dist.tolist()}
    if levels is not None:
        levels = np.asarray(levels, float)
        report["by_level"] = []
        for level in np.unique(levels[y & np.isfinite(levels)]):
            keep = ~y | (levels == level)
            sub = restrict_folds(folds, keep)
            report["by_level"].append({
                "level": float(level), **auc_summary(scores[keep], y[keep], seeds[keep], sub, n_resamples, seed),
                "distance_auc": fold_auc_ci(dist[keep], y[keep], sub)["auc"]})
    return report
