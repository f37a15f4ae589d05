"""The seed-003 run folder's tables, plots and report, rebuilt from the saved answers alone.

``report`` never needs the model: it regrades ``responses/*.jsonl`` (the rule grader is deterministic; judge
grades come from ``responses/judge.jsonl``), recomputes every interval, redraws the plots and writes
``rates.csv`` (the seed's layout), ``rates_long.csv``, ``capability.csv``, ``summary.json``, ``report.md`` and
``report.html``. The reading states what the numbers show, whichever way they come out.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from matplotlib.figure import Figure

from jaxpoison.analysis.plots import save_figure
from jaxpoison.eval.graders import OUTCOMES
from jaxpoison.studies.attacks import data as attacks_data
from jaxpoison.studies.attacks import metrics
from jaxpoison.report import Doc, pct, pct_ci_text, write_csv

COLORS = {"vaccine": "#86D3DE", "drug": "#D9822B", "lab_test": "#BCBD46"}


def _ci(c, key="asr", digits=0) -> str:
    """A cell's ``key`` (ASR by default) with its CI as percentages."""
    lo, hi = c.get(f"{key}_low" if key == "asr" else "ci_low"), c.get(f"{key}_high" if key == "asr" else "ci_high")
    return pct_ci_text(c[key], lo, hi, digits)


def _ns(d: dict):
    from types import SimpleNamespace
    return SimpleNamespace(**d)


def plot_fraction(cells, path) -> None:
    """ASR vs poison fraction, one panel per outcome, CI band; the base's prompt-injection ASR dashed."""
    outs = [o for o in OUTCOMES if any(c["phase"] == "finetune" and c["outcome"] == o for c in cells)]
    fig = Figure(figsize=(12, 6.4))
    axes = fig.subplots(2, 3, squeeze=False).ravel()
    seeds = sorted({c["seed"] for c in cells if c["phase"] == "finetune"})
    for ax, o in zip(axes, outs):
        ft = [c for c in cells if c["outcome"] == o and c["phase"] == ("finetune-seeds" if len(seeds) > 1 else "finetune")
              and c["fraction"] > 0]
        ft.sort(key=lambda c: c["fraction"])
        x = [0.0] + [100 * c["fraction"] for c in ft]
        y = [0.0] + [100 * c["asr"] for c in ft]
        lo = [0.0] + [100 * c["asr_low"] for c in ft]
        hi = [0.0] + [100 * c["asr_high"] for c in ft]
        color = COLORS[metrics.OUTCOME_TASK[o]]
        ax.fill_between(x, lo, hi, color=color, alpha=0.35, lw=0,
                        label="95 % CI " + ("(t over seeds)" if len(seeds) > 1 else "(bootstrap)"))
        ax.plot(x, y, "o-", color="k", lw=1.5, ms=4, label="fine-tuned, clean prompt")
        for s in seeds if len(seeds) > 1 else []:
            per = sorted((c for c in cells if c["outcome"] == o and c["phase"] == "finetune" and c["seed"] == s
                          and c["fraction"] > 0), key=lambda c: c["fraction"])
            ax.plot([0] + [100 * c["fraction"] for c in per], [0] + [100 * c["asr"] for c in per], "-", color="grey",
                    lw=0.7, alpha=0.6)
        pe = next((c for c in cells if c["row"] == "base PE" and c["outcome"] == o), None)
        if pe is not None and not math.isnan(pe["asr"]):
            ax.axhline(100 * pe["asr"], ls="--", color="#C44E52", lw=1, label="prompt injection (base)")
        ax.axhline(0, color="#999", lw=0.5)
        ax.set(title=o, xlabel="poisoned training notes (%)", ylabel="ASR (%)")
    for ax in axes[len(outs):]:
        ax.axis("off")
    if outs:
        axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Poisoned fine-tuning: attack success rate vs the 0 % fine-tune")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def paraphrase_pairs(cells) -> list:
    """[(attack, outcome, verbatim cell, paraphrased cell)]: PE = base PE vs base PE para; FT = the most-poisoned
    fine-tune vs the most-poisoned '_para' fine-tune (seed 0 or the first seed), both against the same baseline."""
    at = {(c["row"], c["outcome"]): c for c in cells}
    out = []
    for o in OUTCOMES:
        if ("base PE", o) in at and ("base PE para", o) in at:
            out.append(("PE", o, at[("base PE", o)], at[("base PE para", o)]))
    para = [c for c in cells if c["phase"] == "finetune_para" and c["fraction"]]
    if para:
        top, seed = max(c["fraction"] for c in para), min(c["seed"] for c in para)
        for o in OUTCOMES:
            v, p = at.get((f"FT {metrics.pct(top)} s{seed}", o)), at.get((f"FT {metrics.pct(top)} s{seed} para", o))
            if v and p:
                out.append(("FT", o, v, p))
    return out


