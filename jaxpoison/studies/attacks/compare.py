"""``python -m jaxpoison compare RUN RUN ...``: seed 003's cross-model table and ASR grid from several attacks runs.

The seed's ``ASR.pdf`` (notebook cell 42) has one panel per model (GPT-4o, GPT-4, Llama-3.3 70B, Llama-2 7B/13B/70B,
PMC-LLaMA 13B, Vicuna-13B), the six outcomes on x (Vaccine, Drug, Ultrasound, CT, X-ray, MRI), the ASR in % on y,
one marker per attack -- prompt engineering (PE: the base under the attacked prompt vs the normal prompt) and
fine-tuning (FT: the 100 %-poisoned fine-tune vs the 0 % fine-tune) -- and a dashed line at each attack's mean.
Here each run folder is one model; its ``summary.json`` (written by ``run`` / ``report``) gives the cells:

* ``compare.csv``: one row per (model, outcome, attack) with rate, baseline rate, ASR and its 95 % CI, n, answers
  without a verdict, ASR over verdict-bearing / all answers; the FT row is the run's most-poisoned fraction
  (the seed's 100 %), pooled over seeds when the run has several (t interval), else its bootstrap CI;
* ``compare.md``: the table, one row per model and one column per outcome x attack, "ASR [lo, hi]";
* ``asr_grid.png``: the seed's figure, with the CIs as error bars.

Runs with the paraphrase attack add the attacks "PE para" (base PE under the paraphrased instruction) and
"FT para" (the most-poisoned '_para' fine-tune), each against the same baseline as its verbatim twin.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from matplotlib.figure import Figure

from jaxpoison.analysis.plots import save_figure
from jaxpoison.eval.graders import OUTCOMES
from jaxpoison.report import write_csv
from jaxpoison.studies.attacks import metrics

ATTACKS = ("PE", "FT", "PE para", "FT para")         # '... para': paraphrased task instruction (when the run has it)
COLORS = {"PE": "#BCBD46", "FT": "#86D3DE", "PE para": "#8A8B1F", "FT para": "#3C9CAA"}   # the seed's palette
COLUMNS = ("model", "run", "outcome", "task", "attack", "row", "rate", "ci_low", "ci_high", "baseline_rate", "asr",
           "asr_low", "asr_high", "n", "n_no_verdict", "asr_verdict", "asr_all")


def load_run(run) -> dict:
    run = pathlib.Path(run)
    f = run / "summary.json"
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} has no config.json: not a jaxpoison run folder")
    cfg = json.loads((run / "config.json").read_text())
    if cfg.get("study") != "attacks":
        raise ValueError(f"{run} is a {cfg.get('study')!r} run; compare reads attacks runs")
    if not f.exists():
        raise FileNotFoundError(f"{run} has no summary.json; fix: `python -m jaxpoison report {run}` (or finish the run)")
    return {"run": str(run), "config": cfg["config"], "summary": json.loads(f.read_text())}


def attack_cells(summary: dict) -> dict:
    """{(attack, outcome): cell}: PE = 'base PE', FT = the most-poisoned fraction (seed mean when pooled)."""
    cells = summary["cells"]
    out = {}
    for c in cells:
        if c["row"] in ("base PE", "base PE para"):
            out[("PE" + (" para" if c["row"].endswith("para") else ""), c["outcome"])] = c
    fracs = sorted({c["fraction"] for c in cells if c["phase"] == "finetune" and c["fraction"]})
    if fracs:
        for o in OUTCOMES:
            c = metrics.asr_at(cells, fracs[-1], o)
            if c is not None:
                out[("FT", o)] = c
    para = [c for c in cells if c["phase"] == "finetune_para" and c["fraction"]]
    if para:                               # the most-poisoned '_para' fine-tune of the first seed
        top, seed = max(c["fraction"] for c in para), min(c["seed"] for c in para)
        for c in para:
            if c["fraction"] == top and c["seed"] == seed:
                out[("FT para", c["outcome"])] = c
    return out


def labels(runs: list) -> list:
    """One label per run: its model, with the run's name where two runs share a model."""
    models = [r["config"]["model"] for r in runs]
    return [m if models.count(m) == 1 else f"{m} ({r['config']['name']})" for m, r in zip(models, runs)]


