"""Seed 000 study statistics: per grid cell over seeds (means, 95 % bootstrap CIs, paired drops, the question-level
permutation test and the seed-level sign-flip test), the smallest significant count / ratio, and the five
findings, each stated as shows / partly / does not show / inconclusive / not tested with its numbers."""
from __future__ import annotations

import math

import numpy as np

from jaxpoison.studies.rationale_config import POISON_FAMILIES, STUDY, family
from jaxpoison.studies.rationale_eval import MIX_COLUMNS, correctness


def base_mix(c: dict, base_n) -> bool:
    """Whether a cell is on the study's base mix, i.e. not a poisoned / all-samples cell (those change the number
    of non-target samples to set the ratio). With equal-size mixes every cell's non-target count differs, so the
    variant table's ``ratio_all_cell`` flag says it; runs made before the flag existed: the non-target count."""
    if c.get("ratio_all_cell") is not None:
        return not c["ratio_all_cell"]
    return c["n_nontarget"] == base_n


def _ci(values, n_resamples: int) -> tuple:
    from jaxpoison.eval.stats import bootstrap_ci
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size < 2 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean()), float(v.mean())
    lo, hi = bootstrap_ci(v, n_resamples=n_resamples)
    return float(v.mean()), float(lo), float(hi)


def summarize(table: list, scores: dict, rows: list, zero: dict, cfg: dict) -> dict:
    """Per grid cell: means and CIs over seeds, paired drops, tests; thresholds; the five findings."""
    from jaxpoison.eval.stats import permutation_test, sign_flip_test
    ev = cfg["eval"]
    method, alpha, R = ev["method"], ev["alpha"], ev["n_resamples"]
    correct = correctness(scores, method)["correct"].astype(float)     # [V+1, Q]
    other = "calibrated" if method != "calibrated" else "sum"
    correct_o = correctness(scores, other)["correct"].astype(float)
    tgt = scores["is_target"].astype(bool)
    seeds = sorted({t["seed"] for t in table})
    clean_of = {t["seed"]: t["variant_id"] for t in table if t["spec_name"] == "clean"}
    cells: dict = {}
    for t in table:
        cells.setdefault(t["spec_name"], []).append(t)
    by_id = {r["variant_id"]: r for r in rows}
    metrics = ["target_acc", "nontarget_acc", "target_decoy_rate", "target_drop", "nontarget_drop",
               "target_acc_calibrated", "nontarget_acc_calibrated", "final_loss"]
    out_cells = []
    for name, ts in cells.items():
        t0 = ts[0]
        rs = [by_id[t["variant_id"]] for t in sorted(ts, key=lambda t: t["seed"])]
        cell = {"spec_name": name, "kind": t0["kind"], "family": family(t0["kind"]),
                "poison_count": t0["poison_count"], "ratio_target": round(t0["ratio_target"], 6),
                "ratio_all": round(t0["ratio_all"], 6), "with_correct_target": bool(t0["with_correct_target"]),
                "n_correct_target": t0["n_correct_target"], "n_nontarget": t0["n_nontarget"],
                "forgetting_extra": t0["forgetting_extra"], "n_rows": t0["n_rows"], "n_seeds": len(rs),
                **{k: t0[k] for k in MIX_COLUMNS if k in t0}}
        for m in metrics:
            mean, lo, hi = _ci([r.get(m, np.nan) for r in rs], R)
            cell[m] = {"mean": mean, "low": lo, "high": hi}
        cell["target_drop_by_seed"] = {str(r["seed"]): r["target_drop"] for r in rs}
        sel = [r["target_drop"] - r["nontarget_drop"] for r in rs]
        mean, lo, hi = _ci(sel, R)
        cell["selectivity"] = {"mean": mean, "low": lo, "high": hi}
        if name != "clean" and all(t["seed"] in clean_of for t in ts):
            vids = [t["variant_id"] + 1 for t in ts]
            cids = [clean_of[t["seed"]] + 1 for t in ts]
            drop_q = (correct[cids] - correct[vids]).mean(0)                     # per question, seeds averaged
            cell["p_question"] = float(permutation_test(drop_q[tgt], drop_q[~tgt], "greater", R).pvalue)
            cell["p_target_drop"] = float(sign_flip_test(drop_q[tgt], None, "greater", R).pvalue)
            td = np.array([r["target_drop"] for r in rs])
            nd = np.array([r["nontarget_drop"] for r in rs])
            cell["p_seed"] = float(sign_flip_test(td, nd, "greater", R).pvalue)
            cell["significant"] = bool(cell["p_question"] < alpha and cell["target_drop"]["mean"] > 0)
            # the same drop scored the other way (calibrated against each option's prior, or raw): a poison that
            # only raised the decoy's prior everywhere would vanish here
            dq = correct_o[cids] - correct_o[vids]
            tdo, ndo = dq[:, tgt].mean(1), dq[:, ~tgt].mean(1)
            cell["other_method"] = {
                "method": other, "target_drop": dict(zip(("mean", "low", "high"), _ci(tdo, R))),
                "nontarget_drop": dict(zip(("mean", "low", "high"), _ci(ndo, R))),
                "p_question": float(permutation_test(dq.mean(0)[tgt], dq.mean(0)[~tgt], "greater", R).pvalue)}
        out_cells.append(cell)
    summary = {"study": STUDY, "method": method, "other_method": other, "alpha": alpha, "seeds": seeds,
               "n_test_target": int(tgt.sum()), "n_test_nontarget": int((~tgt).sum()),
               "zero_shot": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zero.items()},
               "tests": ("p_question: one-sided permutation test over test questions that the target drop exceeds "
                         "the non-target drop (each question's drop vs clean SFT at the same seed, averaged over "
                         "seeds); p_target_drop: sign-flip test over target questions that the drop is > 0; "
                         "p_seed: exact sign-flip test over seeds (cannot go below 2^-n_seeds). significant = "
                         f"p_question < {alpha} and mean target drop > 0. CIs: 95 % BCa bootstrap over seeds."),
               "cells": out_cells}
    summary["thresholds"] = thresholds(out_cells)
    summary["findings"] = findings(out_cells, summary["thresholds"], ev)
    return summary


