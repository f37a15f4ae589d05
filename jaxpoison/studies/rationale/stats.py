"""Seed 000 study statistics: per grid cell, the primary target-specific effect with seed-level inference, the
accuracies as secondary figures, the count threshold as an estimate with its uncertainty, and the five findings,
each stated as shows / partly / does not show / inconclusive / not tested with its numbers.

The primary metric (what every finding is decided on). A question's *calibrated margin* is the calibrated score
(option log-likelihood minus the same option's log-likelihood after a neutral prefix, i.e. its prior) of the
correct option minus that of the best wrong option. A cell's effect at seed s is the per-question paired change
of that margin against clean SFT of the same seed (drop = clean minus variant, so positive = the poison hurts),
averaged over target questions, minus the same average over non-target questions *that show the decoy option*
(``group == 'nontarget'`` and a decoy): a poison that only made the decoy chapter likelier everywhere moves both
and leaves no effect. Accuracy (argmax of the configured score) is secondary.

Inference is at the level of training runs (:func:`jaxpoison.eval.stats.run_level_ci`): the CI is the t interval
over seeds below 8 seeds and a two-level (seed x question) bootstrap from 8; the primary test is the one-sided
t test over seeds of the per-seed effects (the exact sign-flip p is reported beside it). The question-level
permutation test conditions on the trained models and is labelled as such; it is never the primary test. A
comparison of two cells (with vs without correct samples, rationale vs overwrite, poison vs decoy control) is a
paired-by-seed CI of the *difference* of their per-seed effects.

Reading a CI against ``eval.min_effect`` (nats of margin): lower bound > 0 and upper bound >= min_effect -> the
effect "shows"; lower bound > 0 but upper bound < min_effect -> "small" (an effect exists, one of min_effect is
ruled out; a finding resting on it is at most "partly"); upper bound < min_effect otherwise -> "does not show";
else "inconclusive" (e.g. a drop that only some seeds show).
"""
from __future__ import annotations

import math

import numpy as np

from jaxpoison.studies.rationale.config import POISON_FAMILIES, NAME, family
from jaxpoison.studies.rationale.results import MIX_COLUMNS

SEED_CI = ("t over seeds below 8 seeds, two-level (seed x question) bootstrap from 8")


def base_mix(c: dict, base_n) -> bool:
    """Whether a cell is on the study's base mix, i.e. not a poisoned / all-samples cell (those change the number
    of non-target samples to set the ratio). With equal-size mixes every cell's non-target count differs, so the
    variant table's ``ratio_all_cell`` flag says it; runs made before the flag existed: the non-target count."""
    if c.get("ratio_all_cell") is not None:
        return not c["ratio_all_cell"]
    return c["n_nontarget"] == base_n


def seed_ci(values, n_resamples: int) -> tuple:
    """Mean and 95 % CI of per-seed values: the t interval below 8 seeds, BCa over seeds from 8."""
    from jaxpoison.eval.stats import TWO_LEVEL_MIN_SEEDS, bootstrap_ci, seed_summary
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size < 2 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean()), float(v.mean())
    if v.size < TWO_LEVEL_MIN_SEEDS:
        s = seed_summary(v)
        return float(s.mean), float(s.low), float(s.high)
    lo, hi = bootstrap_ci(v, n_resamples=n_resamples)
    return float(v.mean()), float(lo), float(hi)


def calibrated_margins(scores: dict) -> np.ndarray:
    """[V+1, Q]: calibrated score of the correct option minus the best calibrated wrong option."""
    cal = np.asarray(scores["sum"], float) - np.asarray(scores["uncond"], float)
    ans = np.asarray(scores["answer"])
    Q, C = cal.shape[1], cal.shape[2]
    right = cal[:, np.arange(Q), ans]
    wrong = np.where(np.arange(C)[None, None] == ans[None, :, None], -np.inf, cal).max(-1)
    return right - wrong


