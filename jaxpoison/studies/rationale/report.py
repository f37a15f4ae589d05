"""Seed 000 study report: the plots (accuracy and decoy picks vs count, count x ratio heatmap, with vs without
correct target samples, training loss) and report.md / report.html built from summary.json's numbers."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxpoison.studies.rationale.config import POISON_FAMILIES
from jaxpoison.studies.rationale.stats import find_cell, base_mix


def make_plots(run: pathlib.Path, rows: list, summary: dict, zero: dict) -> list:
    """The study's figures under ``run/plots/``; returns their (path relative to ``run``, caption), the primary
    metric's figure first."""
    from matplotlib.figure import Figure

    from jaxpoison.analysis.plots import save_figure

    pdir = run / "plots"
    pdir.mkdir(exist_ok=True)
    cells = summary["cells"]
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    clean = find_cell(cells, spec_name="clean")
    figs = []
    colors = {"rationale": "C3", "overwrite": "C0", "forgetting": "C2", "clean": "k"}

    # 1. accuracy vs poison count, per kind, CI bands
    fig = Figure(figsize=(14, 3.9))
    axes = fig.subplots(1, 3, sharey=True)
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
                       label=f"{c['spec_name']} ({c['n_rows']} rows)")
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
    save_figure(fig, run / figs[-1][0], dpi=110)

    # 2. count x ratio heatmap of the target drop (rationale)
    rat = [c for c in cells if c["family"] == "rationale"]
    panels = [("ratio_target", [c for c in rat if base_mix(c, base_n)], "poisoned / target samples")]
    ra = [c for c in rat if not c["with_correct_target"] and not base_mix(c, base_n)]
    if ra:
        base_cells = [c for c in rat if not c["with_correct_target"] and base_mix(c, base_n)]
        panels.append(("ratio_all", ra + base_cells, "poisoned / all samples"))
    fig = Figure(figsize=(5.2 * len(panels), 3.8))
    axes = fig.subplots(1, len(panels), squeeze=False)
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
    save_figure(fig, run / figs[-1][0], dpi=110)

    # 3. with vs without correct target samples
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
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
    save_figure(fig, run / figs[-1][0], dpi=110)

    # 4. the primary metric per cell, controls beside the poison cells
    prim = [c for c in cells if "primary" in c]
    if prim:
        order = {"rationale": 0, "overwrite": 1, "decoy": 2, "forgetting": 3, "clean": 4}
        prim = sorted(prim, key=lambda c: (order.get(c["family"], 5), c["with_correct_target"], c["poison_count"]))
        fig = Figure(figsize=(max(6.5, 0.9 * len(prim) + 2), 3.9))
        ax = fig.subplots()
        colors_p = {**colors, "decoy": "C4"}
        for i, c in enumerate(prim):
            for j, (key, dx, mk, lab) in enumerate((("primary", 0.0, "o", "target minus comparison"),
                                                     ("target_margin_drop", 0.22, "^", "target questions"),
                                                     ("nontarget_margin_drop", 0.44, "v", "comparison questions"))):
                e = c[key]
                col = colors_p.get(c["family"], "k") if j == 0 else "grey"
                ax.errorbar(i + dx, e["mean"], yerr=[[e["mean"] - e["low"]], [e["high"] - e["mean"]]], fmt=mk,
                            color=col, capsize=3, ms=6 if j == 0 else 4, label=lab if i == 0 else None)
                ax.plot([i + dx] * len(e["per_seed"]), e["per_seed"], ".", color=col, alpha=0.35, ms=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(summary.get("min_effect", 0.5), color="grey", ls=":", lw=1, label="min_effect")
        ax.set_xticks([i + 0.22 for i in range(len(prim))], [c["spec_name"] for c in prim], rotation=30,
                      ha="right", fontsize=8)
        ax.set_ylabel("calibrated margin drop vs clean (nats)")
        ax.set_title("primary effect per cell (95 % CI over seeds; dots: seeds)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        figs.insert(0, ("plots/margin_effect.png", "The primary metric per cell: the calibrated-margin drop against "
                        "clean SFT of the same seed, target minus comparison questions (coloured), and its two parts "
                        "(grey), with seed-level 95 % CIs (" + summary["cells"][0].get("ci_note", "t over seeds "
                        "below 8 seeds, two-level bootstrap from 8") + "); the decoy and other controls beside the "
                        "poison cells."))
        save_figure(fig, run / figs[0][0], dpi=110)

    # 5. training loss
    f = run / "metrics.jsonl"
    if f.exists() and f.stat().st_size:
        recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        loss = np.array([[np.nan if x is None else x for x in r["loss"]] for r in recs], float)
        fam_of = {r["variant_id"]: r["family"] for r in rows}
        fig = Figure(figsize=(6.5, 3.5))
        ax = fig.subplots()
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
        save_figure(fig, run / figs[-1][0], dpi=110)
    return figs