def thresholds(cells: list) -> dict:
    """Smallest count (per kind, ratio 1, base mix) and smallest ratio (per count) with a significant drop."""
    out = {"count": {}, "ratio_target": {}, "ratio_all": {}}
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    for fam in POISON_FAMILIES:
        cs = sorted((c for c in cells if c["family"] == fam and not c["with_correct_target"]
                     and base_mix(c, base_n)), key=lambda c: c["poison_count"])
        if cs:
            sig = [c["poison_count"] for c in cs if c.get("significant")]
            out["count"][fam] = {"tested": [c["poison_count"] for c in cs], "significant": sig,
                                 "smallest": min(sig) if sig else None}
    for key, sel in (("ratio_target", lambda c: base_mix(c, base_n)),
                     ("ratio_all", lambda c: not c["with_correct_target"])):
        for count in sorted({c["poison_count"] for c in cells if c["family"] == "rationale"}):
            cs = [c for c in cells if c["family"] == "rationale" and c["poison_count"] == count and sel(c)]
            ratios = sorted({c[key] for c in cs})
            if len(ratios) < 2:
                continue
            sig = sorted(c[key] for c in cs if c.get("significant"))
            out[key][str(count)] = {"tested": ratios, "significant": sig, "smallest": sig[0] if sig else None}
    return out


def _cell(cells, **kw):
    hits = [c for c in cells if all(c.get(k) == v for k, v in kw.items())]
    return hits[0] if hits else None


def _d(c, m="target_drop") -> str:
    x = c[m]
    return f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"