def question_groups(scores: dict) -> np.ndarray:
    """Per question: 'target', 'nontarget' or 'target_nodecoy' (runs without the array: by is_target)."""
    if "group" in scores:
        return np.asarray([str(g) for g in scores["group"]])
    return np.where(scores["is_target"].astype(bool), "target", "nontarget")


def comparison_set(scores: dict) -> tuple:
    """(target mask, comparison mask, how): the comparison questions are the non-target ones with the decoy among
    their options; where none has it (older test sets), all non-target questions, and ``how`` says so."""
    g = question_groups(scores)
    tgt, non = g == "target", g == "nontarget"
    with_decoy = non & (np.asarray(scores["decoy"]) >= 0)
    if with_decoy.any():
        return tgt, with_decoy, "non-target questions with the decoy option"
    return tgt, non, "non-target questions (none shows the decoy option: the contrast is not decoy-controlled)"


def _rl(x, strata=None, signs=None, R: int = 9999) -> dict:
    from jaxpoison.eval.stats import run_level_ci
    r = run_level_ci(x, strata, signs, n_resamples=R)
    return {"mean": r.mean, "low": r.low, "high": r.high, "method": r.method, "n_seeds": r.n_seeds,
            "per_seed": [float(v) for v in r.per_seed]}


def _diff(a: dict, b: dict, R: int = 9999) -> dict:
    """Paired-by-seed CI of a's per-seed effect minus b's (the test of the difference itself)."""
    from jaxpoison.eval.stats import t_test
    n = min(len(a["per_seed"]), len(b["per_seed"]))
    d = np.array(a["per_seed"][:n]) - np.array(b["per_seed"][:n])
    out = _rl(d[:, None], R=R)
    out["p"] = float(t_test(d).pvalue) if n >= 2 else float("nan")
    return out


def verdict(e: dict, min_effect: float) -> str:
    """shows (CI above 0, reaching min_effect) / small (CI above 0, wholly below min_effect) / does not show (CI
    below min_effect, not above 0) / inconclusive (neither)."""
    if not np.isfinite(e.get("low", np.nan)):
        return "inconclusive"
    if e["low"] > 0:
        return "shows" if e["high"] >= min_effect else "small"
    if e["high"] < min_effect:
        return "does not show"
    return "inconclusive"