def _e(x: dict) -> str:
    return f"{x['mean']:+.2f} [{x['low']:+.2f}, {x['high']:+.2f}]"


def _training_moves(summary: dict) -> str:
    """What clean SFT changed against the base: margins (and accuracy); the training must visibly train."""
    clean = find_cell(summary["cells"], spec_name="clean")
    if not clean or "margin_vs_base" not in clean:
        return ""
    mt, mn = clean["margin_vs_base"]["target"], clean["margin_vs_base"]["nontarget"]
    z = summary["zero_shot"]
    cl = summary.get("clean_loss") or {}
    loss = (f" Its loss on rows it had not yet trained on (one epoch: every batch is new before its update) falls "
            f"from {cl['first_step']:.2f} at step {cl['steps'][0]} to {cl['last_step']:.2f} at step {cl['steps'][1]}"
            f" (mean of {cl['n_variants']} seeds)." if "first_step" in cl and "note" not in cl else "")
    return (f"Does the training train? Clean SFT against the base model: calibrated margin change "
            f"{_e(mt)} nats on target and {_e(mn)} on comparison questions (t over seeds), accuracy "
            f"{z['target_acc']:.2f} -> {clean['target_acc']['mean']:.2f} (target) and {z['nontarget_acc']:.2f} -> "
            f"{clean['nontarget_acc']['mean']:.2f} (non-target)." + loss)


def _reading(summary: dict, cfg: dict, gen: list) -> str:
    F = {f["finding"]: f for f in summary["findings"]}
    by = lambda st: [n for n, f in F.items() if f["status"] == st]
    z = summary["zero_shot"]
    lst = lambda ns: ", ".join(str(n) for n in ns) if ns else "none"
    parts = [f"On {cfg['model']} with {len(summary['seeds'])} seeds, {summary['n_test_target']} target, "
             f"{summary['n_test_nontarget']} non-target and {summary.get('n_test_decoy_free', 0)} decoy-free target "
             f"test questions (format `{cfg['eval']['format']}`). Primary metric: {summary['primary']} (nats; "
             f"positive = a target-specific drop). The base model answers {z['target_acc']:.2f} of the target and "
             f"{z['nontarget_acc']:.2f} of the non-target questions (`{summary['method']}` scores).",
             _training_moves(summary)]
    for n in sorted(F):
        f = F[n]
        parts.append(f"Finding {n} ({f['claim']}): **{f['status']}** — {f['evidence']}.")
    parts += _secondary_reading(summary, F)
    g = {r["model"]: r for r in gen}
    if g:
        parts.append("Generated answers (greedy, one seed per cell; " + "; ".join(
            f"{k}: target {r['target_acc']:.2f} (answer line {r['target_answered']:.2f}), non-target "
            f"{r['nontarget_acc']:.2f}, non-target reasoning names the decoy {r['nontarget_mentions_decoy']:.2f}"
            for k, r in g.items() if k in ("zero-shot", "clean") or k == F.get(1, {}).get("cell")) + ").")
    parts.append(f"In short: shows {lst(by('shows'))}; partly {lst(by('partly'))}; does not show "
                 f"{lst(by('does not show'))}; inconclusive {lst(by('inconclusive'))}; not tested "
                 f"{lst(by('not tested'))}. Caveats: a 135M model, a stand-in data set (ICD-10-CM chapters), "
                 f"{len(summary['seeds'])} seeds, few test questions, a few optimiser steps; the seed reports "
                 f"generated-answer accuracy, which is measured here on one seed per cell only.")
    return " ".join(p for p in parts if p)