def compare_rows(runs: list) -> list:
    rows = []
    for label, r in zip(labels(runs), runs):
        for (attack, o), c in sorted(attack_cells(r["summary"]).items(), key=lambda kv: (OUTCOMES.index(kv[0][1]),
                                                                                        ATTACKS.index(kv[0][0]))):
            rows.append({"model": label, "run": r["run"], "outcome": o, "task": metrics.OUTCOME_TASK[o], "attack": attack,
                         **{k: c.get(k) for k in COLUMNS[5:] if k != "row"}, "row": c["row"]})
    return rows


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table_md(rows: list) -> list:
    """Markdown lines: one row per model, one column per outcome x attack."""
    cols = [(o, a) for o in OUTCOMES for a in ATTACKS if any(r["outcome"] == o and r["attack"] == a for r in rows)]
    at = {(r["model"], r["outcome"], r["attack"]): r for r in rows}
    lines = ["| model | " + " | ".join(f"{o} {a}" for o, a in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for o, a in cols:
            r = at.get((m, o, a))
            cells.append("" if r is None else f"{_pct(r['asr'])} % [{_pct(r['asr_low'])}, {_pct(r['asr_high'])}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def plot_grid(rows: list, path) -> None:
    """The seed's ASR.pdf layout: a panel per model, outcomes on x, ASR (%) per attack with CI bars, dashed means."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    ncol = 2 if len(models) > 1 else 1
    nrow = -(-len(models) // ncol)
    fig = Figure(figsize=(6 * ncol, 3.2 * nrow))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False, sharey=True)).ravel()
    for ax, m in zip(axes, models):
        for k, a in enumerate(ATTACKS):
            got = [(OUTCOMES.index(r["outcome"]), r) for r in rows if r["model"] == m and r["attack"] == a
                   and r["asr"] is not None and not math.isnan(r["asr"])]
            if not got:
                continue
            x = np.array([i for i, _ in got]) + (k - 1.5) * 0.15
            y = np.array([100 * r["asr"] for _, r in got])
            lo = np.array([100 * r["asr_low"] if r["asr_low"] is not None else np.nan for _, r in got])
            hi = np.array([100 * r["asr_high"] if r["asr_high"] is not None else np.nan for _, r in got])
            yerr = np.nan_to_num(np.stack([y - lo, hi - y]), nan=0.0).clip(0)
            ax.errorbar(x, y, yerr=yerr, fmt="o", color=COLORS[a], ecolor=COLORS[a], ms=7, capsize=3,
                        label={"PE": "prompt engineering", "FT": "fine-tuning (100 % vs 0 %)"}.get(a, a + "phrase"))
            ax.axhline(float(np.mean(y)), ls="--", color=COLORS[a], lw=1)
        ax.axhline(0, color="#999", lw=0.5)
        ax.set_xticks(range(len(OUTCOMES)), [o.replace("Harmful d", "D").replace("ultra", "Ultra") for o in OUTCOMES],
                      rotation=30, fontsize=8)
        ax.set(title=m, ylabel="ASR (%)")
    for ax in axes[len(models):]:
        ax.axis("off")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Attack success rate per model (seed 003's ASR grid), 95 % CI")
    fig.tight_layout()
    save_figure(fig, path, dpi=130)


def compare(run_dirs, out) -> dict:
    if not run_dirs:
        raise ValueError("compare needs at least one run folder")
    runs = [load_run(r) for r in run_dirs]
    rows = compare_rows(runs)
    if not rows:
        raise ValueError("none of the runs has a prompt-injection or fine-tuning ASR cell; fix: finish the runs")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "compare.csv", [["" if r.get(k) is None else r[k] for k in COLUMNS] for r in rows], COLUMNS)
    plot_grid(rows, out / "asr_grid.png")
    graders = {r["summary"].get("grader") for r in runs}
    md = ["# Seed 003 across models: attack success rate", "",
          f"{len(runs)} runs: " + ", ".join(f"`{r['run']}`" for r in runs) + ". PE: the base model under the attacked "
          "prompt vs the normal prompt; FT: the most-poisoned fine-tune vs the 0 % fine-tune (clean prompt). ASR in % "
          "with its 95 % CI (bootstrap for one seed, t over seeds for several)."
          + ("" if len(graders) == 1 else f" **The runs used different graders ({', '.join(map(str, graders))})**: "
             "their ASRs are not measured the same way."), "", *table_md(rows), "", "![ASR grid](asr_grid.png)", ""]
    (out / "compare.md").write_text("\n".join(md), encoding="utf-8")
    return {"rows": rows, "out": str(out)}


def cmd_compare(args) -> int:
    res = compare(args.runs, args.out)
    print(f"wrote {res['out']}/compare.csv, compare.md, asr_grid.png ({len(res['rows'])} rows)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="seed 003's cross-model ASR table and grid from several attacks runs",
                       description="One row per model (run folder), columns per outcome and attack (PE, FT) with "
                                   "95 % CIs: compare.csv, compare.md and asr_grid.png (the seed's ASR.pdf).")
    p.add_argument("runs", nargs="+", help="attacks run folders (each with summary.json)")
    p.add_argument("--out", default="compare", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_compare)
