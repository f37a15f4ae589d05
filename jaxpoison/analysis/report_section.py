"""``analyze``'s figures and its report section (analysis.md / .html, and inside the run's report)."""
from __future__ import annotations

import math
import pathlib
from typing import Optional

import numpy as np

from jaxpoison.analysis import detector
from jaxpoison.analysis import mitigation
from jaxpoison.analysis import plots
from jaxpoison.analysis import weight_shift
from jaxpoison.analysis.adapters import Adapters
from jaxpoison.analysis.detection import group_order

MARK_BEGIN, MARK_END = "<!-- jaxpoison-analyze -->", "<!-- /jaxpoison-analyze -->"


# ---- plots -------------------------------------------------------------------------------------------------------
def _level_plot(by_level: list, level_key: str, path) -> str:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    lv = [b["level"] for b in by_level]
    for key, label, color in (("auc", "logistic (per-fold mean, 95 % CI)", plots.PALETTE[4]),
                              ("distance_auc", "clean distance", plots.PALETTE[2])):
        vals = [b.get(key, np.nan) for b in by_level]
        vals = [np.nan if v is None else v for v in vals]
        if key == "auc":
            lo = [np.nan if b["auc_ci"][0] is None else b["auc_ci"][0] for b in by_level]
            hi = [np.nan if b["auc_ci"][1] is None else b["auc_ci"][1] for b in by_level]
            err = np.array([np.subtract(vals, lo), np.subtract(hi, vals)])
            ax.errorbar(lv, vals, yerr=np.where(np.isfinite(err), err, 0), fmt="o-", color=color, capsize=3,
                        label=label)
        elif np.isfinite(vals).any():
            ax.plot(lv, vals, "s--", color=color, label=label)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel=level_key or "poison level", ylabel="ROC AUC (poisoned vs clean)", ylim=(0, 1.02),
           title="detection vs poison level")
    if len(lv) > 1 and min(lv) > 0 and max(lv) / min(lv) > 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(lv, [f"{v:g}" for v in lv])
    ax.legend(fontsize=8, loc="lower right")
    return plots.save_figure(fig, path)


def make_plots(out: pathlib.Path, ad: Adapters, feats: dict, labels: dict, groups: np.ndarray, det: dict,
               mit: Optional[dict], hist_module: str) -> list:
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    figs = []
    order = group_order(groups)
    linf = weight_shift.linf_columns(ad.lora, [hist_module])[hist_module]
    pooled = {g: {"a": linf["a"][groups == g], "b": linf["b"][groups == g]} for g in order}
    figs.append((plots.linf_histograms(pooled, pdir / "analysis_linf_hist.png",
                                   title=f"{hist_module}: pooled over layers and variants"),
                 f"Seed 003's measure on `{hist_module}`: per-column L-inf norms of LoRA A and B pooled over layers, "
                 f"clean vs each poison level (share of columns; n = columns pooled)."))
    layered = [k for k in feats if np.ndim(feats[k]) == 2 and np.shape(feats[k])[1] > 1]
    if layered:
        keys = [f"{hist_module}/{f}" for f in ("fro", "spectral", "erank", "linf_b_max", "shift", "cosine")
                if f"{hist_module}/{f}" in layered]
        order_idx = np.concatenate([np.flatnonzero(groups == g) for g in order])
        fs = {k: np.asarray(feats[k])[order_idx] for k in feats}
        figs.append((plots.layer_profiles(fs, groups[order_idx], pdir / "analysis_profiles.png", keys=keys),
                     f"Per-layer features of `{hist_module}` (mean over seeds, band: 95 % t interval across seeds). "
                     f"`shift` / `cosine` compare each adapter with the clean variant of its seed."))
        fro = [f"{m}/fro" for m in ad.lora if f"{m}/fro" in layered]
        if len(fro) > 1:
            figs.append((plots.layer_profiles(fs, groups[order_idx], pdir / "analysis_profiles_fro.png", keys=fro),
                         "Frobenius norm of the update s·A·B per layer, every adapted module."))
    if det.get("roc"):
        curves = {"logistic, leave-one-seed-out": (det["roc"]["fpr"], det["roc"]["tpr"], det.get("auc_pooled"))}
        if det.get("distance_scores"):
            y = np.asarray(labels["poisoned"], bool)
            fpr, tpr, _ = detector.roc_curve(np.asarray(det["distance_scores"], float), y)
            curves["distance from clean adapters"] = (fpr, tpr, det["distance"].get("auc_pooled"))
        figs.append((plots.roc_plot(curves, pdir / "analysis_roc.png"),
                     f"ROC of the detectors on out-of-fold scores ({det['n_poisoned']} poisoned, {det['n_clean']} "
                     f"clean adapters, {det['n_seeds']} seeds)."))
    if len(det.get("by_level", [])) > 1:
        figs.append((_level_plot(det["by_level"], det.get("level_key"), pdir / "analysis_auc_by_level.png"),
                     "Detector AUC per poison level (each level against all non-poisoned adapters)."))
    if mit and mit.get("status") == "done":
        for gname in ("poisoned", "clean"):
            fname = f"analysis_mitigation_{gname}.png"
            rows = [r for r in mit["summary"] if r["group"] == gname]
            if not rows:
                continue
            sa, sb, att = mitigation.as_heatmap(rows, "attack")
            _, _, cap = mitigation.as_heatmap(rows, "capability")
            lower = mit["attack_lower_is_better"] if gname == "poisoned" else mit["raw_attack_lower_is_better"]
            alabel = (mit["attack_metric"] if gname == "poisoned" else mit["attack_name"]) + f" ({gname})"
            if not np.isfinite(att).any():
                att = np.zeros_like(cap)
                alabel = "attack not measured (capability only)"
            figs.append((plots.mitigation_heatmaps(sa, sb, att, cap, pdir / fname, attack_label=alabel,
                                               capability_label=f"{mit['capability_name']} ({gname})",
                                               attack_lower_is_better=lower),
                         f"Shrink mitigation on the {gname} adapters: mean over variants at every (s_A, s_B) "
                         f"(s_A, s_B = 0: unscaled). Bold: best cell."))
    return [(str(pathlib.Path(p).relative_to(out)), cap) for p, cap in figs]