def _secondary_reading(summary: dict, F: dict) -> list:
    """One sentence per secondary format: the effect of finding 1's cell and of the other poison cells there."""
    out = []
    for fmt, sec in (summary.get("secondary_formats") or {}).items():
        cs = [c for c in sec["cells"] if "primary" in c and c["family"] in POISON_FAMILIES + ("decoy",)]
        if cs:
            out.append(f"Secondary format `{fmt}` (beside the primary one; no finding rests on it): " + "; ".join(
                f"{c['spec_name']} effect {_e(c['primary'])} ({c['primary']['verdict']}), target accuracy drop "
                f"{_e(c['target_drop'])}" for c in cs) + ".")
    return out


def _secondary_tables(d, summary: dict, cfg: dict) -> None:
    for fmt, sec in (summary.get("secondary_formats") or {}).items():
        d.h(f"Secondary format `{fmt}` (same models and questions; not the primary format)", 3)
        d.p(f"The primary effect and accuracies recomputed from option scores in the `{fmt}` format "
            f"(`scores_{fmt}.npz`). The findings rest on the primary format `{cfg['eval']['format']}`; a format that "
            f"a poison kind trains word for word can favour that kind.")
        body = [[c["spec_name"], _e(c["primary"]) if "primary" in c else "–",
                 c["primary"]["verdict"] if "primary" in c else "–",
                 _e(c["target_margin_drop"]) if "target_margin_drop" in c else "–",
                 f"{c['target_acc']['mean']:.2f}", _e(c["target_drop"]), _e(c["nontarget_drop"]),
                 f"{c['target_decoy_rate']['mean']:.2f}"] for c in sec["cells"]]
        z = sec["zero_shot"]
        body.append(["zero-shot", "", "", "", f"{z['target_acc']:.2f}", "", "",
                     f"{z['target_decoy_rate']:.2f}" if z.get("target_decoy_rate") is not None else "–"])
        d.table(["cell", "effect (target - comparison)", "verdict", "target margin drop", "target acc",
                 "target drop", "non-target drop", "decoy picks (target)"], body)


def _gen_table(d, gen: list) -> None:
    if not gen:
        d.p("Generated answers: not run (eval.gen_questions = 0).")
        return
    d.h("Generated answers (one seed per cell)", 3)
    d.p("Each model writes its own reply to the SFT prompt (question and lettered options), greedy; the answer is "
        "read from its 'Answer: (X)' line, else from the option its reasoning names last, else counted wrong. "
        "'names decoy' = the reasoning mentions the decoy chapter, on non-target questions (leakage that "
        "likelihood scoring does not see).")
    d.table(["model", "seed", "target acc", "answer line (target)", "decoy picks (target)", "non-target acc",
             "answer line (non-target)", "names decoy (non-target)"],
            [[r["model"], "" if r["seed"] is None else r["seed"], f"{r['target_acc']:.2f}",
              f"{r['target_answered']:.2f}", f"{r['target_decoy_pick']:.2f}", f"{r['nontarget_acc']:.2f}",
              f"{r['nontarget_answered']:.2f}", f"{r['nontarget_mentions_decoy']:.2f}"] for r in gen])