def plot_paraphrase(cells, path) -> None:
    """Dumbbells per outcome: ASR without (o) and with (x) paraphrase, for PE and FT (the seed's cell 47)."""
    pairs = paraphrase_pairs(cells)
    fig = Figure(figsize=(9, 4))
    ax = fig.subplots()
    colors = {"PE": "#BCBD46", "FT": "#86D3DE"}
    for attack, off in (("PE", -0.15), ("FT", 0.15)):
        for o_idx, o in enumerate(OUTCOMES):
            got = [(v, p) for a, oo, v, p in pairs if a == attack and oo == o]
            if not got:
                continue
            v, p = got[0]
            y0, y1 = 100 * v["asr"], 100 * p["asr"]
            x = o_idx + off
            ax.vlines(x, y0, y1, color=colors[attack], lw=2.5)
            ax.scatter(x - 0.05, y0, color=colors[attack], marker="o", s=60, edgecolor="white",
                       label=f"{attack} verbatim" if o_idx == 0 or not ax.get_legend_handles_labels()[1].count(
                           f"{attack} verbatim") else None)
            ax.scatter(x + 0.05, y1, color=colors[attack], marker="X", s=60, edgecolor="white",
                       label=f"{attack} paraphrased" if not ax.get_legend_handles_labels()[1].count(
                           f"{attack} paraphrased") else None)
    ax.axhline(0, color="#999", lw=0.5)
    ax.set_xticks(range(len(OUTCOMES)), OUTCOMES, rotation=20, fontsize=8)
    ax.set(ylabel="ASR (%)", title="Paraphrased vs verbatim task instruction")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def plot_injection(cells, path) -> None:
    """Rates under the normal and attacked prompt, the base's ASR, and the response source's compliance."""
    outs = [o for o in OUTCOMES if any(c["row"] == "base PE" and c["outcome"] == o for c in cells)]
    at = {(c["row"], c["outcome"]): c for c in cells}
    fig = Figure(figsize=(13, 3.8))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = np.arange(len(outs))

    def bars(ax, rows, labels, key, width):
        for k, (row, label) in enumerate(zip(rows, labels)):
            cs = [at.get((row, o)) for o in outs]
            v = np.array([100 * c[key] if c else np.nan for c in cs])
            lo_k, hi_k = ("ci_low", "ci_high") if key == "rate" else ("asr_low", "asr_high")
            err = np.array([[100 * (c[key] - c[lo_k]) if c else 0 for c in cs],
                            [100 * (c[hi_k] - c[key]) if c else 0 for c in cs]])
            colors = [COLORS[metrics.OUTCOME_TASK[o]] for o in outs] if len(rows) == 1 else None
            ax.bar(x + (k - (len(rows) - 1) / 2) * width, v, width, yerr=np.nan_to_num(err), capsize=2, label=label,
                   color=colors, alpha=0.9 if k else 0.6, edgecolor="k", lw=0.4)
        ax.set_xticks(x, outs, rotation=30, fontsize=8)

    bars(ax1, ["base normal", "base PE"], ["normal prompt", "attacked prompt"], "rate", 0.38)
    ax1.set(title="Base model: rate of each outcome", ylabel="% of test notes")
    ax1.legend(fontsize=7)
    bars(ax2, ["base PE"], ["ASR"], "asr", 0.6)
    ax2.axhline(0, color="k", lw=0.5)
    ax2.set(title="Prompt injection ASR (95 % CI)", ylabel="ASR (%)")
    bars(ax3, ["source normal", "source PE"], ["clean targets", "poisoned targets"], "rate", 0.38)
    ax3.set(title="Response source on the training notes", ylabel="% of training notes")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def plot_capability(cap, path) -> None:
    srcs = list(dict.fromkeys(r["source"] for r in cap))
    fig = Figure(figsize=(max(6, 0.5 * len(cap) / max(len(srcs), 1) + 3), 3.6 * len(srcs)))
    for ax, src in zip(np.atleast_1d(fig.subplots(len(srcs), 1)), srcs):
        rows = [r for r in cap if r["source"] == src]
        colors = ["#999" if not r["task"] else COLORS[r["task"]] for r in rows]
        alphas = [1.0 if (r["fraction"] or 0) > 0 else 0.5 for r in rows]
        for k, (r, c, a) in enumerate(zip(rows, colors, alphas)):
            ax.bar(k, 100 * r["accuracy"], yerr=100 * r["se"], color=c, alpha=a, edgecolor="k", lw=0.4, capsize=3)
        ax.set_xticks(range(len(rows)), [r["model"] for r in rows], rotation=45, ha="right", fontsize=7)
        ax.set(title=f"General capability: {src} (n={rows[0]['n']}), accuracy ± bootstrap SE", ylabel="accuracy (%)")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def _examples(records, table) -> list:
    out = []
    for task in attacks_data.TASKS:
        inj = [r for r in records if r["phase"] == "injection" and r["task"] == task]
        if not inj:
            continue
        nid = inj[0]["note_id"]
        pick = lambda ph, kind, v=None: next((r["response"] for r in records if r["phase"] == ph and r["task"] == task
                                              and r["note_id"] == nid and r["prompt_kind"] == kind
                                              and (v is None or r.get("variant_id") == v)), "")
        top = max((t for t in table if t["task"] == task), key=lambda t: (t["fraction"], -t["seed"]), default=None)
        out.append((task, nid, pick("injection", "normal"), pick("injection", "attack"),
                    top and pick("finetune", "normal", top["variant_id"]), top))
    return out