# ---- report ------------------------------------------------------------------------------------------------------
def _fmt_ci(v, ci) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    lo, hi = (ci or [None, None])[:2]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def build_doc(ad: Adapters, det: dict, tests: list, test_skips: list, mit: Optional[dict], figs: list,
              timing: dict, out: pathlib.Path):
    from jaxpoison.report import Doc
    d = Doc("Weight shift, poisoned-adapter detection and shrink mitigation")
    y = det["n_poisoned"]
    where = f"checkpoint step {ad.step}" if ad.step else ad.source
    d.p(f"`python -m jaxpoison analyze` on {ad.describe()} ({where}"
        f"): {det['n_clean']} non-poisoned ({det.get('n_forgetting', 0)} of them forgetting controls) and {y} "
        f"poisoned adapters over {det['n_seeds']} seeds.")
    d.h("Weight shift", 3)
    d.p("Per variant, layer and module: Frobenius and spectral norm of the update s·A·B (from r × r Gram matrices), "
        "its effective rank, the seed's per-column L-inf norms of A and B, and against the clean variant of the same "
        "seed the cosine and the shift |ΔW − ΔW_clean|. Tests (KS, permutation on the mean, Cohen's d, Cliff's "
        "delta, BH q over all cells) compare poisoned with clean adapters; every row of `weight_tests.csv` states "
        "the n per group.")
    main = [r for r in tests if r["comparison"] == "poisoned vs clean"]
    if main:
        top = sorted(main, key=lambda r: (np.nan_to_num(r["perm_p"], nan=2.0),
                                          -abs(np.nan_to_num(r["cliffs_delta"]))))[:10]
        d.table(["module", "feature", "layer", "n clean / poisoned", "mean clean", "mean poisoned", "Cliff's δ",
                 "Cohen's d", "p (perm.)", "q (BH)"],
                [[r["module"], r["feature"], "" if r["layer"] is None else r["layer"],
                  f"{r['n_clean']} / {r['n_poisoned']}", f"{r['mean_clean']:.4g}", f"{r['mean_poisoned']:.4g}",
                  r["cliffs_delta"], r["cohens_d"], f"{r['perm_p']:.3g}", f"{r['perm_q']:.3g}"] for r in top])
        nsig = sum(1 for r in main if np.isfinite(r["perm_q"]) and r["perm_q"] < 0.05)
        d.p(f"{nsig} of {len(main)} (feature, layer) cells differ at BH q < 0.05 (the 10 smallest p shown).")
    for s in test_skips:
        d.p(f"Skipped: {s}.")
    d.h("Detector", 3)
    if det.get("auc") is None:
        d.p(f"Skipped: {det.get('skipped', 'not fitted')}.")
    else:
        dist = det.get("distance", {})
        d.p(f"L2 logistic regression on {len(det['features'])} per-layer features, {det['cv']} cross-validation: "
            f"AUC **{_fmt_ci(det['auc'], det['auc_ci'])}** (mean of per-fold AUCs, Nadeau-Bengio 95 % CI); pooled "
            f"out-of-fold AUC {_fmt_ci(det.get('auc_pooled'), det.get('auc_pooled_ci'))} (seed bootstrap, "
            f"optimistic). Unsupervised distance from the clean adapters of the other seeds: "
            + (f"AUC {_fmt_ci(dist.get('auc'), dist.get('auc_ci'))}." if "auc" in dist else
               f"skipped ({dist.get('skipped', '')})."))
        if det.get("by_level"):
            d.table([f"{det.get('level_key') or 'level'}", "n poisoned", "n clean", "AUC (95 % CI)", "distance AUC"],
                    [[int(b["level"]) if float(b["level"]).is_integer() else f"{b['level']:.4g}", b["n_poisoned"],
                      b["n_clean"], _fmt_ci(b["auc"], b["auc_ci"]),
                      b.get("distance_auc")] for b in det["by_level"]])
        for key in ("kind", "task"):
            if det.get(f"by_{key}"):
                d.table([key, "n poisoned", "n clean", "AUC (95 % CI)"],
                        [[b[key], b["n_poisoned"], b["n_clean"], _fmt_ci(b["auc"], b["auc_ci"])]
                         for b in det[f"by_{key}"]])
        uni = det.get("univariate_auc", [])[:5]
        if uni:
            d.p("Strongest single features (AUC on their own, in-sample): " +
                "; ".join(f"`{u['feature']}` {u['auc']:.2f}" for u in uni) + ".")
        for n in det.get("notes", []):
            d.p(f"Note: {n}.")
    d.h("Shrink mitigation", 3)
    if not mit or mit.get("status") != "done":
        d.p(f"Not run: {(mit or {}).get('reason', 'disabled with --no-mitigation')}.")
    else:
        attack = ("not measured (capability only)" if mit["capability_only"] else
                  f"{mit['attack_metric']} ({'lower' if mit['attack_lower_is_better'] else 'higher'} is better for "
                  f"the defender)")
        note = mit["note"][:1].upper() + mit["note"][1:]
        sa, sb = (", ".join(f"{x:g}" for x in mit[k]) for k in ("s_a", "s_b"))
        d.p(f"Seed 003's shrink W·(1 − s·exp(−|W|)) on the A / B factors of `{', '.join(mit['modules'])}` over "
            f"s_A ∈ {{{sa}}} × s_B ∈ {{{sb}}}, "
            f"{mit['n_adapters']} adapters scored ({mit['seconds']:.0f} s). Attack effect: {attack}; general "
            f"capability: {mit['capability_name']}. {note}.")
        rows = [r for r in mit["summary"] if r["group"] == "poisoned"]
        if rows:
            d.table(["s_A", "s_B", "attack (95 % CI)", "Δ attack", "capability (95 % CI)", "Δ capability", "Pareto"],
                    [[f"{r['s_a']:g}", f"{r['s_b']:g}", _fmt_ci(r["attack"], [r["attack_low"], r["attack_high"]]),
                      r["attack_change"], _fmt_ci(r["capability"], [r["capability_low"], r["capability_high"]]),
                      r["capability_change"], "yes" if r["pareto"] else ""] for r in rows])
    for f, cap in figs:
        d.figure(f, cap)
    d.p("Files: `weight_shift.csv`, `weight_tests.csv`, `detector.json`, `mitigation.csv`, `mitigation_summary.csv`, "
        "`plots/analysis_*.png`. Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + ".")
    return d


def write_report(d, out: pathlib.Path, run_dir: Optional[pathlib.Path]) -> list:
    """analysis.md/.html always; the section between markers in the run's report.md/.html when they exist."""
    written = list(d.write(out, stem="analysis"))
    if run_dir is None:
        return written
    md_section = d.markdown().replace(f"# {d.title}", f"## {d.title}", 1).strip()
    html_full = d.html(run_dir)
    body = html_full.split("<body>", 1)[1].rsplit("</body>", 1)[0]
    body = body.replace("<h1>", "<h2>", 1).replace("</h1>", "</h2>", 1)
    for name, section in (("report.md", md_section), ("report.html", body)):
        f = run_dir / name
        if not f.exists():
            continue
        text = f.read_text(encoding="utf-8")
        block = f"{MARK_BEGIN}\n{section}\n{MARK_END}"
        if MARK_BEGIN in text and MARK_END in text:
            pre, rest = text.split(MARK_BEGIN, 1)
            text = pre + block + rest.split(MARK_END, 1)[1]
        elif name == "report.html" and "</body>" in text:
            pre, post = text.rsplit("</body>", 1)
            text = pre + block + "</body>" + post
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        f.write_text(text, encoding="utf-8")
        written.append(f)
    return written