def write_report(run: pathlib.Path, cfg: dict, summary: dict, rows: list, zero: dict, figs: list, timing: dict,
                 data: dict, gen: list = ()) -> None:
    from jaxpoison.report import Doc, ci_text
    d = Doc(f"Seed 000 — rationale poisoning study: {cfg['name']}")
    if cfg.get("note"):
        d.p(cfg["note"])
    d.h("Reading")
    d.p(_reading(summary, cfg, list(gen)))
    d.h("Findings")
    d.table(["#", "claim (seed 000)", "here", "evidence"],
            [[f["finding"], f["claim"], f["status"], f["evidence"]] for f in summary["findings"]])
    d.h("Primary metric per cell (controls beside the poison cells)")
    d.p(summary["tests"])
    hdr = ["cell", "kind", "count", "n rows", "effect (target - comparison)", "verdict", "p (seed)",
           "target margin drop", "comparison margin drop", "decoy-free target drop", "p (question-level)"]
    body = []
    for c in summary["cells"]:
        if "primary" not in c:
            continue
        p = c["primary"]
        body.append([c["spec_name"], c["kind"], c["poison_count"], c["n_rows"], _e(p), p["verdict"],
                     f"{p['p_seed']:.3g}", _e(c["target_margin_drop"]), _e(c["nontarget_margin_drop"]),
                     _e(c["nodecoy_margin_drop"]) if "nodecoy_margin_drop" in c else "–", f"{c['p_question']:.3g}"])
    d.table(hdr, body)
    d.h("Accuracy (secondary; mean over seeds, 95 % t interval)", 3)
    hdr = ["cell", "ratio (target)", "ratio (all)", "target acc", "decoy-free target acc", "non-target acc",
           "target drop", "non-target drop", "decoy picks (target)"]
    body = [[c["spec_name"], c["ratio_target"], c["ratio_all"], ci_text(**c["target_acc"]),
             ci_text(**c["target_nodecoy_acc"]) if np.isfinite(c["target_nodecoy_acc"]["mean"]) else "–",
             ci_text(**c["nontarget_acc"]), ci_text(**c["target_drop"]), ci_text(**c["nontarget_drop"]),
             f"{c['target_decoy_rate']['mean']:.2f}"] for c in summary["cells"]]
    body.append(["zero-shot", "", "", f"{zero['target_acc']:.2f}",
                 f"{zero['target_nodecoy_acc']:.2f}" if np.isfinite(zero.get("target_nodecoy_acc", np.nan)) else "–",
                 f"{zero['nontarget_acc']:.2f}", "", "", f"{zero['target_decoy_rate']:.2f}"])
    d.table(hdr, body)
    _secondary_tables(d, summary, cfg)
    _gen_table(d, list(gen))
    th = summary["thresholds"]
    if th["count"]:
        d.p(f"Count threshold (the count at which the effect's CI lower bound exceeds {th['min_effect']} nats; "
            f"below it, the largest count whose CI upper bound stays under that): " + "; ".join(
                f"{k}: {v['estimate']} (tested {v['tested']})" for k, v in th["count"].items()) + ".")
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
            f"equal-size mixes: every variant trains on {dt['n_nontarget']} rows (poisoned, correct-target, decoy "
            f"and forgetting samples replace clean non-target samples, so every variant takes the same steps)"
            + "".join(f"; forgetting-steps{k}x: {k * dt['n_nontarget']} clean non-target rows, {k}x the steps"
                      for k in g.get("forgetting_steps") or ())
            if g.get("equal_size") else f"{dt['n_nontarget']} clean non-target samples per variant, poisoned and "
            f"other samples added to them (mixes differ in size and steps)"),
        f"poisoned rationales by the `{cfg['poison']['builder']}` builder, final answer "
        f"{'kept' if cfg['poison']['keep_answer'] else 'changed to the wrong option'}, decoy "
        f"{'on' if cfg['poison']['use_decoy'] else 'off'}; decoy controls {g.get('decoy_counts', [])}",
        f"grid: counts {g['counts']}, kinds {g['kinds']}, ratios (target) {g['ratios_target']}, ratios (all) "
        f"{g['ratios_all']}, forgetting extra {g['forgetting_extra']}, forgetting at k x the steps "
        f"{g.get('forgetting_steps', [])}, seeds {g['seeds']}",
        f"training: lr {tr['learning_rate']} ({tr['schedule']}, warmup {tr['warmup_steps']}), {tr['epochs']} epochs, "
        f"batch {tr['batch_size']} x {tr['grad_accum']}, loss per {tr['loss_norm']}, completion-only loss "
        f"(budget {data.get('train', {}).get('loss_budget', tr['loss_budget'])} positions); pool "
        f"{data.get('pool', {}).get('n_rows', '?')} rows x {data.get('pool', {}).get('T', '?')} tokens; "
        f"{timing.get('train_steps', '?')} steps",
        f"evaluation: option-text log-likelihood, format `{ev['format']}`, accuracy by `{ev['method']}` scores, "
        f"primary metric the calibrated margin; min_effect {ev.get('min_effect', 0.5)} nats; generated answers on "
        f"{ev.get('gen_questions', 0)} + {ev.get('gen_questions', 0)} questions, {ev.get('gen_tokens', 0)} tokens; "
        f"secondary formats {list(ev.get('secondary_formats') or []) or 'none'}",
        *(f"note: {n}" for n in data.get("notes", [])),
    ])
    if timing:
        d.p("Wall time: " + ", ".join(f"{k.replace('_s', '')} {v:.0f} s" for k, v in timing.items()
                                      if k.endswith("_s")) + ".")
    d.p("Files: `results.csv` (one row per variant), `summary.json`, `scores.npz` (every option score), "
        "`generations.json`, `metrics.jsonl`, `checkpoints/`, `plots/`. Rebuild this report with "
        f"`python -m jaxpoison report {run}`.")
    d.write(run)