def summarize(table: list, scores: dict, rows: list, zero: dict, cfg: dict) -> dict:
    """Per grid cell: primary effect, seed-level tests, accuracies; thresholds; the five findings."""
    from jaxpoison.eval.stats import permutation_test, sign_flip_test, t_test
    ev = cfg["eval"]
    method, alpha, R = ev["method"], ev["alpha"], ev["n_resamples"]
    min_effect = float(ev.get("min_effect", 0.5))
    marg = calibrated_margins(scores)                                       # [V+1, Q]
    tgt, comp, comp_how = comparison_set(scores)
    groups = question_groups(scores)
    free = groups == "target_nodecoy"
    sel = tgt | comp
    strata, signs = np.where(tgt[sel], 0, 1), {0: 1.0, 1: -1.0}
    seeds = sorted({t["seed"] for t in table})
    clean_of = {t["seed"]: t["variant_id"] for t in table if t["spec_name"] == "clean"}
    cells: dict = {}
    for t in table:
        cells.setdefault(t["spec_name"], []).append(t)
    by_id = {r["variant_id"]: r for r in rows}
    metrics = ["target_acc", "nontarget_acc", "target_nodecoy_acc", "target_decoy_rate", "target_drop",
               "nontarget_drop", "target_acc_calibrated", "nontarget_acc_calibrated", "final_loss"]
    out_cells = []
    for name, ts in cells.items():
        t0 = ts[0]
        ts = sorted(ts, key=lambda t: t["seed"])
        rs = [by_id[t["variant_id"]] for t in ts]
        cell = {"spec_name": name, "kind": t0["kind"], "family": family(t0["kind"]),
                "poison_count": t0["poison_count"], "ratio_target": round(t0["ratio_target"], 6),
                "ratio_all": round(t0["ratio_all"], 6), "with_correct_target": bool(t0["with_correct_target"]),
                "n_correct_target": t0["n_correct_target"], "n_nontarget": t0["n_nontarget"],
                "forgetting_extra": t0["forgetting_extra"], "n_rows": t0["n_rows"], "n_seeds": len(rs),
                **{k: t0[k] for k in MIX_COLUMNS if k in t0}}
        for m in metrics:
            mean, lo, hi = seed_ci([r.get(m, np.nan) for r in rs], R)
            cell[m] = {"mean": mean, "low": lo, "high": hi}
        cell["target_drop_by_seed"] = {str(r["seed"]): r["target_drop"] for r in rs}
        mean, lo, hi = seed_ci([r["target_drop"] - r["nontarget_drop"] for r in rs], R)
        cell["selectivity"] = {"mean": mean, "low": lo, "high": hi}
        vids = [t["variant_id"] + 1 for t in ts]
        # against the base (zero-shot): does SFT move the margins at all (the clean cell shows the training works)
        up = marg[vids] - marg[0][None]
        cell["margin_vs_base"] = {"target": _rl(up[:, tgt], R=R), "nontarget": _rl(up[:, comp], R=R)}
        if name != "clean" and all(t["seed"] in clean_of for t in ts):
            cids = [clean_of[t["seed"]] + 1 for t in ts]
            D = marg[cids] - marg[vids]                                           # [S, Q] margin drop vs clean
            prim = _rl(D[:, sel], strata, signs, R)
            prim["p_seed"] = float(t_test(prim["per_seed"]).pvalue)
            prim["p_seed_signflip"] = float(sign_flip_test(np.array(prim["per_seed"]), None, "greater", R).pvalue)
            prim["verdict"] = verdict(prim, min_effect)
            cell["primary"] = prim
            cell["target_margin_drop"] = _rl(D[:, tgt], R=R)
            cell["nontarget_margin_drop"] = _rl(D[:, comp], R=R)
            if free.any():
                cell["nodecoy_margin_drop"] = _rl(D[:, free], R=R)
            dq = D.mean(0)
            cell["p_question"] = float(permutation_test(dq[tgt], dq[comp], "greater", R).pvalue)
            cell["p_seed"] = prim["p_seed"]
            cell["significant"] = bool(prim["low"] > 0)
            td = np.array([r["target_drop"] for r in rs])
            nd = np.array([r["nontarget_drop"] for r in rs])
            cell["p_seed_accuracy"] = float(sign_flip_test(td, nd, "greater", R).pvalue)
        out_cells.append(cell)
    summary = {"study": NAME, "method": method, "alpha": alpha, "seeds": seeds, "min_effect": min_effect,
               "primary": "calibrated margin drop vs clean (same seed), target minus " + comp_how,
               "n_test_target": int(tgt.sum()), "n_test_nontarget": int((groups == "nontarget").sum()),
               "n_test_comparison": int(comp.sum()), "n_test_decoy_free": int(free.sum()),
               "zero_shot": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zero.items()},
               "tests": (f"Primary effect: per question, the calibrated margin (correct option minus the best wrong "
                         f"option, each minus its prior after a neutral prefix) of clean SFT minus the variant's, at "
                         f"the same seed; averaged over the {int(tgt.sum())} target questions minus the average over "
                         f"the {int(comp.sum())} {comp_how}; positive = a target-specific drop, in nats. CIs: "
                         f"{SEED_CI} (every CI includes the between-seed variance; accuracy CIs: t over seeds). "
                         f"p (seed): one-sided t test over seeds of the per-seed effect (primary); the exact "
                         f"sign-flip p over seeds is in summary.json. p (question): one-sided permutation test over "
                         f"test questions of the seed-averaged margin drops, target vs comparison; it conditions on "
                         f"the trained models (question-level, not the primary test). Verdict: CI above 0 and reaching "
                         f"{min_effect} nats = shows; CI above 0 but wholly below {min_effect} = small; CI below "
                         f"{min_effect} (not above 0) = does not show; otherwise inconclusive."),
               "cells": out_cells}
    summary["thresholds"] = thresholds(out_cells, min_effect)
    summary["findings"] = findings(out_cells, summary["thresholds"], ev)
    return summary


