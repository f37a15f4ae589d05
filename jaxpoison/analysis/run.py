"""``python -m jaxpoison analyze RUN_DIR``: weight shift, a poisoned-adapter detector and shrink mitigation of a
finished run (or of a folder of exported PEFT adapters), written next to the run's other results.

What it writes (into the run folder, or ``--out``):

* ``weight_shift.csv`` -- tidy rows, one per variant x module x layer x feature
  (:func:`jaxpoison.analysis.weight_shift.feature_rows`); ``weight_tests.csv`` -- poisoned vs clean adapters per
  feature and layer (KS, permutation test, Cohen's d, Cliff's delta, BH q), for all poisoned variants together and
  for each poison level, with n per group in every row.
* ``detector.json`` -- the leave-one-seed-out logistic detector and the clean-distance score
  (:func:`jaxpoison.analysis.detector.detect`): ``auc``, ``auc_ci``, ``n_clean``, ``n_poisoned``, ``features``,
  ``by_level`` (AUC per poison count / fraction), ``by_kind``, plus what was skipped and why, the mitigation's
  status and the wall times.
* ``mitigation.csv`` -- every (s_A, s_B) grid point x every variant, both sides measured: the attack effect
  (rationale runs: target-subject accuracy, the drop against the same-seed clean variant at the same grid point,
  and the decoy rate; attacks runs: the attack-direction rate of the variant's task from regenerated answers,
  the seed's outcome rates, and ASR against the same-seed 0 % variant at the same grid point) and general
  capability (rationale: non-target accuracy; attacks: the study's capability set); ``mitigation_summary.csv``
  -- per group (poisoned, clean, each grid cell of the study, each task's poisoned adapters)
  :func:`jaxpoison.analysis.mitigation.mitigation_table`.
* ``plots/analysis_*.png`` -- pooled L-inf histograms (clean vs each poison level), per-layer profiles with CI bands
  across seeds, ROC, detector AUC by poison level, mitigation heatmaps.
* ``analysis.md`` / ``analysis.html`` -- the section; the same section is put into the run's ``report.md`` /
  ``report.html`` between ``<!-- jaxpoison-analyze -->`` markers (replaced on a re-run; ``python -m jaxpoison
  report`` rebuilds those files from scratch, so run ``analyze`` again after it).

The pieces: :mod:`.adapters` (inputs), :mod:`.detection` (weight tests, detector), :mod:`.evaluators` and
:mod:`.grid_eval` (mitigation), :mod:`.report_section` (plots, the report section); this module runs them.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np

from jaxpoison.analysis import mitigation as analysis_mitigation
from jaxpoison.analysis import weight_shift
from jaxpoison.analysis.adapters import (Adapters, AnalysisError, labels_for, load_peft_dirs, load_run,
                                        normalise_variants, parse_grid, parse_modules)
from jaxpoison.analysis.detection import group_labels, run_detector, weight_tests
from jaxpoison.analysis.evaluators import study_evaluator
from jaxpoison.analysis.grid_eval import (evaluate_grid, mitigation_cost_hint, mitigation_rows, mitigation_summary,
                                          target_drop)
from jaxpoison.analysis.report_section import build_doc, make_plots, write_report
from jaxpoison.eval.evaluator import EvaluatorError
from jaxpoison.report import to_json, write_csv

DEFAULT_GRID_A = analysis_mitigation.SEED_S_A
DEFAULT_GRID_B = analysis_mitigation.SEED_S_B


# ---- the command ---------------------------------------------------------------------------------------------------
def analyze(run_dir=None, *, peft_dirs: Sequence = (), labels=None, out=None, step: Optional[int] = None,
            grid_a=None, grid_b=None, modules=None, mitigation: bool = True, zero: bool = True,
            adapters_per_call: int = 32, n_resamples: int = 9999, detector_resamples: int = 2000,
            plots: bool = True, capability_questions: int = 64, base_override=None, progress: bool = True,
            seed: int = 0, mitigation_notes: Optional[int] = None, evaluator=None) -> dict:
    """Analyse a run folder (or PEFT adapters) and write the files listed in the module docstring.

    Returns a summary dict (paths, detector AUC, mitigation status, timings). ``base_override`` = (cfg, params,
    tokenizer) scores a run trained on a base passed in from Python (tests). ``evaluator``: the study's evaluator
    factory for the mitigation grid (``jaxpoison.studies.get(name).evaluator``; the CLI passes the run's), None =
    capability only (:func:`jaxpoison.analysis.evaluators.study_evaluator`)."""
    t_all = time.time()
    timing = {}
    if not peft_dirs and run_dir is None:
        raise AnalysisError("give a run folder, or --peft-dir with exported adapters")
    t = time.time()
    ad = load_peft_dirs(peft_dirs, labels) if peft_dirs else load_run(run_dir, step)
    eval_run = pathlib.Path(run_dir) if (peft_dirs and run_dir is not None) else None
    if out is None:
        first = pathlib.Path(peft_dirs[0]) if peft_dirs else None
        out = ad.run_dir if ad.run_dir else first.parent if (first / "adapter_config.json").exists() else first
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mods = parse_modules(modules, list(ad.lora))
    s_a = parse_grid(grid_a, "--grid-a") or DEFAULT_GRID_A
    s_b = parse_grid(grid_b, "--grid-b") or DEFAULT_GRID_B
    if zero:
        s_a, s_b = tuple(sorted({0.0, *s_a})), tuple(sorted({0.0, *s_b}))
    timing["load"] = time.time() - t
    if progress:
        print(f"[analyze] {ad.describe()}", file=sys.stderr, flush=True)

    t = time.time()
    ad.variants = normalise_variants(ad.variants)
    labels_ = labels_for(ad.variants)
    feats = weight_shift.features(ad.lora, ad.scale, reference=labels_["reference"])
    timing["features"] = time.time() - t
    t = time.time()
    write_csv(out / "weight_shift.csv", weight_shift.feature_rows(feats, ad.variants), weight_shift.ROW_FIELDS)
    timing["weight_shift_csv"] = time.time() - t
    t = time.time()
    tests, test_skips = weight_tests(feats, labels_, n_resamples, seed)
    fields = ["comparison", "module", "feature", "layer", "n_clean", "n_poisoned", "mean_clean", "mean_poisoned",
              "ks_stat", "ks_p", "perm_p", "perm_q", "cohens_d", "cliffs_delta"]
    write_csv(out / "weight_tests.csv", tests, fields)
    timing["weight_tests"] = time.time() - t
    t = time.time()
    det = run_detector(feats, ad.variants, labels_, detector_resamples, seed)
    timing["detector"] = time.time() - t
    if test_skips:
        det["weight_tests_skipped"] = test_skips

    mit = None
    if mitigation:
        t = time.time()
        mit = {"status": "skipped", "modules": mods, "s_a": list(s_a), "s_b": list(s_b)}
        try:
            ev = study_evaluator(ad, evaluator, base_override, eval_run, capability_questions, mitigation_notes)
        except (AnalysisError, EvaluatorError, FileNotFoundError) as e:
            mit["reason"] = str(e)
            print(f"warning: mitigation skipped: {e}", file=sys.stderr, flush=True)
        else:
            hint = mitigation_cost_hint(ad, len(analysis_mitigation.grid_points(s_a, s_b)))
            if hint and progress:
                print(f"[analyze] {hint}", file=sys.stderr, flush=True)
            res = evaluate_grid(ad, ev, s_a, s_b, mods, adapters_per_call, progress)
            drop = target_drop(res, labels_)
            if drop is not None:
                res["target_drop"] = drop
            if ev.paired is not None:
                res.update(ev.paired(res, labels_["reference"]))
            write_csv(out / "mitigation.csv", mitigation_rows(res, ad.variants, labels_))
            summary, aname, lower = mitigation_summary(res, ad.variants, labels_, ev)
            write_csv(out / "mitigation_summary.csv", summary)
            mit.update(status="done", summary=summary, attack_metric=aname, attack_lower_is_better=lower,
                       attack_name=ev.attack_name, raw_attack_lower_is_better=ev.attack_lower_is_better,
                       capability_name=ev.capability_name, capability_only=ev.capability_only, note=ev.note,
                       n_adapters=int(len(res["grid"]) * ad.num_variants), seconds=time.time() - t)
        timing["mitigation"] = time.time() - t
    if mit is None and progress:
        # the first look: say what the grid would cost, and how to run it
        print(f"[analyze] mitigation not run (add --mitigation): "
              f"{mitigation_cost_hint(ad, len(analysis_mitigation.grid_points(s_a, s_b)))}", file=sys.stderr, flush=True)
    det["mitigation"] = {k: v for k, v in (mit or {"status": "not run (a first look; --mitigation runs the grid)"}
                                           ).items() if k != "summary"}

    t = time.time()
    hist_module = mods[0] if mods else next(iter(ad.lora))
    figs = make_plots(out, ad, feats, labels_, group_labels(ad.variants, labels_), det, mit, hist_module) \
        if plots else []
    timing["plots"] = time.time() - t
    det["timing_s"] = dict(timing)
    det["source"] = {"kind": ad.source, "run_dir": str(ad.run_dir) if ad.run_dir else None, "step": ad.step,
                     "adapters": ad.meta.get("adapters"), "study": ad.study}
    (out / "detector.json").write_text(json.dumps(to_json(det, strict=True), indent=1, allow_nan=False))
    doc = build_doc(ad, det, tests, test_skips, mit, figs, timing, out)
    in_run = ad.run_dir is not None and out.resolve() == ad.run_dir.resolve()
    reports = write_report(doc, out, ad.run_dir if in_run else None)
    timing["total"] = time.time() - t_all
    if progress:
        auc = "skipped" if det.get("auc") is None else f"{det['auc']:.3f}"
        print(f"[analyze] detector AUC {auc}; mitigation {mit['status'] if mit else 'off'}; wrote {out} "
              f"in {timing['total']:.1f} s", file=sys.stderr, flush=True)
    return {"out": out, "detector": det, "mitigation": mit, "timing": timing, "figures": figs,
            "reports": [str(r) for r in reports]}


def cmd_analyze(args, evaluator_for=None) -> int:
    """``evaluator_for(run_dir)`` -> the run's study's evaluator factory (the CLI: the study registry's)."""
    evaluator = evaluator_for(args.run_dir) if evaluator_for is not None and args.run_dir is not None else None
    analyze(args.run_dir, peft_dirs=args.peft_dir or (), labels=args.labels, out=args.out, step=args.step,
            grid_a=args.grid_a, grid_b=args.grid_b, modules=args.modules, mitigation=args.mitigation,
            zero=not args.no_zero, adapters_per_call=args.adapters_per_call, n_resamples=args.n_resamples,
            plots=not args.no_plots, mitigation_notes=args.mitigation_notes, evaluator=evaluator)
    return 0


def register(sub, evaluator_for=None) -> None:
    """The ``analyze`` command; ``evaluator_for(run_dir)`` gives a run's mitigation evaluator factory."""
    p = sub.add_parser(
        "analyze", help="weight shift, poisoned-adapter detector and shrink mitigation of a run",
        description="Analyse a finished run's adapters (or exported PEFT adapters): weight_shift.csv, "
                    "weight_tests.csv, detector.json, plots/analysis_*.png and a section in report.md / "
                    "report.html (or analysis.md). The default is a first look (seconds); --mitigation adds the "
                    "shrink-mitigation grid (mitigation.csv, mitigation_summary.csv), which costs minutes.",
        epilog="examples:\n  python -m jaxpoison analyze runs/demo                # first look: shift, tests, detector\n"
               "  python -m jaxpoison analyze runs/demo --mitigation   # + the 16-point shrink grid\n"
               "  python -m jaxpoison analyze runs/demo --mitigation --grid-a 0.06 --grid-b 0.16   # 4 points",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", default=None,
                   help="run folder (with --peft-dir: the run whose model and test set score the mitigation)")
    p.add_argument("--peft-dir", action="extend", nargs="+", default=None, metavar="DIR",
                   help="PEFT adapter folder(s): an adapter, or a folder of adapter subfolders")
    p.add_argument("--labels", default=None,
                   help="CSV folder,kind,seed,poisoned[,poison_count] for PEFT adapters without jaxpoison labels")
    p.add_argument("--out", default=None, help="output folder (default: the run folder / the PEFT folder)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    p.add_argument("--grid-a", default=None, help="s_A shrink factors (default: 0.02,0.04,0.06)")
    p.add_argument("--grid-b", default=None, help="s_B shrink factors (default: 0.04,0.08,0.16)")
    p.add_argument("--no-zero", action="store_true", help="do not add s = 0 (the unscaled adapter) to both axes")
    p.add_argument("--modules", default=None, help="modules to shrink, e.g. q or q,v or all (default: q)")
    p.add_argument("--mitigation", action="store_true",
                   help="also run the shrink-mitigation grid (loads the base and scores every adapter at every grid "
                        "point: minutes, see the estimate that a first look prints). Without it: weight shift, "
                        "tests and detector only, in seconds, with no model needed")
    p.add_argument("--adapters-per-call", type=int, default=32,
                   help="adapters scored per vmapped call (memory; default %(default)s)")
    p.add_argument("--mitigation-notes", type=int, default=None, metavar="N",
                   help="attacks runs: regenerate the answers to the first N test notes only (generation dominates "
                        "the cost; default: all)")
    p.add_argument("--n-resamples", type=int, default=9999, help="permutation resamples of the weight tests")
    p.add_argument("--no-plots", action="store_true", help="write the tables and the report without figures")
    p.set_defaults(func=functools.partial(cmd_analyze, evaluator_for=evaluator_for))


# ---- benchmark --------------------------------------------------------------------------------------------------
def benchmark(n_seeds: int = 16, levels: Sequence[int] = (0, 4, 16, 64), num_layers: int = 30, r: int = 8,
              modules: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down"), n_resamples: int = 9999,
              out=None, plots: bool = False, seed: int = 0) -> dict:
    """Wall time of the weight-shift + detector half on random adapters of SmolLM2-135M shapes (hidden 576,
    intermediate 1536, 9 heads / 3 kv heads of 64): ``n_seeds * len(levels)`` variants (default 64) x
    ``num_layers`` layers. Poisoned adapters get a rank-1 shift proportional to their level. Writes the CSVs and
    detector.json (and the plots) into ``out`` when given."""
    from jaxpoison.models.config import ModelConfig
    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=num_layers, num_heads=9, num_kv_heads=3, head_dim=64)
    rng = np.random.default_rng(seed)
    variants = [{"variant_id": i, "seed": s, "kind": "rationale" if lv else "clean", "poison_count": lv}
                for i, (s, lv) in enumerate((s, lv) for s in range(n_seeds) for lv in levels)]
    V = len(variants)
    lv = np.array([v["poison_count"] for v in variants], np.float32)
    lora = {}
    for m in modules:
        fi, fo = cfg.module_shape(m)
        a = rng.standard_normal((V, num_layers, fi, r), np.float32) / np.float32(np.sqrt(fi))
        b = np.float32(0.01) * rng.standard_normal((V, num_layers, r, fo), np.float32)
        a[:, :, :, 0] += (0.002 * lv)[:, None, None] * rng.standard_normal(fi).astype(np.float32)
        b[:, :, 0, :] += (0.0002 * lv)[:, None, None] * rng.standard_normal(fo).astype(np.float32)
        lora[m] = {"a": a, "b": b}
    ad = Adapters(lora, 2.0, variants, "bench")
    timing, cpu = {}, {}

    def clock(name, fn, *args):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        timing[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        return out

    labels = labels_for(variants)
    feats = clock("features", weight_shift.features, lora, ad.scale, labels["reference"])
    rows = clock("feature_rows", weight_shift.feature_rows, feats, variants)
    tests, _ = clock("weight_tests", weight_tests, feats, labels, n_resamples, seed)
    det = clock("detector", run_detector, feats, variants, labels, 2000, seed)
    timing["weight_shift_and_detector"] = sum(timing.values())
    cpu["weight_shift_and_detector"] = sum(cpu.values())
    clock("features_again (compiled)", weight_shift.features, lora, ad.scale, labels["reference"])
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        write_csv(out / "weight_shift.csv", rows, weight_shift.ROW_FIELDS)
        write_csv(out / "weight_tests.csv", tests)
        (out / "detector.json").write_text(json.dumps(to_json(det, strict=True), indent=1, allow_nan=False))
        timing["write"] = time.time() - t
        if plots:
            t = time.time()
            make_plots(out, ad, feats, labels, group_labels(variants, labels), det, None, "q")
            timing["plots"] = time.time() - t
    return {"variants": V, "layers": num_layers, "modules": list(modules), "r": r, "n_features": len(det["features"]),
            "n_test_rows": len(tests), "n_shift_rows": len(rows), "auc": det.get("auc"), "auc_ci": det.get("auc_ci"),
            "by_level": [(b["level"], round(b["auc"], 3)) for b in det.get("by_level", [])], "timing_s": timing,
            "cpu_s": cpu}
