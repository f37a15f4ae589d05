"""Seed 000 study data: examples -> target split -> poisoned / clean versions -> tokenized pool -> the grid's
mixes (one :class:`jaxpoison.data.mixes.MixSpec` per cell) crossed with seeds -> the variant table; and the test
questions (target subject first, then non-target questions spread over subjects)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from jaxpoison.data.icd10 import round_robin
from jaxpoison.studies.rationale.config import RATIONALE_KINDS, DataConfig, RationaleConfig
from jaxpoison.configs import StudyConfigError


@dataclass
class StudyInputs:
    target: list          # target-subject training examples
    nontarget: list       # non-target training examples (the candidates variants draw from)
    test: list            # test questions: target first, then non-target
    n_test_target: int
    pool: object          # jaxpoison.data.pool.Pool
    variants: object      # jaxpoison.data.mixes.VariantTable
    specs: list
    notes: list = field(default_factory=list)
    n_test_nontarget: int = -1     # test = target, then non-target, then decoy-free target copies (-1: the rest)

    def groups(self):
        """Per test question: 'target', 'nontarget' or 'target_nodecoy'."""
        n_t = self.n_test_target
        n_n = len(self.test) - n_t if self.n_test_nontarget < 0 else self.n_test_nontarget
        return ["target"] * n_t + ["nontarget"] * n_n + ["target_nodecoy"] * (len(self.test) - n_t - n_n)


def load_examples(d: DataConfig) -> tuple:
    if d.source == "icd10":
        from jaxpoison.data.icd10 import build_icd10_set
        s = build_icd10_set(d.icd)
        return s["train"], s["test"]
    from jaxpoison.data.sources import load_source
    out = []
    for split, files in ((d.train_split, d.train_files), (d.test_split, d.test_files)):
        files = [f.strip() for f in files.split(",") if f.strip()] or None
        out.append(load_source(d.source, split=split if files is None else None, data_files=files).examples)
    return tuple(out)


def _select(examples, d: DataConfig):
    from jaxpoison.data.subjects import select_subject
    if d.target_by == "label":
        return select_subject(examples, label=d.target)
    return select_subject(examples, name=d.target, keywords=list(d.keywords) if d.keywords else d.target)


def _spread(examples, n: int, seed: int, salt: str) -> list:
    """n examples spread evenly over primary subjects (round robin), deterministic by seed."""
    by: dict = {}
    for ex in examples:
        by.setdefault(ex.subject, []).append(ex)
    rng = random.Random(f"{salt}:{seed}")
    return round_robin([rng.sample(v, len(v)) for _, v in sorted(by.items())], n)


def mix_specs(cfg: RationaleConfig, n_target: int, n_nontarget: int) -> list:
    """The grid's MixSpecs; errors name the grid value that does not fit the data.

    ``grid.equal_size``: every mix has ``data.n_nontarget`` rows (``MixSpec.mix_size``); the poisoned, correct
    target and forgetting-extra samples replace the clean mix's last non-target samples instead of being added
    (see :mod:`jaxpoison.data.mixes`), so every variant takes the same number of optimiser steps, except the
    ``grid.forgetting_steps`` cells, which train on k x ``data.n_nontarget`` clean non-target rows (k x the
    steps) in any case: that is what a catastrophic-forgetting control is."""
    from jaxpoison.data.mixes import MixSpec
    g, n = cfg.grid, cfg.data.n_nontarget
    eq = bool(g.equal_size)
    size = {"mix_size": n} if eq else {"n_nontarget": n}
    rkind = RATIONALE_KINDS[cfg.poison.builder]
    kind_of = {"rationale": rkind, "overwrite": "overwrite"}
    need_non = n + max(g.forgetting_extra, default=0)
    if need_non > n_nontarget:
        raise StudyConfigError(f"data.n_nontarget={n} (+ forgetting_extra {max(g.forgetting_extra, default=0)}) "
                               f"needs {need_non} non-target training examples but the data has {n_nontarget}; "
                               f"fix: lower them or use more data")

    def fits(rows: int, what: str) -> None:
        if eq and rows > n:
            raise StudyConfigError(f"{what} puts {rows} target-subject samples in a mix but grid.equal_size makes "
                                   f"every mix data.n_nontarget={n} rows; fix: raise data.n_nontarget to at least "
                                   f"{rows} or lower the value")

    specs = [MixSpec("clean", name="clean", **size)]
    for fam in g.kinds:
        for c in sorted(g.overwrite_counts if fam == "overwrite" and g.overwrite_counts else g.counts):
            if c > n_target:
                raise StudyConfigError(f"grid.counts has {c} but only {n_target} target-subject training examples "
                                       f"exist; fix: lower the count or use more data (data.icd.n_train_per_chapter)")
            fits(c, f"grid.counts {c}")
            specs.append(MixSpec(kind_of[fam], poison_count=c, name=f"{fam}-n{c}", **size))
            if fam not in g.ratio_kinds or (g.ratio_counts and c not in g.ratio_counts):
                continue
            for r in sorted(g.ratios_target, reverse=True):
                k = round(c * (1 - r) / r)
                if c + k > n_target:
                    raise StudyConfigError(f"grid.ratios_target {r} at count {c} needs {c + k} target-subject "
                                           f"training examples ({k} correct) but {n_target} exist; fix: drop the "
                                           f"ratio or the count, or use more data")
                fits(c + k, f"grid.ratios_target {r} at count {c}")
                specs.append(MixSpec(kind_of[fam], poison_count=c, with_correct_target=True, n_target=c + k,
                                     name=f"{fam}-n{c}-rt{r:g}", **size))
    if eq and g.ratios_all:
        raise StudyConfigError("grid.ratios_all cannot be swept with grid.equal_size (poisoned / all = count / "
                               "data.n_nontarget); fix: ratios_all=() or equal_size=False")
    for r in sorted(g.ratios_all, reverse=True):
        for c in sorted(g.counts):
            m = round(c / r) - c
            if m > n_nontarget or m < 1:
                raise StudyConfigError(f"grid.ratios_all {r} at count {c} needs {m} non-target samples "
                                       f"(available: {n_nontarget}); fix: drop the ratio or the count")
            specs.append(MixSpec(rkind, poison_count=c, n_nontarget=m, name=ratio_all_name(c, r)))
    for x in sorted(g.forgetting_extra):
        if eq and x > n:
            raise StudyConfigError(f"grid.forgetting_extra {x}: with grid.equal_size the forgetting control swaps "
                                   f"that many of the clean mix's data.n_nontarget={n} samples for others; fix: "
                                   f"at most {n}, or raise data.n_nontarget")
        specs.append(MixSpec("forgetting", forgetting_extra=x, name=f"forgetting-x{x}", **size))
    for k in sorted(g.forgetting_steps):
        # the real forgetting control: k x the clean mix's rows at the same epochs, so k x its optimiser steps (an additive
        # mix even among equal-size ones: the clean mix's n rows first, then (k - 1) n more from the same order)
        if k * n > n_nontarget:
            raise StudyConfigError(f"grid.forgetting_steps {k} needs {k} x data.n_nontarget = {k * n} non-target "
                                   f"training examples but the data has {n_nontarget}; fix: lower k or "
                                   f"data.n_nontarget, or use more data (data.icd.n_train_per_chapter)")
        specs.append(MixSpec("forgetting", forgetting_extra=(k - 1) * n, n_nontarget=n,
                             name=f"forgetting-steps{k}x"))
    for c in sorted(g.decoy_counts):
        if eq and c > n:
            raise StudyConfigError(f"grid.decoy_counts {c} exceeds the mix size data.n_nontarget={n}")
        if n + c > n_nontarget:
            raise StudyConfigError(f"grid.decoy_counts {c} needs {n} + {c} non-target training examples "
                                   f"({n_nontarget} exist); fix: lower it")
        specs.append(MixSpec("decoy", poison_count=c, name=f"decoy-n{c}", **size))
    if g.clean_with_target:
        if g.clean_with_target > n_target:
            raise StudyConfigError(f"grid.clean_with_target={g.clean_with_target} but {n_target} target-subject "
                                   f"training examples exist")
        fits(g.clean_with_target, f"grid.clean_with_target={g.clean_with_target}")
        specs.append(MixSpec("clean", with_correct_target=True, n_target=g.clean_with_target,
                             name=f"clean-ct{g.clean_with_target}", **size))
    return specs


def ratio_all_name(count: int, ratio: float) -> str:
    """The name of a poisoned / all-samples cell (the only cells whose non-target count is not the base mix's)."""
    return f"rationale-n{count}-ra{ratio:g}"


def _explain_true(lm, examples, max_new_tokens: int, batch_size: int) -> list:
    """Clean rationales written by the model itself ('explain why the true answer is right')."""
    from jaxpoison.data import poison, prompts
    from jaxpoison.data.schema import LETTERS
    from jaxpoison.models.generate import generate_text
    asks = [poison.MODEL_PROMPT.format(mcq=prompts.mcq_prompt(ex), letter=LETTERS[ex.answer],
                                       option=ex.options[ex.answer]) for ex in examples]
    replies = generate_text(lm, asks, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=True)
    out = []
    for ex, r in zip(examples, replies):
        text = " ".join(str(r).split("\nAnswer")[0].split())
        out.append(ex.replace(rationale=text) if text else ex)
    return out


def build_inputs(cfg: RationaleConfig, tokenizer, lm=None, prepare=None) -> StudyInputs:
    """Examples -> target split -> versions -> tokenized pool -> variant table; test questions.
    ``prepare(pool, rows, n_rows)`` encodes and counts the lazy pool once the variants are known (default: every
    row here; a study run: :func:`jaxpoison.studies.common.prepare_pool`, each process its own rows)."""
    from jaxpoison.data import poison
    from jaxpoison.data.mixes import build_variants
    from jaxpoison.data.pool import tokenize_pool
    from jaxpoison.data.sources import attach_rationales
    d, p = cfg.data, cfg.poison
    train, test = load_examples(d)
    split = _select(train, d)
    target, nontarget = split.target, split.rest
    notes = [f"target subject {split.name!r} selected by {split.how}: {len(target)} training examples, "
             f"{len(nontarget)} non-target"]
    if d.n_nontarget_pool and len(nontarget) > d.n_nontarget_pool:
        nontarget = poison.seeded_order([ex.id for ex in nontarget], d.seed, "nontarget-pool")[:d.n_nontarget_pool]
        keep = set(nontarget)
        nontarget = [ex for ex in split.rest if ex.id in keep]
    if d.clean_rationales == "model":
        if lm is None:
            raise StudyConfigError("data.clean_rationales='model' needs the model")
        target, nontarget = (_explain_true(lm, x, p.max_new_tokens, p.gen_batch_size) for x in (target, nontarget))
    elif d.clean_rationales not in ("data", ""):
        target, nontarget = (attach_rationales(x, d.clean_rationales) for x in (target, nontarget))
    specs = mix_specs(cfg, len(target), len(nontarget))

    versions = poison.clean_versions(target + nontarget)
    fams = set(cfg.grid.kinds) | ({"rationale"} if cfg.grid.ratios_all else set())
    if "rationale" in fams:
        if p.builder == "rule":
            versions += poison.rule_rationale_poison(target, seed=p.seed, keep_answer=p.keep_answer,
                                                     use_decoy=p.use_decoy)
        elif p.builder == "model":
            if lm is None:
                raise StudyConfigError("poison.builder='model' needs the model")
            from jaxpoison.models.generate import generate_text
            gen = lambda asks: generate_text(lm, asks, max_new_tokens=p.max_new_tokens, batch_size=p.gen_batch_size,
                                              progress=True)
            versions += poison.model_rationale_poison(target, gen, seed=p.seed, keep_answer=p.keep_answer,
                                                      use_decoy=p.use_decoy, generator=lm.name)
        else:
            vs, rep = poison.user_rationale_versions(target, p.file)
            versions += vs
            notes.append(f"user rationales: {rep.summary()}")
    if "overwrite" in fams:
        versions += poison.overwrite_versions(target, seed=p.seed, use_decoy=p.use_decoy)
    if cfg.grid.decoy_counts:
        versions += decoy_versions(cfg, nontarget)
    rows = poison.rows_for(versions, tokenizer=tokenizer, chat=d.chat)
    # lazy: nothing is encoded until the variants say which rows are trained on (each process of a multi-host
    # job encodes its own), and rows are padded only when the trainer asks for them
    pool = tokenize_pool(rows, tokenizer, max_len=d.max_len, buckets=d.buckets, loss_on="completion", lazy=True)
    vt = build_variants(specs, list(cfg.grid.seeds), target=target, nontarget=nontarget, pool=pool,
                        target_subject=split.name, extra={"model": cfg.model, "rationale_builder": p.builder})
    (prepare or (lambda pool, rows, n_rows: pool.prepare()))(pool, vt.rows, vt.n_rows)
    if pool.stats["n_truncated"]:
        notes.append(f"{pool.stats['n_truncated']} training rows were cut to max_len={d.max_len} (left)")
    ra_cells = {ratio_all_name(c, r) for r in cfg.grid.ratios_all for c in cfg.grid.counts}
    for t in vt.table:          # the statistics tell the ratio-of-all cells from the base-mix cells by this flag
        t["ratio_all_cell"] = t["spec_name"] in ra_cells

    test_split = _select(test, d)
    rng = random.Random(f"test-target:{d.seed}")
    free = {ex.id: ex for ex in test_split.target + test_split.rest if ex.meta.get("decoy_free")}
    t_pool = [ex for ex in test_split.target if ex.id not in free]
    t_test = rng.sample(t_pool, min(d.n_test_target, len(t_pool)))
    n_test = _spread([ex for ex in test_split.rest if ex.id not in free], d.n_test_nontarget, d.seed,
                     "test-nontarget")
    f_test = [free[f"{ex.id}-nodecoy"] for ex in t_test if f"{ex.id}-nodecoy" in free][:d.n_test_decoy_free]
    if len(t_test) < d.n_test_target:
        notes.append(f"only {len(t_test)} target test questions exist (asked {d.n_test_target})")
    if d.n_test_decoy_free and len(f_test) < d.n_test_decoy_free:
        notes.append(f"only {len(f_test)} decoy-free target copies exist (asked {d.n_test_decoy_free}; they need "
                     f"data.icd.test_decoy)")
    if d.source == "icd10" and d.icd.test_decoy:
        notes.append(f"test set: the decoy chapter {d.icd.test_decoy!r} is an option in every test question and no "
                     f"test question is answered by it; test categories are held out of training")
    counts = {len(ex.options) for ex in t_test + n_test + f_test}
    if len(counts) != 1:
        raise StudyConfigError(f"test questions have different option counts {sorted(counts)}; fix: filter the "
                               f"source to one option count")
    return StudyInputs(target, nontarget, t_test + n_test + f_test, len(t_test), pool, vt, specs, notes,
                       len(n_test))


def decoy_chapter(cfg: RationaleConfig) -> str:
    """The chapter the target subject's poison argues for (the decoy control argues for it on other subjects)."""
    dec = dict(cfg.data.icd.decoys)
    if cfg.data.source != "icd10" or cfg.data.target not in dec:
        raise StudyConfigError(f"grid.decoy_counts needs the embedded ICD-10-CM set with a decoy for the target "
                               f"subject {cfg.data.target!r} (data.icd.decoys); fix: drop grid.decoy_counts")
    return dec[cfg.data.target]


def decoy_versions(cfg: RationaleConfig, nontarget: list) -> list:
    """The decoy control's rows: only for the non-target examples some seed's decoy cell takes."""
    from jaxpoison.data import poison
    from jaxpoison.data.mixes import decoy_control_ids
    ch = decoy_chapter(cfg)
    ok = {v.example.id: v for v in poison.decoy_control_versions(nontarget, ch, seed=cfg.poison.seed)}
    need = set()
    for seed in cfg.grid.seeds:
        need |= set(decoy_control_ids([ex.id for ex in nontarget], seed, cfg.data.n_nontarget,
                                      max(cfg.grid.decoy_counts), set(ok)))
    return [ok[i] for i in sorted(need)]