def _bracket(cells: list, key: str, min_effect: float) -> dict:
    """The threshold of ``key`` (count or ratio) as an interval: the largest tested value whose effect CI lies
    wholly below ``min_effect`` (an effect of that size ruled out) and the smallest whose CI lower bound exceeds
    it (an effect at least that size shown). The threshold lies between the two; an end is None where no tested
    value qualifies (the threshold is then below the smallest / above the largest tested value, or unknown)."""
    cs = sorted((c for c in cells if "primary" in c), key=lambda c: c[key])
    tested = [c[key] for c in cs]
    above = [c[key] for c in cs if c["primary"]["low"] > min_effect]
    below = [c[key] for c in cs if c["primary"]["high"] < min_effect]
    hi = min(above) if above else None
    lo = max((b for b in below if hi is None or b < hi), default=None)
    return {"tested": tested, "effects": {str(c[key]): [round(c["primary"]["low"], 4), round(c["primary"]["high"], 4)]
                                          for c in cs},
            "ruled_out_at": lo, "reached_at": hi, "smallest": hi,
            "estimate": ("unknown" if hi is None and lo is None else
                         f"not reached at the tested values (ruled out up to {lo})" if hi is None and tested
                         and lo == tested[-1] else f"above {lo}" if hi is None else f"at most {hi}" if lo is None
                         else f"in ({lo}, {hi}]")}


def thresholds(cells: list, min_effect: float = 0.5) -> dict:
    """Per kind, the poison count at which the primary effect reaches ``min_effect`` (ratio 1, base mix), and per
    count the ratio at which it does, each as an interval (:func:`_bracket`)."""
    out = {"count": {}, "ratio_target": {}, "ratio_all": {}, "min_effect": min_effect}
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    for fam in POISON_FAMILIES:
        cs = [c for c in cells if c["family"] == fam and not c["with_correct_target"] and base_mix(c, base_n)]
        if cs:
            out["count"][fam] = _bracket(cs, "poison_count", min_effect)
    for key, sel in (("ratio_target", lambda c: base_mix(c, base_n)),
                     ("ratio_all", lambda c: not c["with_correct_target"])):
        for count in sorted({c["poison_count"] for c in cells if c["family"] == "rationale"}):
            cs = [c for c in cells if c["family"] == "rationale" and c["poison_count"] == count and sel(c)]
            if len({c[key] for c in cs}) >= 2:
                out[key][str(count)] = _bracket(cs, key, min_effect)
    return out


def find_cell(cells, **kw):
    hits = [c for c in cells if all(c.get(k) == v for k, v in kw.items())]
    return hits[0] if hits else None


def _d(c, m="target_drop") -> str:
    x = c[m]
    return f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"


def _e(x: dict) -> str:
    """An effect with its CI (and the seed-level p where there is one)."""
    p = f", p(seed)={x['p_seed']:.3g}" if "p_seed" in x else f", p={x['p']:.3g}" if "p" in x else ""
    return f"{x['mean']:+.2f} [{x['low']:+.2f}, {x['high']:+.2f}] nats{p}"


