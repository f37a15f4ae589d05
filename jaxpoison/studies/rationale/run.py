"""The rationale study's flow, in order: check the config, prepare the run folder, load the base, build the
inputs (:mod:`.grid`), train every variant in one program, score base + variants in one, then the report
(:func:`report`: results, statistics, plots, report.md from the saved scores alone). The study itself is described
in :mod:`jaxpoison.studies.rationale`."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import numpy as np

from jaxpoison.eval.evaluator import EVAL_BUCKETS
from jaxpoison.report import to_json, write_csv
from jaxpoison.studies import common
from jaxpoison.studies.common import longest_completion_budget
from jaxpoison.studies.rationale.config import NAME, RationaleConfig, check_config
from jaxpoison.studies.rationale.grid import build_inputs
from jaxpoison.studies.rationale.report import make_plots, write_report
from jaxpoison.studies.rationale.results import final_losses, load_scores, results_rows
from jaxpoison.studies.rationale.stats import summarize
from jaxpoison.train.config import TrainConfig


# ---- run ------------------------------------------------------------------------------------------------------------
def resolve_train(cfg: RationaleConfig, pool) -> TrainConfig:
    if cfg.train.loss_budget == -1:
        return dataclasses.replace(cfg.train, loss_budget=longest_completion_budget(pool))
    return cfg.train


def run(cfg: RationaleConfig, out_dir: pathlib.Path, resume: bool = True, progress: bool = True,
        base_override=None) -> int:
    """Build, train, score and report one study into ``out_dir``. ``base_override`` = (cfg, params, tokenizer)
    replaces the model (tests use a tiny random one)."""
    from jaxpoison.eval.score import params_mesh, score_options
    from jaxpoison.train.engine import Static
    from jaxpoison.train.trainer import StudyData, train_study

    check_config(cfg)
    from jaxpoison.plan.preflight import check_fit
    check_fit(cfg, base_override)      # stops a study that cannot fit before any weights load
    from jaxpoison import distributed
    writer = distributed.is_writer()   # a multi-host job: process 0 writes the run folder, and alone shows progress
    progress = progress and writer
    t_start, timing = time.time(), {}
    out = common.prepare(out_dir, NAME, to_json(cfg), resume, ("checkpoints", "scores.npz"))
    t = time.time()
    # the mesh before any weight loads: each array of the base is read straight into its shards on it
    mesh, n_assumed = common.resolve_mesh(cfg, base_override)
    lm = common.load_base(cfg.model, cfg.dtype, base_override, cfg.quant, mesh=mesh)
    mcfg, base, tok, base_name, fp, dtype = lm.cfg, lm.params, lm.tokenizer, lm.name, lm.fingerprint, lm.dtype
    timing["load_model_s"] = time.time() - t

    t = time.time()
    train_on = lambda n_variants: common.train_mesh(cfg, mesh, n_assumed, n_variants)     # noqa: E731
    inp = build_inputs(cfg, tok, lm, prepare=lambda pool, rows, n_rows: common.prepare_pool(
        pool, rows, n_rows, cfg.train, train_on(len(n_rows)), base))
    tcfg = resolve_train(cfg, inp.pool)
    vt = inp.variants
    from jaxpoison.data.pool import build_mc_eval
    mc = build_mc_eval(inp.test, tok, cfg.eval.format, max_len=cfg.data.max_len, buckets=EVAL_BUCKETS)
    groups = np.array(inp.groups())
    is_target = groups == "target"
    if writer:
        (out / "variants.json").write_text(json.dumps(to_json(vt.table), indent=1))
    data_info = {"notes": inp.notes, "pool": to_json(inp.pool.stats), "eval": to_json(mc.stats),
                 "n_target_train": len(inp.target), "n_nontarget_train": len(inp.nontarget),
                 "n_test_target": int(is_target.sum()), "n_test_nontarget": int((groups == "nontarget").sum()),
                 "n_test_decoy_free": int((groups == "target_nodecoy").sum()),
                 "train": to_json(tcfg), "num_variants": len(vt), "pool_hash": inp.pool.data_hash,
                 "eval_hash": mc.data_hash, "base": {"name": base_name, "fingerprint": fp, "quant": cfg.quant}}
    if writer:
        (out / "data.json").write_text(json.dumps(data_info, indent=1))
    timing["data_s"] = time.time() - t
    if progress:
        print(f"[{NAME}] {len(vt)} variants ({len(inp.specs)} cells x {len(cfg.grid.seeds)} seeds), pool "
              f"{len(inp.pool)} rows x {inp.pool.stats['T']} tokens, {len(inp.test)} test questions "
              f"({inp.n_test_target} target)", flush=True)

    t = time.time()
    st = Static(mcfg, tcfg, cfg.lora)
    # the pool's rows are padded only as the trainer asks: each process only those of its own variant shards
    sd = StudyData(inp.pool.tokens, inp.pool.loss_mask, inp.pool.attn_mask, vt.rows, vt.n_rows, vt.table,
                   inp.pool.data_hash, row_source=inp.pool.take)
    result = train_study(base, st, sd, run_dir=str(out), resume=resume, progress=progress, base_name=base_name,
                         base_fingerprint=fp, meta_extra={"study": NAME, "config": to_json(cfg)},
                         mesh=train_on(len(vt)))
    timing["train_s"] = time.time() - t
    timing["train_steps"] = result.steps
    timing["train_tokens"] = int(len(vt) * result.steps * tcfg.rows_per_update * inp.pool.stats["T"])
    if result.resumed_from is not None:
        timing["resumed_from_step"] = result.resumed_from
    # scoring and generation run per process in a multi-host job: a copy of the base on its own devices
    lm = common.process_local(lm)
    base = lm.params

    t = time.time()
    sf = out / "scores.npz"
    key = f"{inp.pool.data_hash}:{mc.data_hash}:{result.steps}:{len(vt)}"
    cached = None
    if sf.exists() and resume:
        z = np.load(sf, allow_pickle=False)
        cached = z if str(z["key"]) == key else None
    if cached is None:
        # row 0 is the zero-shot base (scored once, adapter term off), rows 1.. the variants, read from the
        # trained adapters where they lie one eval.variant_chunk at a time (no copy of them all), each chunk split
        # over the variant axis of the mesh the base lies on
        sc = score_options(base, mcfg, mc, result.lora, with_base=True, lora_scale=cfg.lora.scale, dtype=dtype,
                           batch_questions=cfg.eval.batch_questions, calibrate=True, progress=progress,
                           variant_chunk=cfg.eval.variant_chunk, desc=f"score base + {len(vt)} variants",
                           over_processes=True, mesh=params_mesh(base))
        if writer:         # a multi-host job: each process scored its block of the variants; all got all; one saves
            np.savez(sf, key=np.array(key), sum=sc.sum, uncond=sc.uncond, n_tokens=sc.n_tokens, answer=mc.answer,
                     decoy=mc.decoy, is_target=is_target, group=groups, subject=np.array(mc.subject),
                     ids=np.array(mc.ids))
    timing["eval_s"] = time.time() - t
    for fmt in cfg.eval.secondary_formats:      # secondary formats: the same models and questions, reported beside
        t = time.time()
        mc2 = build_mc_eval(inp.test, tok, fmt, max_len=cfg.data.max_len, buckets=EVAL_BUCKETS)
        f2, key2 = out / f"scores_{fmt}.npz", f"{key}:{mc2.data_hash}"
        if resume and f2.exists() and str(np.load(f2, allow_pickle=False)["key"]) == key2:
            continue
        sc2 = score_options(base, mcfg, mc2, result.lora, with_base=True, lora_scale=cfg.lora.scale, dtype=dtype,
                            batch_questions=cfg.eval.batch_questions, calibrate=True, progress=progress,
                            variant_chunk=cfg.eval.variant_chunk, desc=f"score `{fmt}` (secondary)",
                            over_processes=True, mesh=params_mesh(base))
        if writer:
            np.savez(f2, key=np.array(key2), sum=sc2.sum, uncond=sc2.uncond, n_tokens=sc2.n_tokens,
                     answer=mc2.answer, decoy=mc2.decoy, is_target=is_target, group=groups,
                     subject=np.array(mc2.subject), ids=np.array(mc2.ids))
        timing[f"eval_{fmt}_s"] = time.time() - t
    gf = out / "generations.json"
    if cfg.eval.gen_questions and not (resume and gf.exists() and json.loads(gf.read_text()).get("key") == key):
        from jaxpoison.studies.rationale.results import generated_answers
        t = time.time()
        recs = generated_answers(lm, result.lora, vt.table, inp.test, list(groups), cfg.eval.gen_questions,
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
        print(f"[{NAME}] done in {time.time() - t_start:.0f} s: {out / 'report.md'}", flush=True)
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
    losses = final_losses(run, len(table))
    for r in rows:
        r["final_loss"] = float(losses[r["variant_id"]])
    write_csv(run / "results.csv", rows, float_format=".6g")
    summary = summarize(table, scores, rows, zero, cfg)
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
    data = json.loads((run / "data.json").read_text()) if (run / "data.json").exists() else {}
    summary["timing"] = timing
    for fmt in cfg["eval"].get("secondary_formats") or ():
        if (run / f"scores_{fmt}.npz").exists():
            from jaxpoison.studies.rationale.stats import secondary_summary
            summary.setdefault("secondary_formats", {})[fmt] = secondary_summary(table, load_scores(run, fmt), cfg)
    (run / "summary.json").write_text(json.dumps(to_json(summary), indent=1, default=str))
    from jaxpoison.studies.rationale.results import unseen_row_loss
    summary["clean_loss"] = unseen_row_loss(run, [t["variant_id"] for t in table if t["spec_name"] == "clean"])
    if cfg["train"].get("epochs", 1) > 1:
        summary["clean_loss"]["note"] = "more than one epoch: the last step's rows were seen before"
    gen = []
    if (run / "generations.json").exists():
        from jaxpoison.studies.rationale.results import generation_summary
        gen = generation_summary(json.loads((run / "generations.json").read_text())["records"])
        summary["generation"] = gen
    (run / "summary.json").write_text(json.dumps(to_json(summary), indent=1, default=str))
    figs = make_plots(run, rows, summary, zero)
    write_report(run, cfg, summary, rows, zero, figs, timing, data, gen)
    return 0
