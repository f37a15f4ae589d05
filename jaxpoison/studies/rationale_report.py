"""Seed 000 study report: the plots (accuracy and decoy picks vs count, count x ratio heatmap, with vs without
correct target samples, training loss) and report.md / report.html built from summary.json's numbers."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxpoison.studies.rationale_config import POISON_FAMILIES
from jaxpoison.studies.rationale_stats import _cell, base_mix


def make_plots(run: pathlib.Path, rows: list, summary: dict, zero: dict) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = run / "plots"
    pdir.mkdir(exist_ok=True)
    cells = summary["cells"]
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    clean = _cell(cells, spec_name="clean")
    figs = []
    colors = {"rationale": "C3", "overwrite": "C0", "forgetting": "C2", "clean": "k"}

    # 1. accuracy vs poison count, per kind, CI bands
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9), sharey=True)
    ticks = sorted({0} | {c["poison_count"] for c in cells if c["family"] in POISON_FAMILIES})
    for ax, metric, title in ((axes[0], "target_acc", "target subject accuracy"),
                              (axes[1], "nontarget_acc", "non-target accuracy"),
                              (axes[2], "target_decoy_rate", "target questions: decoy picked")):
        for fam in POISON_FAMILIES:
            cs = sorted((c for c in cells if c["family"] == fam and not c["with_correct_target"]
                         and base_mix(c, base_n)), key=lambda c: c["poison_count"])
            if not cs:
                continue
            pts = ([clean] if clean else []) + cs
            x = [c["poison_count"] for c in pts]
            m = [c[metric]["mean"] for c in pts]
            ax.plot(x, m, "o-", color=colors[fam], label=fam)
            ax.fill_between(x, [c[metric]["low"] for c in pts], [c[metric]["high"] for c in pts],
                            color=colors[fam], alpha=0.18)
        for c in (c for c in cells if c["family"] == "forgetting"):
            ax.axhline(c[metric]["mean"], color=colors["forgetting"], ls="--", lw=1,
                       label=f"forgetting (+{c['forgetting_extra']})")
        if zero.get(metric) is not None and np.isfinite(zero[metric]):
            ax.axhline(zero[metric], color="grey", ls=":", lw=1, label="zero-shot")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlim(-0.3, max(ticks) * 1.25 if max(ticks) > 0 else 1)   # keep the end markers inside the axes
        ax.minorticks_off()
        ax.set_xlabel("poisoned target samples (0 = clean SFT)")
        ax.set_title(f"{title} ({summary['method']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("rate (mean over seeds, 95 % CI)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    figs.append(("plots/accuracy_vs_count.png", "Target and non-target accuracy, and how often the poisoned "
                 "(decoy) option is picked on target questions, vs poison count per kind (bands: 95 % bootstrap CI "
                 "over seeds; count 0 is clean SFT)."))
    fig.savefig(run / figs[-1][0], dpi=110)
    plt.close(fig)

    # 2. count x ratio heatmap of the target drop (rationale)
    rat = [c for c in cells if c["family"] == "rationale"]
    panels = [("ratio_target", [c for c in rat if base_mix(c, base_n)], "poisoned / target samples")]
    ra = [c for c in rat if not c["with_correct_target"] and not base_mix(c, base_n)]
    if ra:
        base_cells = [c for c in rat if not c["with_correct_target"] and base_mix(c, base_n)]
        panels.append(("ratio_all", ra + base_cells, "poisoned / all samples"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (key, cs, label) in zip(axes[0], panels):
        counts = sorted({c["poison_count"] for c in cs})
        ratios = sorted({c[key] for c in cs})
        grid = np.full((len(ratios), len(counts)), np.nan)
        sig = np.zeros_like(grid, bool)
        for c in cs:
            i, j = ratios.index(c[key]), counts.index(c["poison_count"])
            grid[i, j] = c["target_drop"]["mean"]
            sig[i, j] = bool(c.get("significant"))
        if not cs:
            ax.text(0.5, 0.5, "no rationale cells", ha="center", va="center")
            continue
        vmax = max(0.05, np.nanmax(np.abs(grid)))
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower", aspect="auto")
        for i in range(len(ratios)):
            for j in range(len(counts)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:+.2f}{'*' if sig[i, j] else ''}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_yticks(range(len(ratios)), [f"{r:.2g}" for r in ratios])
        ax.set_xlabel("poisoned target samples")
        ax.set_ylabel(label)
        ax.set_title("target drop vs clean (* significant)")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    figs.append(("plots/heatmap_count_ratio.png", "Target-accuracy drop of rationale poisoning vs clean SFT by "
                 "poison count and ratio (mean over seeds; * = significant target-specific drop)."))
    fig.savefig(run / figs[-1][0], dpi=110)
    plt.close(fig)

    # 3. with vs without correct target samples
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    groups = []
    for c in sorted(rat, key=lambda c: (c["poison_count"], -c["ratio_target"])):
        if not base_mix(c, base_n):
            continue
        groups.append(c)
    by_count: dict = {}
    for c in groups:
        by_count.setdefault(c["poison_count"], []).append(c)
    by_count = {k: v for k, v in by_count.items() if any(x["with_correct_target"] for x in v)}
    if not by_count:
        ax.text(0.5, 0.5, "no variants with correct target samples in this grid\n(set grid.ratios_target)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        xt, xl, x = [], [], 0
        for count, cs in sorted(by_count.items()):
            for c in cs:
                d = c["target_drop"]
                ax.bar(x, d["mean"], color="C3" if not c["with_correct_target"] else "C1", alpha=0.85)
                ax.errorbar(x, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], color="k",
                            capsize=3)
                xt.append(x)
                xl.append(f"n={count}\n" + ("no correct" if not c["with_correct_target"] else
                                            f"+{c['n_correct_target']} correct"))
                x += 1
            x += 0.6
        ax.set_xticks(xt, xl, fontsize=8)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("target drop vs clean (95 % CI)")
        ax.set_title("rationale poisoning with vs without correct target samples")
    fig.tight_layout()
    figs.append(("plots/correct_target.png", "Target drop of rationale poisoning with and without correct "
                 "target-subject samples in the SFT set."))
    fig.savefig(run / figs[-1][0], dpi=110)
    plt.close(fig)

    # 4. training loss
    f = run / "metrics.jsonl"
    if f.exists() and f.stat().st_size:
        recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        loss = np.array([[np.nan if x is None else x for x in r["loss"]] for r in recs], float)
        fam_of = {r["variant_id"]: r["family"] for r in rows}
        fig, ax = plt.subplots(figsize=(6.5, 3.5))
        seen = set()
        for v in range(loss.shape[1]):
            fam = fam_of.get(v, "clean")
            ax.plot([r["step"] for r in recs], loss[:, v], color=colors.get(fam, "k"), alpha=0.5, lw=1,
                    label=fam if fam not in seen else None)
            seen.add(fam)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (per completion token)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        figs.append(("plots/loss.png", "Training loss of every variant."))
        fig.savefig(run / figs[-1][0], dpi=110)
        plt.close(fig)
    return figs


def _reading(summary: dict, cfg: dict) -> str:
    F = {f["finding"]: f for f in summary["findings"]}
    shows = [n for n, f in F.items() if f["status"] == "shows"]
    partly = [n for n, f in F.items() if f["status"] == "partly"]
    notshow = [n for n, f in F.items() if f["status"] == "does not show"]
    inconcl = [n for n, f in F.items() if f["status"] == "inconclusive"]
    untested = [n for n, f in F.items() if f["status"] == "not tested"]
    z = summary["zero_shot"]
    clean = _cell(summary["cells"], spec_name="clean")
    lst = lambda ns: ", ".join(str(n) for n in ns) if ns else "none"
    parts = [f"On {cfg['model']} with {len(summary['seeds'])} seeds, {summary['n_test_target']} target and "
             f"{summary['n_test_nontarget']} non-target test questions scored by option log-likelihood "
             f"({summary['method']}), the base model answers {z['target_acc']:.2f} of the target and "
             f"{z['nontarget_acc']:.2f} of the non-target questions, clean SFT "
             f"{clean['target_acc']['mean']:.2f} and {clean['nontarget_acc']['mean']:.2f}." if clean else ""]
    for n in sorted(F):
        f = F[n]
        parts.append(f"Finding {n} ({f['claim']}): **{f['status']}** — {f['evidence']}.")
        if n == 1 and f.get("cell"):
            c = _cell(summary["cells"], spec_name=f["cell"])
            o = c.get("other_method") if c else None
            if o:
                parts.append(f"Scored `{o['method']}` instead, the same cell's target drop is "
                             f"{o['target_drop']['mean']:+.3f} [{o['target_drop']['low']:+.3f}, "
                             f"{o['target_drop']['high']:+.3f}] (p={o['p_question']:.3g}) and its non-target drop "
                             f"{o['nontarget_drop']['mean']:+.3f}.")
    parts.append(f"In short: shows {lst(shows)}; partly {lst(partly)}; does not show {lst(notshow)}; inconclusive "
                 f"{lst(inconcl)}; not tested {lst(untested)}. Caveats: a small model, a stand-in data set, few seeds "
                 f"and few test questions; "
                 f"option-likelihood accuracy is not the generated-answer accuracy the seed reports.")
    return " ".join(p for p in parts if p)


def write_report(run: pathlib.Path, cfg: dict, summary: dict, rows: list, zero: dict, figs: list, timing: dict,
                 data: dict) -> None:
    from jaxpoison.studies.report_utils import Doc, ci_text
    d = Doc(f"Seed 000 — rationale poisoning study: {cfg['name']}")
    if cfg.get("note"):
        d.p(cfg["note"])
    d.h("Reading")
    d.p(_reading(summary, cfg))
    d.h("Findings")
    d.table(["#", "claim (seed 000)", "here", "evidence"],
            [[f["finding"], f["claim"], f["status"], f["evidence"]] for f in summary["findings"]])
    d.h("Grid cells (mean over seeds, 95 % CI)")
    hdr = ["cell", "kind", "count", "ratio (target)", "ratio (all)", "n rows", "target acc", "non-target acc",
           "target drop", "non-target drop", "decoy picks", "p (question)", "p (seed)"]
    body = []
    for c in summary["cells"]:
        body.append([c["spec_name"], c["kind"], c["poison_count"], c["ratio_target"], c["ratio_all"], c["n_rows"],
                     ci_text(**c["target_acc"]), ci_text(**c["nontarget_acc"]), ci_text(**c["target_drop"]),
                     ci_text(**c["nontarget_drop"]), f"{c['target_decoy_rate']['mean']:.2f}",
                     f"{c['p_question']:.3g}" if "p_question" in c else "–",
                     f"{c['p_seed']:.3g}" if "p_seed" in c else "–"])
    body.append(["zero-shot", "base", "", "", "", "", f"{zero['target_acc']:.2f}", f"{zero['nontarget_acc']:.2f}",
                 "", "", f"{zero['target_decoy_rate']:.2f}", "", ""])
    d.table(hdr, body)
    d.p(summary["tests"])
    om = summary["other_method"]
    d.h(f"The same drops scored `{om}`", 3)
    how = "minus its log-likelihood after a neutral prefix (its prior)" if om == "calibrated" else "uncalibrated"
    d.p(f"Each option's score {how}: "
        "a poison that only made the decoy option likelier everywhere would leave no target-specific drop here.")
    d.table(["cell", "target drop", "non-target drop", "p (question)"],
            [[c["spec_name"], ci_text(**c["other_method"]["target_drop"]),
              ci_text(**c["other_method"]["nontarget_drop"]), f"{c['other_method']['p_question']:.3g}"]
             for c in summary["cells"] if "other_method" in c])
    th = summary["thresholds"]
    if th["count"]:
        d.p("Smallest significant count: " + "; ".join(f"{k}: {v['smallest']} (tested {v['tested']})"
                                                       for k, v in th["count"].items()) + ".")
    for fig, cap in figs:
        d.figure(fig, cap)
    d.h("Setup")
    tr, lo, g, ev = cfg["train"], cfg["lora"], cfg["grid"], cfg["eval"]
    dt = cfg["data"]
    d.bullets([
        f"model `{cfg['model']}` ({cfg['dtype']}); LoRA r={lo['r']}, alpha={lo['alpha']}, targets "
        f"{', '.join(lo['targets'])}, dropout {lo['dropout']}",
        f"data `{dt['source']}`, target subject `{dt['target']}` (by {dt['target_by']}); "
        f"{data.get('n_target_train', '?')} target / {data.get('n_nontarget_train', '?')} non-target training "
        f"examples available; " + (
            f"equal-size mixes: every variant trains on {dt['n_nontarget']} rows (poisoned, correct-target and "
            f"forgetting samples replace clean non-target samples, so every variant takes the same steps)"
            if g.get("equal_size") else f"{dt['n_nontarget']} clean non-target samples per variant, poisoned and "
            f"other samples added to them (mixes differ in size and steps)"),
        f"poisoned rationales by the `{cfg['poison']['builder']}` builder, final answer "
        f"{'kept' if cfg['poison']['keep_answer'] else 'changed to the wrong option'}, decoy "
        f"{'on' if cfg['poison']['use_decoy'] else 'off'}",
        f"grid: counts {g['counts']}, kinds {g['kinds']}, ratios (target) {g['ratios_target']}, ratios (all) "
        f"{g['ratios_all']}, forgetting extra {g['forgetting_extra']}, seeds {g['seeds']}",
        f"training: lr {tr['learning_rate']} ({tr['schedule']}, warmup {tr['warmup_steps']}), {tr['epochs']} epochs, "
        f"batch {tr['batch_size']} x {tr['grad_accum']}, loss per {tr['loss_norm']}, completion-only loss "
        f"(budget {data.get('train', {}).get('loss_budget', tr['loss_budget'])} positions); pool "
        f"{data.get('pool', {}).get('n_rows', '?')} rows x {data.get('pool', {}).get('T', '?')} tokens; "
        f"{timing.get('train_steps', '?')} steps",
        f"evaluation: option-text log-likelihood, format `{ev['format']}`, primary score `{ev['method']}` "
        f"(`sum`, `mean` and `calibrated` accuracies are all in results.csv)",
        *(f"note: {n}" for n in data.get("notes", [])),
    ])
    if timing:
        d.p("Wall time: " + ", ".join(f"{k.replace('_s', '')} {v:.0f} s" for k, v in timing.items()
                                      if k.endswith("_s")) + ".")
    d.p("Files: `results.csv` (one row per variant), `summary.json`, `scores.npz` (every option score), "
        "`metrics.jsonl`, `checkpoints/`, `plots/`. Rebuild this report with `python -m jaxpoison report "
        f"{run}`.")
    d.write(run)