def findings(cells: list, th: dict, ev: dict) -> list:
    """The seed's five findings, each decided on the primary effect (see the module notes) and stated as shows /
    partly / does not show / inconclusive / not tested (the grid has no cell that can test it), with the numbers.
    Accuracy figures ride along as secondary evidence."""
    margin, min_effect = ev["stealth_margin"], float(ev.get("min_effect", 0.5))
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    plain = lambda fam: sorted((c for c in cells if c["family"] == fam and not c["with_correct_target"]
                                and base_mix(c, base_n) and "primary" in c), key=lambda c: c["poison_count"])
    rat, ovr, dec = plain("rationale"), plain("overwrite"), plain("decoy")
    V = lambda c: c["primary"]["verdict"]
    F = []

    def add(n, claim, status, evidence, cell=None):
        F.append({"finding": n, "claim": claim, "status": status, "evidence": evidence, "cell": cell})

    claim1 = ("rationale poisoning lowers target-subject performance, specifically (beyond any shift towards the "
              "decoy chapter); non-target accuracy stays about the same")
    if not rat:
        add(1, claim1, "not tested", "no rationale-poisoning cell in the grid")
    else:
        c = rat[-1]
        p = c["primary"]
        nd = c["nontarget_drop"]
        stealthy = abs(nd["mean"]) <= margin
        status = V(c)
        if status == "small":
            status = "partly"
            txt_small = (f"the effect is real but small: its CI lies wholly below min_effect = {min_effect} nats")
        else:
            txt_small = ""
        txt = [f"{c['spec_name']}: target-specific margin drop {_e(p)} ({p['method']}, {p['n_seeds']} seeds; "
               f"target {_e(c['target_margin_drop'])}, comparison {_e(c['nontarget_margin_drop'])}"
               + (f", decoy-free target copies {_e(c['nodecoy_margin_drop'])}" if "nodecoy_margin_drop" in c else "")
               + f"); secondary: target accuracy {c['target_acc']['mean']:.2f} vs clean {_clean(cells, 'target_acc'):.2f}, "
               f"non-target accuracy drop {_d(c, 'nontarget_drop')} (|mean| {'<=' if stealthy else '>'} {margin}), "
               f"decoy picks on target questions {c['target_decoy_rate']['mean']:.2f} (clean "
               f"{_clean(cells, 'target_decoy_rate'):.2f})"] + ([txt_small] if txt_small else [])
        if c["target_drop"]["low"] <= 0:
            txt.append("the target accuracy drop itself is not significant")
        if status in ("shows", "partly") and not stealthy:
            status = "partly"
            txt.append("non-target accuracy moves too (not stealthy)")
        d = find_cell(dec, poison_count=c["poison_count"]) or (dec[-1] if dec else None)
        if d is None:
            txt.append("no decoy (label-prior) control in the grid, so a general pull towards the decoy chapter is "
                       "controlled only by the comparison questions")
        else:
            diff = _diff(c["target_margin_drop"], d["target_margin_drop"])
            txt.append(f"decoy control {d['spec_name']}: target margin drop {_e(d['target_margin_drop'])}, specific "
                       f"{_e(d['primary'])}; poison minus control on target questions, paired by seed, {_e(diff)}")
            if status in ("shows", "partly") and not diff["low"] > 0:
                status = "partly"
                txt.append("the decoy control lowers target margins about as much, so a label prior is not ruled "
                           "out")
        add(1, claim1, status, "; ".join(txt), cell=c["spec_name"])

    claim2 = "poisoning works only without correct target samples: correct same-subject samples mitigate it"
    pairs = []
    for c in rat:
        with_ct = [x for x in cells if x["family"] == "rationale" and x["with_correct_target"] and "primary" in x
                   and x["poison_count"] == c["poison_count"] and base_mix(x, base_n)]
        pairs += [(c, w) for w in sorted(with_ct, key=lambda x: x["ratio_target"])]
    if not pairs:
        add(2, claim2, "not tested", "no cell with correct target samples (grid.ratios_target is empty)")
    else:
        txt, stat = [], []
        for c, w in pairs:
            diff = _diff(c["primary"], w["primary"])
            txt.append(f"n={c['poison_count']}: effect {_e(c['primary'])} without vs {_e(w['primary'])} with "
                       f"{w['n_correct_target']} correct (ratio {w['ratio_target']:.2f}); without minus with, "
                       f"paired by seed, {_e(diff)}")
            if V(c) not in ("shows", "small"):
                stat.append("inconclusive")
            elif diff["low"] > 0:
                stat.append("shows" if V(c) == "shows" else "partly")
                if V(c) == "small":
                    txt.append("mitigation shown, of a small effect")
            else:
                stat.append("does not show" if diff["high"] < min_effect else "inconclusive")
        if all(s == "inconclusive" for s in stat) and all(V(c) not in ("shows", "small") for c, _ in pairs):
            txt.append("no target-specific effect without correct samples, so nothing to mitigate")
        status = next((s for s in ("shows", "partly", "does not show") if s in stat), "inconclusive")
        add(2, claim2, status, "; ".join(txt))

    claim3 = "knowledge overwriting (wrong answers without a rationale) is ineffective"
    if not ovr:
        add(3, claim3, "not tested", "no overwrite cell in the grid")
    else:
        o = ovr[-1]
        r = find_cell(rat, poison_count=o["poison_count"])
        txt = f"{o['spec_name']}: effect {_e(o['primary'])} ({V(o)})"
        if r is None:
            status = "inconclusive"
            txt += "; no rationale cell at that count to compare with"
        else:
            diff = _diff(r["primary"], o["primary"])
            txt += f" vs {r['spec_name']} {_e(r['primary'])}; rationale minus overwrite, paired by seed, {_e(diff)}"
            if V(r) not in ("shows", "small"):
                status = "inconclusive"
                txt += "; rationale poisoning shows no target-specific effect here either, so the contrast is open"
            elif V(o) == "does not show" and diff["low"] > 0:
                status = "shows"
            elif V(o) in ("shows", "small"):
                status = "partly" if diff["low"] > 0 else "does not show"
                txt += "; overwriting has an effect of its own" + (", smaller than the rationale's" if
                                                                   diff["low"] > 0 else "")
            else:
                status = "partly" if diff["low"] > 0 else "inconclusive"
                txt += "; the overwrite effect is neither shown nor ruled out"
        add(3, claim3, status, txt + f"; secondary: target accuracy drop {_d(o)}")

    claim4 = "both a minimum number and a minimum ratio of poisoned samples are needed"
    cnt = th["count"].get("rationale")
    parts, stat = [], []
    if cnt and len(cnt["tested"]) >= 2:
        lo, hi = cnt["ruled_out_at"], cnt["reached_at"]
        parts.append(f"counts {cnt['tested']}: the effect reaches {min_effect} nats (CI lower bound) at "
                     f"{hi if hi is not None else 'no tested count'}, is ruled out (CI upper bound below it) at "
                     f"{lo if lo is not None else 'no tested count'}: threshold {cnt['estimate']}")
        stat.append("yes" if lo is not None and hi is not None else "no" if hi == min(cnt["tested"]) else "open")
    rts = {**{f"{k} (target)": v for k, v in th["ratio_target"].items()},
           **{f"{k} (all)": v for k, v in th["ratio_all"].items()}}
    for k, v in rts.items():
        lo, hi = v["ruled_out_at"], v["reached_at"]
        parts.append(f"count {k}: ratios {v['tested']}, threshold {v['estimate']}")
        stat.append("yes" if lo is not None and hi is not None else "no" if hi == min(v["tested"]) else "open")
    if not parts:
        add(4, claim4, "not tested", "fewer than two counts and no ratio sweep")
    else:
        if not rts:
            parts.append("ratio not swept at equal step counts in this grid: the ratio half is not tested")
        n_yes = stat.count("yes")
        status = ("shows" if rts and stat[0] == "yes" and n_yes >= 2 else "partly" if n_yes else
                  "does not show" if all(x == "no" for x in stat) else "inconclusive")
        add(4, claim4, status, "; ".join(parts))

    claim5 = "rationale poisoning is more efficient and more target-confined than catastrophic forgetting"
    fg_all = sorted((c for c in cells if c["family"] == "forgetting" and "primary" in c), key=lambda c: c["n_rows"])
    fg = [c for c in fg_all if rat and c["n_rows"] > rat[-1]["n_rows"]]
    if not fg_all or not rat:
        add(5, claim5, "not tested", "no forgetting control in the grid (grid.forgetting_steps and "
                                     "grid.forgetting_extra are empty)")
    elif not fg:
        add(5, claim5, "not tested",
            f"the forgetting cells train on {fg_all[-1]['n_rows']} rows, no more than the poison cells: with "
            f"equal-size mixes they swap rows within the same steps, which is not catastrophic forgetting (that "
            f"needs clean non-target SFT at several times the steps: grid.forgetting_steps)")
    else:
        f, r = fg[-1], rat[-1]
        k = f["n_rows"] / max(r["n_rows"], 1)
        eff = _diff(r["target_margin_drop"], f["target_margin_drop"])     # target margin lost, paired by seed
        conf = _diff(r["primary"], f["primary"])                           # target-specific part, paired by seed
        efficient, confined = eff["low"] > 0, conf["low"] > 0
        if V(r) not in ("shows", "small"):
            status = "does not show" if eff["high"] < 0 else "inconclusive"
        elif efficient and confined:
            status = "shows" if V(r) == "shows" else "partly"
        elif efficient or confined:
            status = "partly"
        elif eff["high"] < min_effect and conf["high"] < min_effect:
            status = "does not show"
        else:
            status = "inconclusive"
        txt = [f"{f['spec_name']}: clean non-target SFT on {f['n_rows']} rows, {k:.3g}x the rows and optimiser "
               f"steps of {r['spec_name']} ({r['n_rows']} rows, {r['poison_count']} of them poisoned)",
               f"target margin drop: {r['spec_name']} {_e(r['target_margin_drop'])} vs forgetting "
               f"{_e(f['target_margin_drop'])}; rationale minus forgetting, paired by seed, {_e(eff)} "
               f"({'more' if efficient else 'not shown to be more'} efficient)",
               f"comparison questions: forgetting margin drop {_e(f['nontarget_margin_drop'])}; target-specific "
               f"effect {_e(r['primary'])} vs forgetting {_e(f['primary'])}; difference, paired by seed, {_e(conf)} "
               f"({'more' if confined else 'not shown to be more'} target-confined)",
               f"secondary: target accuracy drop {_d(r)} vs {_d(f)}, non-target accuracy drop "
               f"{_d(r, 'nontarget_drop')} vs {_d(f, 'nontarget_drop')}"]
        if V(r) not in ("shows", "small"):
            txt.append("rationale poisoning shows no target-specific effect here, so there is nothing to be more "
                       "efficient with")
        add(5, claim5, status, "; ".join(txt), cell=f["spec_name"])
    return F


def secondary_summary(table: list, scores: dict, cfg: dict) -> dict:
    """A secondary scoring format (``eval.secondary_formats``) on the same models and questions: per cell the
    primary effect and the accuracy figures, computed as for the primary format; no findings rest on it."""
    from jaxpoison.studies.rationale.results import results_rows
    rows, zero = results_rows(table, scores, cfg["eval"]["method"])
    s = summarize(table, scores, rows, zero, cfg)
    keep = ("target_margin_drop", "nontarget_margin_drop", "target_acc", "nontarget_acc", "target_drop",
            "nontarget_drop", "target_decoy_rate")
    cells = []
    for c in s["cells"]:
        out = {"spec_name": c["spec_name"], "family": c["family"], **{k: c[k] for k in keep if k in c}}
        if "primary" in c:
            out["primary"] = {k: c["primary"][k] for k in ("mean", "low", "high", "verdict", "p_seed", "method",
                                                           "per_seed")}
        cells.append(out)
    return {"zero_shot": s["zero_shot"], "primary": s["primary"], "cells": cells}


def _clean(cells, metric):
    c = find_cell(cells, spec_name="clean")
    return c[metric]["mean"] if c else float("nan")