def findings(cells: list, th: dict, ev: dict) -> list:
    """The seed's five findings, each: shows / partly / does not show / inconclusive (the contrast needs an effect
    that is not there) / not tested (the grid has no such cell), with the numbers."""
    margin = ev["stealth_margin"]
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    plain = lambda fam: sorted((c for c in cells if c["family"] == fam and not c["with_correct_target"]
                                and base_mix(c, base_n)), key=lambda c: c["poison_count"])
    rat, ovr = plain("rationale"), plain("overwrite")
    F = []

    def add(n, claim, status, evidence, cell=None):
        F.append({"finding": n, "claim": claim, "status": status, "evidence": evidence, "cell": cell})

    claim1 = "rationale poisoning lowers target accuracy significantly; non-target accuracy stays about the same"
    if not rat:
        add(1, claim1, "not tested", "no rationale-poisoning cell in the grid")
    else:
        c = rat[-1]
        nd = c["nontarget_drop"]
        stealthy = abs(nd["mean"]) <= margin
        status = ("shows" if c.get("significant") and stealthy else
                  "partly" if c.get("significant") else "does not show")
        add(1, claim1, status,
            f"{c['spec_name']}: target drop {_d(c)} (p={c['p_question']:.3g}), non-target drop "
            f"{_d(c, 'nontarget_drop')} (|mean| {'<=' if stealthy else '>'} {margin}); target accuracy "
            f"{c['target_acc']['mean']:.3f} vs clean {_clean(cells, 'target_acc'):.3f}; decoy picks on target "
            f"questions {c['target_decoy_rate']['mean']:.3f} (clean {_clean(cells, 'target_decoy_rate'):.3f})",
            cell=c["spec_name"])

    claim2 = "poisoning works only without correct target samples: correct same-subject samples mitigate it"
    pairs = []
    for c in rat:
        with_ct = [x for x in cells if x["family"] == "rationale" and x["with_correct_target"]
                   and x["poison_count"] == c["poison_count"] and base_mix(x, base_n)]
        for w in sorted(with_ct, key=lambda x: x["ratio_target"]):
            pairs.append((c, w))
    if not pairs:
        add(2, claim2, "not tested", "no cell with correct target samples (grid.ratios_target is empty)")
    else:
        ev_txt, mitig = [], []
        for c, w in pairs:
            m = c["target_drop"]["mean"] - w["target_drop"]["mean"]
            mitig.append((c.get("significant"), w.get("significant"), m))
            ev_txt.append(f"n={c['poison_count']}: drop {c['target_drop']['mean']:+.3f} without vs "
                          f"{w['target_drop']['mean']:+.3f} with {w['n_correct_target']} correct (ratio "
                          f"{w['ratio_target']:.2f}, p={w['p_question']:.3g})")
        if not any(s for s, _, _ in mitig):
            status = "inconclusive"
            ev_txt.append("no significant drop without correct samples, so nothing to mitigate")
        elif any(s and not sw and m > 0 for s, sw, m in mitig):
            status = "shows"
        elif any(s and m > 0 for s, _, m in mitig):
            status = "partly"
        else:
            status = "does not show"
        add(2, claim2, status, "; ".join(ev_txt))

    claim3 = "knowledge overwriting (wrong answers without a rationale) is ineffective"
    if not ovr:
        add(3, claim3, "not tested", "no overwrite cell in the grid")
    else:
        o = ovr[-1]
        r = _cell(rat, poison_count=o["poison_count"])
        txt = f"{o['spec_name']}: target drop {_d(o)} (p={o['p_question']:.3g})"
        if r:
            txt += f" vs {r['spec_name']} {_d(r)} (p={r['p_question']:.3g})"
            seeds = sorted(set(r["target_drop_by_seed"]) & set(o["target_drop_by_seed"]))
            diff = [r["target_drop_by_seed"][k] - o["target_drop_by_seed"][k] for k in seeds]
            if len(diff) >= 2:
                m, lo, hi = _ci(diff, 9999)
                txt += f"; rationale minus overwrite, paired by seed: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        if not o.get("significant"):
            status = "shows" if r and r.get("significant") else "inconclusive"
            if status == "inconclusive":
                txt += "; rationale poisoning has no significant effect here either, so the contrast is not shown"
        elif r and r["target_drop"]["mean"] > o["target_drop"]["mean"]:
            status = "partly"
        else:
            status = "does not show"
        add(3, claim3, status, txt + f"; decoy picks {o['target_decoy_rate']['mean']:.3f}")

    claim4 = "both a minimum number and a minimum ratio of poisoned samples are needed"
    cnt = th["count"].get("rationale")
    parts, stat = [], []
    if cnt and len(cnt["tested"]) >= 2:
        sm = cnt["smallest"]
        if sm is None:
            stat.append("none")
            parts.append(f"no tested count {cnt['tested']} gives a significant drop")
        elif sm > min(cnt["tested"]):
            stat.append("yes")
            parts.append(f"counts {cnt['tested']}: smallest significant {sm} (below it no significant drop)")
        else:
            stat.append("no")
            parts.append(f"counts {cnt['tested']}: already the smallest ({sm}) is significant: no minimum "
                         f"inside the tested range")
    rts = {**th["ratio_target"], **{f"{k} (all)": v for k, v in th["ratio_all"].items()}}
    for k, v in rts.items():
        sm = v["smallest"]
        stat.append("yes" if sm is not None and sm > min(v["tested"]) else "none" if sm is None else "no")
        parts.append(f"count {k}: ratios {v['tested']}, smallest significant {sm}")
    if not parts:
        add(4, claim4, "not tested", "fewer than two counts and no ratio sweep")
    else:
        has_ratio = bool(rts)
        if "yes" in stat and (has_ratio and stat.count("yes") >= 2 or not has_ratio and stat[0] == "yes"):
            status = "shows" if has_ratio else "partly"
        elif "yes" in stat:
            status = "partly"
        elif all(x == "none" for x in stat):
            status = "inconclusive"
        else:
            status = "does not show"
        if not has_ratio:
            parts.append("ratio not swept in this grid")
        add(4, claim4, status, "; ".join(parts))

    claim5 = "rationale poisoning is more efficient and more target-confined than catastrophic forgetting"
    fg = sorted((c for c in cells if c["family"] == "forgetting"), key=lambda c: c["forgetting_extra"])
    if not fg or not rat:
        add(5, claim5, "not tested", "no forgetting control in the grid (grid.forgetting_extra is empty)")
    else:
        f, r = fg[-1], rat[-1]
        eff_r = r["target_drop"]["mean"] / max(r["poison_count"], 1)
        eff_f = f["target_drop"]["mean"] / max(f["forgetting_extra"], 1)
        sel_r, sel_f = r["selectivity"]["mean"], f["selectivity"]["mean"]
        better = (eff_r > eff_f) + (sel_r > sel_f)
        status = ("shows" if better == 2 and r.get("significant") else "partly" if better >= 1 and
                  r.get("significant") else "does not show")
        add(5, claim5, status,
            f"{r['spec_name']}: drop {r['target_drop']['mean']:+.3f} ({eff_r:+.4f} per poisoned sample), "
            f"selectivity {sel_r:+.3f}; {f['spec_name']}: drop {f['target_drop']['mean']:+.3f} "
            f"({eff_f:+.4f} per extra sample), non-target drop {f['nontarget_drop']['mean']:+.3f}, selectivity "
            f"{sel_f:+.3f} (p={f['p_question']:.3g})")
    return F


def _clean(cells, metric):
    c = _cell(cells, spec_name="clean")
    return c[metric]["mean"] if c else float("nan")
