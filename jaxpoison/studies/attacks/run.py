"""The attacks study's flow: check, prepare the run folder, load the base, then the phases of :mod:`.steps`
(base and source answers, paraphrases, fine-tuning, the variants' answers, capability, the judge), then the
report (:mod:`.report`). The study itself is described in :mod:`jaxpoison.studies.attacks`."""
from __future__ import annotations

import dataclasses
import json
import pathlib
import time

from jaxpoison.report import to_json
from jaxpoison.studies import common
from jaxpoison.studies.attacks import data, steps
from jaxpoison.studies.attacks.config import NAME, AttacksConfig, check_config


def run(cfg: AttacksConfig, out_dir: pathlib.Path, resume: bool = True, progress: bool = True,
        base_override=None) -> int:
    """Run the study into ``out_dir``. ``base_override`` = (model cfg, params, tokenizer) replaces the model
    (tests use a tiny random one)."""
    check_config(cfg)
    from jaxpoison import distributed
    # a multi-host job: every process trains its share of the variants, answers for and scores its block of them;
    # process 0 alone writes the run folder, shows progress, asks API models, generates with the base and judges
    # (common.writer_only)
    writer = distributed.is_writer()
    progress = progress and writer
    from jaxpoison.plan.preflight import check_fit
    check_fit(cfg, base_override)      # stops a study that cannot fit before any weights load
    t_start, timing = time.time(), {}
    out = common.prepare(out_dir, NAME, to_json(cfg), resume, ("checkpoints", "responses", "capability.npz"),
                     ignore=())
    t = time.time()
    # the mesh before any weight loads: each array of the base is read straight into its shards on it
    mesh, n_assumed = common.resolve_mesh(cfg, base_override)
    lm = common.load_base(cfg.model, cfg.dtype, base_override, cfg.quant, mesh=mesh)
    # a multi-host job trains on `glm` (its shards over every process); the phases run per process (process 0's
    # writer-only ones, answer and score blocks) use a copy on this process's own devices
    glm, lm = lm, common.process_local(lm)
    timing["load_model_s"] = time.time() - t
    say = (lambda m: print(f"[{NAME}] {m}", flush=True)) if progress else (lambda m: None)

    gen, gen_record = data.resolve_sampling(cfg.generation, lm.name)
    cfg = dataclasses.replace(cfg, generation=gen)
    if writer:
        (out / "generation.json").write_text(json.dumps(gen_record, indent=1))
    say(f"sampling: {gen_record['note']}")
    train, test = data.load_notes(cfg.notes, lm.tokenizer)
    say(f"{len(train)} training and {len(test)} test notes ({cfg.notes.source}); tasks {', '.join(cfg.prompt.tasks)}")
    t = time.time()
    common.writer_only("base answers", lambda: steps.answer_base_and_source(cfg, lm, train, test, out, progress,
                                                                             say))
    timing["generate_base_s"] = time.time() - t

    paras = None
    if cfg.paraphrase.model:
        t = time.time()
        common.writer_only("paraphrase", lambda: steps.paraphrase(cfg, lm, list(train) + list(test), out, progress,
                                                                  say))
        paras = steps.paraphrase(cfg, lm, list(train) + list(test), out, progress, say)    # from its file now
        if cfg.paraphrase.injection:
            common.writer_only("paraphrased answers",
                               lambda: steps.answer_paraphrased(cfg, lm, test, paras, out, progress, say))
        timing["paraphrase_s"] = time.time() - t
    t = time.time()
    lm = None      # training needs only `glm`: a multi-host job frees its per-process copy meanwhile (rebuilt below)
    result, table, pool = steps.fine_tune(cfg, glm, train, out, resume, progress, say, paras,
                                          loaded_mesh=(mesh, n_assumed))
    timing["train_s"], timing["train_steps"] = time.time() - t, result.steps
    if writer:
        (out / "data.json").write_text(json.dumps({
            "train_ids": [n.id for n in train], "test_ids": [n.id for n in test], "pool": to_json(pool.stats),
            "pool_hash": pool.data_hash, "num_variants": len(table), "base": {"name": glm.name, "fingerprint": glm.fingerprint, "quant": cfg.quant},
            "synthetic_notes": cfg.notes.source == "synthetic", "generation": gen_record}, indent=1))
    lm = common.process_local(glm)

    t = time.time()
    steps.answer_fine_tuned(cfg, lm, test, result, table, pool, out, progress, say)    # split over processes
    timing["generate_variants_s"] = time.time() - t
    t = time.time()
    steps.capability(cfg, lm, result, table, out, progress, say)
    timing["capability_s"] = time.time() - t
    if cfg.grader.judge:
        t = time.time()
        common.writer_only("judge", lambda: steps.judge(cfg, lm, out, progress, say))
        timing["judge_s"] = time.time() - t
    if not writer:
        return 0
    timing["total_before_report_s"] = time.time() - t_start
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    report(out)
    timing["total_s"] = time.time() - t_start
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    say(f"done in {timing['total_s']:.0f} s: {out / 'report.md'}")
    return 0


def report(run_dir) -> int:
    """Regrade the saved answers and rebuild every table, plot and the report (no model, no training)."""
    from jaxpoison.studies.attacks.report import build_report
    return build_report(pathlib.Path(run_dir))

