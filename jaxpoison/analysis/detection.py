"""Poisoned vs clean adapters: per-feature weight tests and the detector, over a run's variants."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxpoison.analysis import detector
from jaxpoison.analysis import weight_shift

# ---- weight shift --------------------------------------------------------------------------------------------
def group_labels(variants: Sequence[dict], labels: dict) -> np.ndarray:
    """Plot groups per variant: 'clean', 'forgetting', 'poisoned (<level>)'."""
    out = []
    for v, p, lev in zip(variants, labels["poisoned"], labels["level"]):
        if not p:
            out.append("forgetting" if v.get("kind") == "forgetting" else "clean")
        else:
            out.append(f"poisoned ({lev:g})" if np.isfinite(lev) and lev > 0 else "poisoned")
    return np.array(out)


def group_order(groups) -> list:
    """The distinct plot groups of :func:`group_labels` in reading order: clean, forgetting, then the poisoned
    groups by level (unparsable labels last)."""
    def key(g):
        if g == "clean":
            return (0, 0.0)
        if g == "forgetting":
            return (1, 0.0)
        try:
            return (2, float(g.split("(")[1].rstrip(")")))
        except (IndexError, ValueError):
            return (3, 0.0)
    return sorted(set(np.asarray(groups).tolist()), key=key)


def weight_tests(feats: dict, labels: dict, n_resamples: int, seed: int = 0) -> tuple:
    """group_tests for all poisoned vs clean and for each poison level vs clean; (rows, skipped reasons)."""
    clean, poisoned = labels["clean"], labels["poisoned"]
    rows, skipped = [], []
    comps = [("poisoned vs clean", poisoned)]
    levels = labels["level"]
    uniq = np.unique(levels[poisoned & np.isfinite(levels)])
    if len(uniq) > 1:
        comps += [(f"{labels['level_key']}={lv:g} vs clean", poisoned & (levels == lv)) for lv in uniq]
    for name, pos in comps:
        if pos.sum() < 2 or clean.sum() < 2:
            skipped.append(f"{name}: needs >= 2 adapters per group, has {int(pos.sum())} poisoned and "
                           f"{int(clean.sum())} clean")
            continue
        for r in weight_shift.group_tests(feats, poisoned, include=clean | pos, n_resamples=n_resamples, seed=seed):
            rows.append({"comparison": name, **r})
    return rows, skipped


# ---- detector ---------------------------------------------------------------------------------------------------
def _reduced_detect(x, names, y, groups, levels, n_resamples, seed, why) -> dict:
    """The logistic half of :func:`detect` when the clean-distance score cannot be formed."""
    scores, coefs = detector.cross_validated_scores(x, y, groups, seed=seed)
    folds = detector.grouped_folds(groups, None, seed)
    fpr, tpr, _ = detector.roc_curve(scores, y)
    full = detector.fit_logistic(x, y)
    order = np.argsort(-np.abs(full["coef"]))[:20]
    uni = detector.roc_auc(x.T, y)
    uni_order = np.argsort(-np.abs(uni - 0.5))[:20]
    rep = {**detector.auc_summary(scores, y, groups, folds, n_resamples, seed), "features": list(names),
           "cv": "leave-one-seed-out", "l2": 1.0, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
           "coefficients": [{"feature": names[j], "coef": float(full["coef"][j]),
                             "fold_mean": float(coefs[:, j].mean()), "fold_sd": float(coefs[:, j].std())}
                            for j in order],
           "univariate_auc": [{"feature": names[j], "auc": float(uni[j])} for j in uni_order],
           "distance": {"skipped": why}, "scores": scores.tolist()}
    rep["by_level"] = []
    for level in np.unique(levels[y & np.isfinite(levels)]):
        keep = ~y | (levels == level)
        rep["by_level"].append({"level": float(level), **detector.auc_summary(
            scores[keep], y[keep], groups[keep], detector.restrict_folds(folds, keep), n_resamples, seed)})
    return rep


def run_detector(feats: dict, variants: Sequence[dict], labels: dict, n_resamples: int = 2000,
                 seed: int = 0) -> dict:
    """detector.json's content. Always has ``n_clean``, ``n_poisoned``, ``auc``, ``auc_ci``; ``skipped`` says why
    a part could not be computed."""
    y = np.asarray(labels["poisoned"], bool)
    kinds = np.array([str(v.get("kind", "")) for v in variants])
    base = {"n_clean": int((~y).sum()), "n_poisoned": int(y.sum()),
            "n_forgetting": int(np.sum(kinds == "forgetting")), "n_seeds": int(len(np.unique(labels["seed"]))),
            "level_key": labels["level_key"], "negatives": "every non-poisoned adapter (clean and forgetting)"}
    if y.sum() < 2 or (~y).sum() < 2:
        return {**base, "auc": None, "auc_ci": [None, None], "features": [], "by_level": [],
                "skipped": f"the detector needs >= 2 clean and >= 2 poisoned adapters; this input has "
                           f"{int((~y).sum())} clean and {int(y.sum())} poisoned, so no classifier was fitted "
                           f"(weight_shift.csv and the plots are still written)"}
    x, names = detector.feature_matrix(feats)
    groups = np.asarray(labels["seed"])
    notes = []
    one_seed = len(np.unique(groups)) < 2
    if one_seed:
        groups = np.arange(len(y))
        notes.append("all adapters have one seed: folds leave one adapter out (siblings of a seed may sit on both "
                     "sides, so the AUC can be optimistic)")
    levels = np.asarray(labels["level"], float)
    if labels["level_key"] is None:          # no poison count / fraction known: no per-level AUCs
        levels = np.full(len(y), np.nan)
    try:
        rep = detector.detect(x, names, y, groups, levels=levels, n_resamples=n_resamples, seed=seed)
    except ValueError as e:
        if "clean adapters outside a fold" not in str(e):
            return {**base, "auc": None, "auc_ci": [None, None], "features": list(names), "by_level": [],
                    "skipped": f"detector not fitted: {e}"}
        notes.append(f"clean-distance score skipped: {e}")
        try:
            rep = _reduced_detect(x, names, y, groups, levels, n_resamples, seed, str(e))
        except ValueError as e2:
            return {**base, "auc": None, "auc_ci": [None, None], "features": list(names), "by_level": [],
                    "skipped": f"detector not fitted: {e2}"}
    rep = {**rep, **base}
    if one_seed:
        rep["cv"] = "leave-one-adapter-out"
    for b in rep.get("by_level", []):
        b["level_key"] = labels["level_key"]
    # AUC per poison kind (each kind vs every non-poisoned adapter), from the same out-of-fold scores
    scores = np.asarray(rep["scores"], float)
    folds = detector.grouped_folds(groups, None, seed)
    pk = sorted(set(kinds[y].tolist()))
    if len(pk) > 1:
        rep["by_kind"] = []
        for k in pk:
            keep = ~y | (kinds == k)
            rep["by_kind"].append({"kind": k, **detector.auc_summary(
                scores[keep], y[keep], groups[keep], detector.restrict_folds(folds, keep), n_resamples, seed)})
    tasks = np.array([str(v.get("task", "")) for v in variants])
    if len(set(tasks.tolist())) > 1:         # each task's poisoned vs its own non-poisoned adapters
        rep["by_task"] = []
        for task in sorted(set(tasks.tolist())):
            keep = tasks == task
            if y[keep].any() and not y[keep].all():
                rep["by_task"].append({"task": task, **detector.auc_summary(
                    scores[keep], y[keep], groups[keep], detector.restrict_folds(folds, keep), n_resamples, seed)})
    n_rows = [v.get("n_rows") for v in variants]
    if all(isinstance(n, (int, float)) for n in n_rows):
        n_rows = np.asarray(n_rows, float)
        rep["n_rows_auc"] = float(detector.roc_auc(n_rows, y))
        if rep["n_rows_auc"] > 0.75:
            notes.append(f"poisoned variants trained on more rows than the non-poisoned ones (mean "
                         f"{n_rows[y].mean():.3g} vs {n_rows[~y].mean():.3g}; the row count alone separates them "
                         f"with AUC {rep['n_rows_auc']:.2f}); adapter norms grow with the number of optimizer steps, "
                         f"so part of the detector's AUC may be data size, not poison; forgetting controls "
                         f"(grid.forgetting_extra) or ratio-all cells give negatives of the same size")
    rep["variant_ids"] = [v.get("variant_id", i) for i, v in enumerate(variants)]
    rep["feature_set"] = {"modules": sorted({n.split("/")[0].replace("log ", "") for n in names}),
                          "features": list(weight_shift.INTRINSIC_FEATURES), "per_layer": True, "logged": "positive columns",
                          "excluded": list(weight_shift.REFERENCE_FEATURES) + ["(need the clean twin, unknown to a detector)"]}
    if notes:
        rep["notes"] = notes
    return rep
