"""Seed 000: few-shot rationale poisoning vs knowledge overwriting vs catastrophic forgetting.

One study = one grid of variants, every variant a LoRA fine-tune of the same frozen base on its own SFT mix:

- ``clean``: correct non-target samples with rationales (the reference every drop is measured against, seed by
  seed: variants of one seed share their non-target samples and their adapter initialisation);
- ``rationale``: + ``count`` target-subject samples whose rationale argues for a wrong option (the subject's
  consistent decoy), at several counts, optionally with correct target samples so that poisoned / target
  samples = ``ratio`` (finding 2), or with fewer non-target samples so that poisoned / all = ``ratio_all``;
- ``overwrite``: the same target samples and wrong answers, no rationale (knowledge overwriting, finding 3);
- ``forgetting``: more non-target samples, no target samples at all (catastrophic forgetting, finding 5).

Mix sizes. By default the poisoned, correct-target and forgetting-extra samples are *added* to the clean mix (the
seed's protocol; ``ratio_all`` can then be swept at a fixed count), so mixes differ in size and a larger mix trains
for more optimiser steps: a weight-shift detector can then separate variants by step count alone.
``grid.equal_size`` gives every mix ``data.n_nontarget`` rows instead: the additions replace the last non-target
samples of the seed's clean mix (:mod:`jaxpoison.data.mixes`), so every variant takes the same steps, shares all
its other rows with the same seed's clean variant, and ``ratio_all`` = count / ``data.n_nontarget`` follows from
the count (recorded per variant; ``grid.ratios_all`` cells are refused). The forgetting control then swaps x of
the clean mix's non-target samples for x others: a same-size control for what changing x rows does, not x more
rows of fine-tuning.

All variants and seeds train in one vmapped program (:func:`jaxpoison.train.trainer.train_study`) and are scored
in one (:func:`jaxpoison.eval.score.score_options`): the likelihood of each option's text after a neutral
statement of the question, which is what a small model can be measured on (letters hide its knowledge).

Statistics (:mod:`.rationale_stats`): the primary metric is target-specific, the per-question paired change of
the calibrated margin (correct option minus the best wrong one, each minus its prior after a neutral prefix)
against clean SFT of the same seed, target questions minus non-target questions that show the decoy option.
Inference is at the level of training runs: t intervals over seeds below 8 seeds, a two-level (seed x question)
bootstrap from 8, and the one-sided t test over seeds as the primary test; the question-level permutation test is
reported and labelled as such. Differences between cells are tested as paired-by-seed differences. Accuracy is
secondary. A decoy (label-prior) control (``grid.decoy_counts``) and, optionally, generated answers
(``eval.gen_questions``) sit beside the poison cells. The five findings are then checked against the numbers and
stated in ``report.md``, whichever way they come out.

Run folder: ``config.json``, ``checkpoints/``, ``metrics.jsonl`` (the engine), ``variants.json``, ``scores.npz``
(every option score, so ``report`` recomputes everything without the model), ``results.csv``, ``summary.json``,
``plots/*.png``, ``report.md``, ``report.html``, ``timing.json``, ``generations.json`` (with
``eval.gen_questions``).

Code: configuration and its checks in :mod:`.rationale_config`, data, mixes and test questions in
:mod:`.rationale_grid`, option scores -> per-variant results in :mod:`.rationale_eval`, statistics and findings
in :mod:`.rationale_stats`, plots and report in :mod:`.rationale_report`; this module runs them (:func:`run`,
:func:`report`) and re-exports the names other code imports from it.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from jaxpoison.studies import run_folder as RF
from jaxpoison.studies.rationale_config import (FAMILIES, POISON_FAMILIES, RATIONALE_KINDS, SCORE_METHODS,  # noqa: F401
                                                STUDY, DataConfig, EvalConfig, GridConfig, PoisonConfig,
                                                RationaleConfig, StudyConfigError, _jsonable, check_config, family)
from jaxpoison.studies.rationale_eval import (_final_losses, correctness, load_scores, results_rows,  # noqa: F401
                                              write_csv)
from jaxpoison.studies.rationale_grid import StudyInputs, build_inputs, load_examples, mix_specs  # noqa: F401
from jaxpoison.studies.rationale_report import make_plots, write_report
from jaxpoison.studies.rationale_stats import findings, summarize, thresholds  # noqa: F401
from jaxpoison.train.config import TrainConfig

_load_examples = load_examples      # the old private name (kept for callers outside the package)


# ---- run ------------------------------------------------------------------------------------------------------------
def resolve_train(cfg: RationaleConfig, pool) -> TrainConfig:
    if cfg.train.loss_budget == -1:
        budget = -(-int(pool.stats["loss_tokens"]["max"]) // 8) * 8
        return dataclasses.replace(cfg.train, loss_budget=budget)
    return cfg.train


def base_first(lora):
    """The stacked adapters with the zero-shot base in front as adapter 0 (its ``b`` is zero: x @ a @ 0 adds exactly
    0), so scoring base and variants is one compiled program. Adapters on the host (chunked training leaves them
    there) stay on the host: the scorer moves one ``eval.variant_chunk`` at a time to the devices."""
    import jax

    def one(x):
        xp = np if isinstance(x, np.ndarray) else jax.numpy
        return xp.concatenate([xp.zeros_like(x[:1]), x])

    return jax.tree.map(one, lora)


def run(cfg: RationaleConfig, out_dir: pathlib.Path, resume: bool = True, progress: bool = True,
        base_override=None) -> int:
    """Build, train, score and report one study into ``out_dir``. ``base_override`` = (cfg, params, tokenizer)
    replaces the model (tests use a tiny random one)."""
    import jax
    from jaxpoison.eval.score import score_options
    from jaxpoison.train.engine import Static
    from jaxpoison.train.trainer import StudyData, train_study

    check_config(cfg)
    from jaxpoison.plan.preflight import check_fit
    check_fit(cfg, base_override)      # stops a study that cannot fit before any weights load
    from jaxpoison import distributed
    writer = distributed.is_writer()   # a multi-host job: process 0 writes the run folder, and alone shows progress
    progress = progress and writer
    t_start, timing = time.time(), {}
    out = RF.prepare(out_dir, STUDY, _jsonable(cfg), resume, ("checkpoints", "scores.npz"))
    t = time.time()
    lm = RF.load_base(cfg.model, cfg.dtype, base_override, cfg.quant)
    mcfg, base, tok, base_name, fp, dtype = lm.cfg, lm.params, lm.tokenizer, lm.name, lm.fingerprint, lm.dtype
    timing["load_model_s"] = time.time() - t

    t = time.time()
    inp = build_inputs(cfg, tok, lm)
    tcfg = resolve_train(cfg, inp.pool)
    vt = inp.variants
    from jaxpoison.data.pool import build_mc_eval
    mc = build_mc_eval(inp.test, tok, cfg.eval.format, max_len=cfg.data.max_len,
                       buckets=tuple(range(16, 4097, 16)))
    groups = np.array(inp.groups())
    is_target = groups == "target"
    if writer:
        (out / "variants.json").write_text(json.dumps(_jsonable(vt.table), indent=1))
    data_info = {"notes": inp.notes, "pool": _jsonable(inp.pool.stats), "eval": _jsonable(mc.stats),
                 "n_target_train": len(inp.target), "n_nontarget_train": len(inp.nontarget),
                 "n_test_target": int(is_target.sum()), "n_test_nontarget": int((groups == "nontarget").sum()),
                 "n_test_decoy_free": int((groups == "target_nodecoy").sum()),
                 "train": _jsonable(tcfg), "num_variants": len(vt), "pool_hash": inp.pool.data_hash,
                 "eval_hash": mc.data_hash, "base": {"name": base_name, "fingerprint": fp, "quant": cfg.quant}}
    if writer:
        (out / "data.json").write_text(json.dumps(data_info, indent=1))
    timing["data_s"] = time.time() - t
    if progress:
        print(f"[{STUDY}] {len(vt)} variants ({len(inp.specs)} cells x {len(cfg.grid.seeds)} seeds), pool "
              f"{len(inp.pool)} rows x {inp.pool.stats['T']} tokens, {len(inp.test)} test questions "
              f"({inp.n_test_target} target)", flush=True)

    t = time.time()
    st = Static(mcfg, tcfg, cfg.lora)
    sd = StudyData(inp.pool.tokens, inp.pool.loss_mask, inp.pool.attn_mask, vt.rows, vt.n_rows, vt.table,
                   inp.pool.data_hash)
    result = train_study(base, st, sd, run_dir=str(out), resume=resume, progress=progress, base_name=base_name,
                         base_fingerprint=fp, meta_extra={"study": STUDY, "config": _jsonable(cfg)}, mesh=cfg.mesh)
    timing["train_s"] = time.time() - t
    timing["train_steps"] = result.steps
    timing["train_tokens"] = int(len(vt) * result.steps * tcfg.rows_per_update * inp.pool.stats["T"])
    if result.resumed_from is not None:
        timing["resumed_from_step"] = result.resumed_from

    t = time.time()
    sf = out / "scores.npz"
    key = f"{inp.pool.data_hash}:{mc.data_hash}:{result.steps}:{len(vt)}"
    cached = None
    if sf.exists() and resume:
        z = np.load(sf, allow_pickle=False)
        cached = z if str(z["key"]) == key else None
    if cached is None:
        # the zero-shot base rides along as one more adapter whose b is zero (x @ a @ 0 adds exactly 0), so the
        # whole evaluation is one compiled program
        lora = base_first(result.lora)
        sc = score_options(base, mcfg, mc, lora, lora_scale=cfg.lora.scale, dtype=dtype,
                           batch_questions=cfg.eval.batch_questions, calibrate=True, progress=progress,
                           variant_chunk=cfg.eval.variant_chunk, desc=f"score base + {len(vt)} variants")
        if writer:         # every process scored (the same adapters, on its own devices); one saves
            np.savez(sf, key=np.array(key), sum=sc.sum, uncond=sc.uncond, n_tokens=sc.n_tokens, answer=mc.answer,
                     decoy=mc.decoy, is_target=is_target, group=groups, subject=np.array(mc.subject),
                     ids=np.array(mc.ids))
    timing["eval_s"] = time.time() - t
    gf = out / "generations.json"
    if cfg.eval.gen_questions and not (resume and gf.exists() and json.loads(gf.read_text()).get("key") == key):
        from jaxpoison.studies.rationale_eval import generated_answers
        t = time.time()
        lora = base_first(result.lora)
        recs = generated_answers(lm, lora, vt.table, inp.test, list(groups), cfg.eval.gen_questions,
                                 cfg.eval.gen_tokens, progress)
        if writer:
            gf.write_text(json.dumps({"key": key, "records": recs}, indent=1))
        timing["generate_s"] = time.time() - t
    if not writer:
        return 0
    tf = out / "timing.json"
    did_work = cached is None or result.resumed_from is None or result.resumed_from < result.steps
    if not did_work and tf.exists():        # a no-op resume keeps the timing of the run that did the work
        timing = json.loads(tf.read_text())
    else:
        timing["until_report_s"] = time.time() - t_start
        tf.write_text(json.dumps(timing, indent=1))
    report(out)
    if did_work:
        timing["total_s"] = time.time() - t_start
        tf.write_text(json.dumps(timing, indent=1))
    if progress:
        print(f"[{STUDY}] done in {time.time() - t_start:.0f} s: {out / 'report.md'}", flush=True)
    return 0


# ---- report ---------------------------------------------------------------------------------------------------------
def report(run_dir) -> int:
    """Recompute results.csv, summary.json, the plots and report.md/.html from the saved scores (no model)."""
    run = pathlib.Path(run_dir)
    for need in ("config.json", "variants.json", "scores.npz"):
        if not (run / need).exists():
            raise FileNotFoundError(f"{run} has no {need}: the run did not get as far as scoring; re-run the same "
                                    f"`run` command to resume it")
    cfg = json.loads((run / "config.json").read_text())["config"]
    table = json.loads((run / "variants.json").read_text())
    scores = load_scores(run)
    rows, zero = results_rows(table, scores, cfg["eval"]["method"])
    losses = _final_losses(run, len(table))
    for r in rows:
        r["final_loss"] = float(losses[r["variant_id"]])
    write_csv(run / "results.csv", rows)
    summary = summarize(table, scores, rows, zero, cfg)
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
    data = json.loads((run / "data.json").read_text()) if (run / "data.json").exists() else {}
    summary["timing"] = timing
    (run / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1, default=str))
    from jaxpoison.studies.rationale_eval import unseen_row_loss
    summary["clean_loss"] = unseen_row_loss(run, [t["variant_id"] for t in table if t["spec_name"] == "clean"])
    if cfg["train"].get("epochs", 1) > 1:
        summary["clean_loss"]["note"] = "more than one epoch: the last step's rows were seen before"
    gen = []
    if (run / "generations.json").exists():
        from jaxpoison.studies.rationale_eval import generation_summary
        gen = generation_summary(json.loads((run / "generations.json").read_text())["records"])
        summary["generation"] = gen
    (run / "summary.json").write_text(json.dumps(_jsonable(summary), indent=1, default=str))
    figs = make_plots(run, rows, summary, zero)
    write_report(run, cfg, summary, rows, zero, figs, timing, data, gen)
    return 0