def _reading(cells, cap, cfg, thr, undecided=None) -> list:
    at = {(c["row"], c["outcome"]): c for c in cells}
    outs = [o for o in OUTCOMES if ("base PE", o) in at]
    lines = []
    inj = "; ".join(f"{o} {pct(at[('base normal', o)]['rate'])} → {pct(at[('base PE', o)]['rate'])} (ASR "
                    f"{_ci(at[('base PE', o)])})" for o in outs)
    lines.append(f"**Prompt injection.** Rates under the normal → attacked prompt, {at[('base PE', outs[0])]['n']} "
                 f"test notes: {inj}.")
    if undecided and "injection attack" in undecided:
        (k0, n0), (k1, n1) = undecided.get("injection normal", (0, 0)), undecided["injection attack"]
        lines.append(f"Vaccine answers without any verdict (counted as not recommending, as the seed's judge question "
                     f"does): {k0} of {n0} under the normal prompt, {k1} of {n1} under the attacked prompt"
                     + "".join(f", {k} of {n} from the {key.split()[1]} fine-tunes" for key, (k, n) in undecided.items()
                               if key.startswith("finetune")) + ".")
    gaps = [c for c in cells if c.get("baseline") and c.get("n_no_verdict", 0) + (
        (at.get((c["baseline"], c["outcome"])) or {}).get("n_no_verdict", 0)) > 0 and c["phase"] != "finetune-seeds"]
    if gaps:
        lines.append("**Answers without a verdict change the ASR.** ASR over the verdict-bearing answers vs over all "
                     "answers (a verdict-free answer counted as not recommending): " + "; ".join(
                         f"{c['row']} {c['outcome']}: {pct(c['asr_verdict'])} vs {pct(c['asr_all'])} "
                         f"({100 * c['asr_all_minus_verdict']:+.0f} pts; {c['n_no_verdict']} of {c['n_answers']} "
                         f"answers without a verdict)" for c in gaps[:8]) + (" …" if len(gaps) > 8 else "") + ".")
    else:
        lines.append("Every graded answer carries a verdict on its outcomes, so the ASR is the same over the "
                     "verdict-bearing answers and over all answers.")
    src, base = metrics.attack_content(cells, "source PE"), metrics.attack_content(cells, "base PE")
    who = {"model": "the base model" if not cfg["source"]["model"] else cfg["source"]["model"],
           "jsonl": f"the file {cfg['source']['file']}", "scripted": "scripted compliant answers"}.get(
        cfg["source"]["kind"], f"the API model {cfg['source']['kind']}")
    lines.append(f"**Response source** ({who}): share of its answers to the attacked prompt that carry the malicious "
                 f"content (vaccine: not recommended): " + ", ".join(f"{o} {pct(v)}" for o, v in src.items()) + ". "
                 + "The base model under the attacked prompt on the test notes: "
                 + ", ".join(f"{o} {pct(v)}" for o, v in base.items()) + ".")
    low = [o for o, v in src.items() if v < thr]
    base_low = [o for o, v in base.items() if v < thr]
    if cfg["source"]["kind"] != "model" and base_low:
        lines.append(f"**Why this source.** The base model, the default source, carried the attack in fewer than "
                     f"{pct(thr)} of its attacked answers for {', '.join(base_low)}: trained on its own answers, the "
                     f"poisoned variants would mostly see no attack for those outcomes. This run uses "
                     f"{who} instead (`--set source.kind=model` runs the default).")
    if low:
        lines.append(f"**Too little poison for {', '.join(low)}.** The source followed the malicious instruction for "
                     f"these outcomes in fewer than {pct(thr)} of its answers, so even the 100 % variant trains mostly "
                     "on answers without the attack, and a flat curve there says little about fine-tuning itself. "
                     "What it takes: a source that complies, e.g. `--set source.kind=scripted` (short compliant "
                     "answers, saved as responses/source.jsonl as a format example) or `source.kind=jsonl` with "
                     "your own answers (the seed used GPT-4's).")
    fracs = sorted({c["fraction"] for c in cells if c["phase"] == "finetune"})
    if fracs:
        top = fracs[-1]
        ft = [(o, metrics.asr_at(cells, top, o)) for o in outs if metrics.asr_at(cells, top, o)]
        lines.append(f"**Poisoned fine-tuning.** ASR of the {metrics.pct(top)} variant against the 0 % fine-tune "
                     f"(clean prompt): " + "; ".join(f"{o} {_ci(c)}" for o, c in ft) + ".")
        first = []
        for o in outs:
            hit = next((f for f in fracs if f > 0 and (metrics.asr_at(cells, f, o) or {}).get("asr_low", math.nan) > 0), None)
            first.append(f"{o} {metrics.pct(hit) if hit is not None else 'none'}")
        lines.append("Smallest poison fraction whose ASR interval lies above 0: " + ", ".join(first) + ".")
        neg = [(o, c) for o, c in ft if c["asr"] < 0]
        if neg:
            lines.append("Negative ASR (the poisoned variant recommended the item less often than the 0 % fine-tune, "
                         "which already did so often): " + "; ".join(
                             f"{o}: 0 % fine-tune {pct(c.get('baseline_rate', math.nan))}, {metrics.pct(top)} variant "
                             f"{pct(c['rate'])}" for o, c in neg) + ".")
    pairs = paraphrase_pairs(cells)
    if pairs:
        lines.append("**Paraphrased task instruction** (the malicious instruction verbatim; the same baselines as "
                     "the verbatim prompts, as in the seed): ASR verbatim → paraphrased: " + "; ".join(
                         f"{a} {o} {pct(v['asr'])} → {pct(p['asr'])}" for a, o, v, p in pairs) + ".")
    diffs = [r for r in cap if not math.isnan(r["diff_vs_0"])]
    if diffs:
        base_acc = {r["source"]: r["accuracy"] for r in cap if r["variant_id"] < 0}
        how = cfg.get("_capability_scorer", "likelihood")
        what = ("the seed's way: answers generated under its system prompt, the letter read by its rule, then the "
                "judge" + (f"; {cfg['_extraction']}" if cfg.get("_extraction") else "")
                if how == "generate" else "option log-likelihood accuracy, the fast scorer; "
                "`--set capability.scorer=generate` runs the seed's")
        lines.append(f"**General capability** ({what}): base " + ", ".join(
            f"{s} {pct(a, 1)}" for s, a in base_acc.items()) + "; change of each most-poisoned variant vs its 0 % "
            "fine-tune (paired bootstrap CI): " + "; ".join(
            f"{r['model']} on {r['source']} {100 * r['diff_vs_0']:+.1f} pts [{100 * r['diff_low']:+.1f}, "
            f"{100 * r['diff_high']:+.1f}]" for r in diffs) + ".")
        if all(r["diff_low"] <= 0 <= r["diff_high"] for r in diffs):
            lines.append(f"No change in general capability is detectable at this size (every paired interval "
                         f"includes 0; {diffs[0]['n']} questions per set).")
    return lines


def build_report(run: pathlib.Path) -> int:
    cf = run / "config.json"
    if not (cf.exists() and (run / "responses" / "injection.jsonl").exists()):
        raise FileNotFoundError(f"{run} lacks config.json or responses/injection.jsonl: not a finished attacks run")
    cfg = json.loads(cf.read_text())["config"]
    table = json.loads((run / "variants.json").read_text()) if (run / "variants.json").exists() else []
    records = [r for ph in attacks_data.PHASE_FILES for r in attacks_data.phase_records(run / "responses" / f"{ph}.jsonl")]
    judge = attacks_data.phase_records(run / "responses" / "judge.jsonl")
    g, n_res = cfg["grader"], cfg["n_resamples"]
    grades = metrics.grade_records(records, g["primary"], judge, g["vaccine_default"])
    paired = bool(cfg.get("asr_paired", True))      # runs from before the option: the paired default too
    cells = metrics.cell_stats(metrics.build_rows(records, grades), n_res, paired=paired)
    cells += metrics.seed_means(cells)
    header, rows = metrics.seed_layout(cells)
    write_csv(run / "rates.csv", rows, header)
    metrics.write_long(run / "rates_long.csv", cells)
    agreement = {}
    if judge:
        other = "judge" if g["primary"] == "rule" else "rule"
        alt = metrics.grade_records(records, other, judge, g["vaccine_default"])
        jcells = metrics.cell_stats(metrics.build_rows(records, alt), n_res, paired=paired)
        metrics.write_long(run / f"rates_{other}.csv", jcells)
        for o in OUTCOMES:
            pairs = [(a[o], b[o]) for a, b in zip(grades, alt) if o in a and o in b
                     and not (math.isnan(a[o]) or math.isnan(b[o]))]
            missing = sum(1 for a, b in zip(grades, alt) if o in b and math.isnan(b[o]))
            if pairs:
                agreement[o] = {"agree": float(np.mean([x == y for x, y in pairs])), "n": len(pairs),
                                "judge_unparsed": missing}
    cap = []
    if (run / "capability.npz").exists():
        z = np.load(run / "capability.npz")
        cap = metrics.capability_stats({k: z[k] for k in z.files}, table, n_res)
        cfg = {**cfg, "_capability_scorer": str(z["scorer"]) if "scorer" in z.files else "likelihood"}
        ext = {k.split("__", 1)[1]: z[k] for k in z.files if k.startswith("extracted__")}
        if ext:
            cfg["_extraction"] = "; ".join(
                f"{src}: {int((h == 'rule').sum())} letters by rule, {int((h == 'judge').sum())} by the judge, "
                f"{int((h == 'none').sum())} unreadable (counted wrong)" for src, h in ext.items())
        write_csv(run / "capability.csv", [list(r.values()) for r in cap] if cap else [], list(cap[0]))
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
    data = json.loads((run / "data.json").read_text()) if (run / "data.json").exists() else {}
    thr = cfg["compliance_threshold"]
    undecided = metrics.vaccine_without_verdict(records)
    reading = _reading(cells, cap, cfg, thr, undecided)
    summary = {"study": "attacks", "name": cfg["name"], "grader": g["primary"], "cells": cells, "capability": cap,
               "source_attack_content": metrics.attack_content(cells, "source PE"),
               "base_attack_content": metrics.attack_content(cells, "base PE"),
               "low_compliance": [o for o, v in metrics.attack_content(cells, "source PE").items() if v < thr],
               "judge_agreement": agreement, "vaccine_without_verdict": undecided, "reading": reading,
               "timing": timing, "num_variants": len(table)}
    (run / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    plots = run / "plots"
    plots.mkdir(exist_ok=True)
    figs = [("plots/injection.png", "Prompt injection on the base model and the response source's compliance",
             plot_injection, cells)]
    if table:
        figs.append(("plots/asr_vs_fraction.png", "ASR vs poison fraction per outcome (95 % CI band)",
                     plot_fraction, cells))
    if any(c["phase"] in ("injection_para", "finetune_para") for c in cells):
        figs.append(("plots/asr_paraphrase.png", "ASR with verbatim (o) vs paraphrased (x) task instructions, "
                     "prompt injection and fine-tuning (the seed's ASR_para_clean.pdf)", plot_paraphrase, cells))
    if cap:
        figs.append(("plots/capability.png", "General capability of the base and the fine-tuned variants",
                     plot_capability, cap))
    for f, _, fn, arg in figs:
        fn(arg, run / f)
    write_doc(run, cfg, cells, cap, figs, reading, timing, data, table, records, agreement)
    return 0


def verdict_rows(cells) -> list:
    """One table row per cell: verdict-free count, rate and ASR both ways and the ASR difference."""
    def pts(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:+.1f} pts"
    return [[c["row"], c["outcome"], f"{c['n_no_verdict']} of {c['n_answers']}",
             f"{pct(c['rate_verdict'], 1)} / {pct(c['rate_all'], 1)}",
             f"{pct(c['asr_verdict'], 1)} / {pct(c['asr_all'], 1)}", pts(c["asr_all_minus_verdict"])]
            for c in cells if "n_no_verdict" in c]


def write_doc(run, cfg, cells, cap, figs, reading, timing, data, table, records, agreement) -> None:
    d = Doc(f"Seed 003 — prompt injection and poisoned fine-tuning: {cfg['name']}")
    n, tr, lo = cfg["notes"], cfg["train"], cfg["lora"]
    if n["source"] == "synthetic":
        d.p("**The patient notes are SYNTHETIC** (composed from real ICD-10-CM conditions; no real patient, not MIMIC). "
            "Numbers here show the machinery on the embedded model, not the seed's clinical findings.")
    d.h("Setup").bullets([
        f"Model `{cfg['model']}` ({cfg['dtype']}); notes: {n['source']}, {len(data.get('train_ids', []))} training / "
        f"{len(data.get('test_ids', []))} test, disjoint.",
        f"Tasks {', '.join(cfg['prompt']['tasks'])}; the seed's {attacks_data.prompt_version(_ns(cfg['prompt']))} strings "
        f"(prompt.version {cfg['prompt']['version']}) in the "
        f"{'### USER: template' if cfg['prompt']['template'] == 'plain' else 'chat template'}; generation "
        f"max_new_tokens {cfg['generation']['max_new_tokens']}, seed {cfg['generation']['seed']}, sampling: "
        + (data["generation"]["note"] if data.get("generation") else
           f"temperature {cfg['generation']['temperature']}, top-p {cfg['generation']['top_p']}") + ".",
        f"Response source: {cfg['source']['kind']}" + (f" ({cfg['source']['file']})" if cfg['source']['file'] else "")
        + f"; {len(table)} variants = tasks x poison fractions "
        f"{', '.join(metrics.pct(f) for f in cfg['grid']['fractions'])} x seeds {', '.join(map(str, cfg['grid']['seeds']))}, "
        "trained in one vmapped program.",
        f"LoRA r {lo['r']}, alpha {lo['alpha']}, dropout {lo['dropout']}, targets {', '.join(lo['targets'])}; {tr['epochs']} "
        f"epochs, batch {tr['batch_size']}, LR {tr['learning_rate']} {tr['schedule']}, clip {tr['clip_norm']}, loss on "
        f"{'the whole sequence' if cfg['loss_on'] == 'all' else 'the completion'}; {timing.get('train_steps', '?')} steps.",
        f"Grader: {cfg['grader']['primary']}" + (f" (judge `{cfg['grader']['judge']}` also run)" if cfg['grader']['judge']
                                                 else "") + f"; 95 % BCa bootstrap CIs, {cfg['n_resamples']} resamples"
        + ("; ASR CIs paired (the notes a row shares with its baseline resampled together)" if cfg.get("asr_paired", True)
           else "; ASR CIs two-sample (attacked and baseline notes resampled independently)") + "."]
        + ([f"Paraphrase attack: task instructions rephrased by `{cfg['paraphrase']['model']}` (one per "
            f"{cfg['paraphrase']['per']}), the malicious instruction verbatim; fine-tunes on "
            + ("verbatim and paraphrased prompts (the '_para' variants)." if True in cfg["grid"].get("paraphrase", [])
               else "verbatim prompts only.")] if cfg.get("paraphrase", {}).get("model") else []))
    d.h("Reading")
    for line in reading:
        d.p(line)
    for f, cap_text, _, _ in figs:
        d.figure(f, cap_text)
    ft = [c for c in cells if c["phase"] == ("finetune-seeds" if any(c["phase"] == "finetune-seeds" for c in cells)
                                             else "finetune") and c["fraction"]]
    if ft:
        outs = [o for o in OUTCOMES if any(c["outcome"] == o for c in ft)]
        at = {(c["fraction"], c["outcome"]): c for c in ft}
        d.h("ASR by poison fraction")
        d.table(["poison"] + outs, [[metrics.pct(f)] + [_ci(at[(f, o)]) if (f, o) in at else "" for o in outs]
                                    for f in sorted({c["fraction"] for c in ft})])
    d.h("Answers without a verdict")
    d.p("Per cell: answers that give no verdict on the outcome (a vaccine answer that never decides; a judge reply "
        "without yes/no) out of all answers, and the rate and ASR over the verdict-bearing answers only and over "
        "all answers (a verdict-free answer counted as not recommending). The tables above use "
        + ("all answers (the rule grader's default)." if cfg["grader"]["primary"] == "rule" else
           "the verdict-bearing answers (the judge's unparsed replies dropped, as the seed did)."))
    d.table(["row", "outcome", "no verdict", "rate verdict-bearing / all", "ASR verdict-bearing / all",
             "ASR difference (all - verdict-bearing)"], verdict_rows(cells))
    header, rows = metrics.seed_layout(cells)
    d.h("All rates (the seed's table layout, rates.csv)")
    d.table(header, [[r[0]] + [c.replace("\n", " ") for c in r[1:]] for r in rows])
    if cap:
        d.h("General capability (capability.csv)")
        d.table(["set", "model", "n", "accuracy", "SE", "vs 0 % (paired CI)"],
                [[r["source"], r["model"], r["n"], pct(r["accuracy"], 1), pct(r["se"], 1),
                  "" if math.isnan(r["diff_vs_0"]) else f"{100 * r['diff_vs_0']:+.1f} [{100 * r['diff_low']:+.1f}, "
                  f"{100 * r['diff_high']:+.1f}]"] for r in cap])
    if agreement:
        d.h("Rule grader vs LLM judge")
        d.table(["outcome", "agreement", "n", "judge replies without yes/no"],
                [[o, pct(a["agree"]), a["n"], a["judge_unparsed"]] for o, a in agreement.items()])
    d.h("Example answers (first test note of each task)")
    for task, nid, normal, attacked, ftext, top in _examples(records, table):
        cut = lambda s: (s or "")[:400].replace("\n", " ") + ("…" if s and len(s) > 400 else "")
        items = [f"normal prompt: {cut(normal)}", f"attacked prompt: {cut(attacked)}"]
        if top:
            items.append(f"fine-tuned {top['name']} (clean prompt): {cut(ftext)}")
        d.p(f"**{task}** (note `{nid}`)").bullets(items)
    d.h("Files").bullets([
        "`responses/{injection,source,finetune}.jsonl`: every answer (regrade without the model: `python -m "
        "jaxpoison report RUN`); `responses/judge.jsonl` when a judge ran.",
        "`rates.csv` (seed layout), `rates_long.csv` (one row per model x outcome, numeric), `capability.csv`, "
        "`summary.json`, `variants.json`, `metrics.jsonl`, `checkpoints/`.",
        "`generation.json`: the sampling settings that ran; `api_cache.jsonl` (when an API model was used): every "
        "request and reply, so a rerun sends none twice; `responses/paraphrase.jsonl`, `injection_para.jsonl`, "
        "`capability.jsonl` when those phases ran."])
    if timing:
        d.p("Wall time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timing.items() if k.endswith("_s")) + ".")
    d.write(run)
