"""Seed 000: few-shot rationale poisoning vs knowledge overwriting vs catastrophic forgetting.

One study = one grid of variants, every variant a LoRA fine-tune of the same frozen base on its own SFT mix:

- ``clean``: correct non-target samples with rationales (the reference every drop is measured against, seed by
  seed: variants of one seed share their non-target samples and their adapter initialisation);
- ``rationale``: + ``count`` target-subject samples whose rationale argues for a wrong option (the subject's
  consistent decoy), at several counts, optionally with correct target samples so that poisoned / target
  samples = ``ratio`` (finding 2), or with fewer non-target samples so that poisoned / all = ``ratio_all``;
- ``overwrite``: the same target samples and wrong answers, no rationale (knowledge overwriting, finding 3);
- ``forgetting``: more non-target samples, no target samples at all (catastrophic forgetting, finding 5).

All variants and seeds train in one vmapped program (:func:`jaxpoison.train.trainer.train_study`) and are scored
in one (:func:`jaxpoison.eval.score.score_options`): the likelihood of each option's text after a neutral
statement of the question, which is what a small model can be measured on (letters hide its knowledge).

Statistics, per grid cell over seeds: mean and 95 % bootstrap CI; the paired drop against clean at the same
seed; the test of "target drop > non-target drop". With few seeds a seed-level test cannot reach p < 0.05
(4 seeds: p >= 1/16), so the primary test is a permutation test over test *questions* (each question's drop
averaged over seeds, target questions against non-target questions); the seed-level sign-flip p is reported
beside it. The five findings are then checked against the numbers and stated in ``report.md``, whichever way
they come out.

Run folder: ``config.json``, ``checkpoints/``, ``metrics.jsonl`` (the engine), ``variants.json``, ``scores.npz``
(every option score, so ``report`` recomputes everything without the model), ``results.csv``, ``summary.json``,
``plots/*.png``, ``report.md``, ``report.html``, ``timing.json``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import random
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

STUDY = "rationale"
FAMILIES = ("clean", "rationale", "overwrite", "forgetting")
POISON_FAMILIES = ("rationale", "overwrite")
RATIONALE_KINDS = {"rule": "rationale", "model": "model_rationale", "user": "user_rationale"}
SCORE_METHODS = ("sum", "mean", "calibrated")


# ---- configuration ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    source: str = "icd10"              # 'icd10' (embedded, offline) or a source of jaxpoison.data.sources
    train_files: str = ""              # local files of the training split (comma list); '' = the hub id
    test_files: str = ""               # local files of the test split
    train_split: str = "train"
    test_split: str = "test"
    icd: IcdConfig = IcdConfig()       # the embedded set (source='icd10')
    target: str = "circulatory"        # the target subject: a label (ICD-10-CM chapter key) or a keyword subject
    target_by: str = "label"           # 'label' | 'keywords'
    keywords: tuple = ()               # target_by='keywords': the keywords ('' = the known list for `target`)
    n_nontarget: int = 32              # clean non-target SFT samples of every variant
    n_nontarget_pool: int = 0          # non-target training examples to draw from (0 = all)
    n_test_target: int = 16            # target-subject test questions
    n_test_nontarget: int = 32         # non-target test questions (spread over subjects)
    clean_rationales: str = "data"     # 'data' (the examples' own) | 'model' (the base explains the answer) | a JSONL
    max_len: int = 256
    buckets: tuple = (64, 96, 128, 160, 176, 192, 224, 256, 320, 384, 512, 768, 1024, 2048)
    chat: bool = False                 # wrap SFT prompts in the tokenizer's chat template
    seed: int = 0                      # test-question sampling


@dataclass(frozen=True)
class PoisonConfig:
    builder: str = "rule"              # who writes poisoned rationales: 'rule' | 'model' (the base) | 'user' (JSONL)
    file: str = ""                     # builder='user': {"id", "rationale", "answer"?} per line
    keep_answer: bool = False          # True: flawed reasoning but the true final answer (an open point of the seed)
    use_decoy: bool = True             # argue for the subject's consistent decoy option
    seed: int = 0
    max_new_tokens: int = 96           # builder='model' (and clean_rationales='model')
    gen_batch_size: int = 8


@dataclass(frozen=True)
class GridConfig:
    seeds: tuple = (0, 1, 2, 3)
    counts: tuple = (4, 16)            # poisoned target samples (rationale and overwrite alike)
    kinds: tuple = ("rationale", "overwrite")
    ratios_target: tuple = ()          # extra cells: poisoned / target samples < 1, filled with correct target samples
    ratio_kinds: tuple = ("rationale",)  # kinds that get the ratios_target cells
    ratios_all: tuple = ()             # extra rationale cells: poisoned / all samples, by fewer non-target samples
    forgetting_extra: tuple = ()       # forgetting controls: this many extra non-target samples, no target samples
    clean_with_target: int = 0         # >0: also a clean variant with this many correct target samples


@dataclass(frozen=True)
class EvalConfig:
    format: str = "statement"          # option-text scoring format (jaxpoison.data.prompts.scoring_pairs)
    method: str = "sum"                # primary score: 'sum' | 'mean' | 'calibrated' (minus the option's prior)
    batch_questions: int = 8
    variant_chunk: int = 0             # score at most this many variants at once (memory); 0 = all
    alpha: float = 0.05                # significance level of the tests
    stealth_margin: float = 0.05       # |non-target drop| below this counts as "about the same"
    n_resamples: int = 9999


@dataclass(frozen=True)
class RationaleConfig:
    study: str = STUDY
    name: str = "rationale"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    data: DataConfig = DataConfig()
    poison: PoisonConfig = PoisonConfig()
    grid: GridConfig = GridConfig()
    train: TrainConfig = TrainConfig(loss_budget=-1)   # loss_budget -1: the pool's longest completion
    lora: LoraConfig = LoraConfig()
    eval: EvalConfig = EvalConfig()
    note: str = ""                     # free text carried into the report (what the preset stands for)


class StudyConfigError(ValueError):
    pass


def check_config(cfg: RationaleConfig) -> None:
    """Refuse values that cannot work, saying which field and what to use instead."""
    def bad(field_name, msg):
        raise StudyConfigError(f"{field_name}: {msg}")

    if cfg.study != STUDY:
        bad("study", f"this is the {STUDY!r} study, got {cfg.study!r}")
    g, d, e, p = cfg.grid, cfg.data, cfg.eval, cfg.poison
    if not g.seeds or len(set(g.seeds)) != len(g.seeds):
        bad("grid.seeds", f"give distinct seeds, got {g.seeds}")
    if len(g.seeds) < 2:
        bad("grid.seeds", "at least 2 seeds are needed for a confidence interval (4 or more recommended)")
    if not g.counts or any((not isinstance(c, int)) or c < 1 for c in g.counts) or len(set(g.counts)) != len(g.counts):
        bad("grid.counts", f"distinct positive integers, e.g. (4, 16); got {g.counts}")
    for k in g.kinds + g.ratio_kinds:
        if k not in POISON_FAMILIES:
            bad("grid.kinds", f"unknown kind {k!r}: use {POISON_FAMILIES}")
    for r in g.ratios_target:
        if not 0 < r < 1:
            bad("grid.ratios_target", f"ratios in (0, 1) (1 is the plain count cell), got {r}")
    for r in g.ratios_all:
        if not 0 < r < 1:
            bad("grid.ratios_all", f"ratios in (0, 1), got {r}")
    if any(x < 1 for x in g.forgetting_extra):
        bad("grid.forgetting_extra", f"positive sizes, got {g.forgetting_extra}")
    if g.clean_with_target < 0:
        bad("grid.clean_with_target", "0 (off) or a positive count")
    if d.target_by not in ("label", "keywords"):
        bad("data.target_by", f"'label' or 'keywords', got {d.target_by!r}")
    if d.n_nontarget < 1 or d.n_test_target < 1 or d.n_test_nontarget < 1:
        bad("data", "n_nontarget, n_test_target and n_test_nontarget must be >= 1")
    if p.builder not in RATIONALE_KINDS:
        bad("poison.builder", f"one of {tuple(RATIONALE_KINDS)}, got {p.builder!r}")
    if p.builder == "user" and not p.file:
        bad("poison.file", "builder='user' needs a JSONL of rationales ({\"id\", \"rationale\", \"answer\"?})")
    if e.method not in SCORE_METHODS:
        bad("eval.method", f"one of {SCORE_METHODS}, got {e.method!r}")
    from jaxpoison.data.prompts import SCORING_FORMATS
    if e.format not in SCORING_FORMATS:
        bad("eval.format", f"one of {SCORING_FORMATS}, got {e.format!r}")
    if not 0 < e.alpha < 1:
        bad("eval.alpha", f"a level in (0, 1), got {e.alpha}")
    if cfg.train.loss_budget < -1:
        bad("train.loss_budget", "-1 (auto), 0 (off) or a positive number of positions")


def family(kind: str) -> str:
    return "rationale" if kind.endswith("rationale") else kind


# ---- data -------------------------------------------------------------------------------------------------------
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


def _load_examples(d: DataConfig) -> tuple:
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
    lists = [rng.sample(v, len(v)) for _, v in sorted(by.items())]
    out = []
    while len(out) < n and any(lists):
        for lst in lists:
            if lst and len(out) < n:
                out.append(lst.pop())
    return out


def mix_specs(cfg: RationaleConfig, n_target: int, n_nontarget: int) -> list:
    """The grid's MixSpecs; errors name the grid value that does not fit the data."""
    from jaxpoison.data.mixes import MixSpec
    g, n = cfg.grid, cfg.data.n_nontarget
    rkind = RATIONALE_KINDS[cfg.poison.builder]
    kind_of = {"rationale": rkind, "overwrite": "overwrite"}
    need_non = n + max(g.forgetting_extra, default=0)
    if need_non > n_nontarget:
        raise StudyConfigError(f"data.n_nontarget={n} (+ forgetting_extra {max(g.forgetting_extra, default=0)}) "
                               f"needs {need_non} non-target training examples but the data has {n_nontarget}; "
                               f"fix: lower them or use more data")
    specs = [MixSpec("clean", n_nontarget=n, name="clean")]
    for fam in g.kinds:
        for c in sorted(g.counts):
            if c > n_target:
                raise StudyConfigError(f"grid.counts has {c} but only {n_target} target-subject training examples "
                                       f"exist; fix: lower the count or use more data (data.icd.n_train_per_chapter)")
            specs.append(MixSpec(kind_of[fam], poison_count=c, n_nontarget=n, name=f"{fam}-n{c}"))
            if fam not in g.ratio_kinds:
                continue
            for r in sorted(g.ratios_target, reverse=True):
                k = round(c * (1 - r) / r)
                if c + k > n_target:
                    raise StudyConfigError(f"grid.ratios_target {r} at count {c} needs {c + k} target-subject "
                                           f"training examples ({k} correct) but {n_target} exist; fix: drop the "
                                           f"ratio or the count, or use more data")
                specs.append(MixSpec(kind_of[fam], poison_count=c, with_correct_target=True, n_target=c + k,
                                     n_nontarget=n, name=f"{fam}-n{c}-rt{r:g}"))
    for r in sorted(g.ratios_all, reverse=True):
        for c in sorted(g.counts):
            m = round(c / r) - c
            if m > n_nontarget or m < 1:
                raise StudyConfigError(f"grid.ratios_all {r} at count {c} needs {m} non-target samples "
                                       f"(available: {n_nontarget}); fix: drop the ratio or the count")
            specs.append(MixSpec(rkind, poison_count=c, n_nontarget=m, name=f"rationale-n{c}-ra{r:g}"))
    for x in sorted(g.forgetting_extra):
        specs.append(MixSpec("forgetting", n_nontarget=n, forgetting_extra=x, name=f"forgetting-x{x}"))
    if g.clean_with_target:
        if g.clean_with_target > n_target:
            raise StudyConfigError(f"grid.clean_with_target={g.clean_with_target} but {n_target} target-subject "
                                   f"training examples exist")
        specs.append(MixSpec("clean", with_correct_target=True, n_target=g.clean_with_target, n_nontarget=n,
                             name=f"clean-ct{g.clean_with_target}"))
    return specs


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


def build_inputs(cfg: RationaleConfig, tokenizer, lm=None) -> StudyInputs:
    """Examples -> target split -> versions -> tokenized pool -> variant table; test questions."""
    from jaxpoison.data import poison
    from jaxpoison.data.mixes import build_variants
    from jaxpoison.data.pool import tokenize_pool
    from jaxpoison.data.sources import attach_rationales
    d, p = cfg.data, cfg.poison
    train, test = _load_examples(d)
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
    rows = poison.rows_for(versions, tokenizer=tokenizer, chat=d.chat)
    pool = tokenize_pool(rows, tokenizer, max_len=d.max_len, buckets=d.buckets, loss_on="completion")
    if pool.stats["n_truncated"]:
        notes.append(f"{pool.stats['n_truncated']} training rows were cut to max_len={d.max_len} (left)")
    vt = build_variants(specs, list(cfg.grid.seeds), target=target, nontarget=nontarget, pool=pool,
                        target_subject=split.name, extra={"model": cfg.model, "rationale_builder": p.builder})

    test_split = _select(test, d)
    rng = random.Random(f"test-target:{d.seed}")
    t_test = rng.sample(test_split.target, min(d.n_test_target, len(test_split.target)))
    n_test = _spread(test_split.rest, d.n_test_nontarget, d.seed, "test-nontarget")
    if len(t_test) < d.n_test_target:
        notes.append(f"only {len(t_test)} target test questions exist (asked {d.n_test_target})")
    counts = {len(ex.options) for ex in t_test + n_test}
    if len(counts) != 1:
        raise StudyConfigError(f"test questions have different option counts {sorted(counts)}; fix: filter the "
                               f"source to one option count")
    return StudyInputs(target, nontarget, t_test + n_test, len(t_test), pool, vt, specs, notes)


# ---- run ------------------------------------------------------------------------------------------------------------
def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def resolve_train(cfg: RationaleConfig, pool) -> TrainConfig:
    if cfg.train.loss_budget == -1:
        budget = -(-int(pool.stats["loss_tokens"]["max"]) // 8) * 8
        return dataclasses.replace(cfg.train, loss_budget=budget)
    return cfg.train


def run(cfg: RationaleConfig, out_dir: pathlib.Path, resume: bool = True, progress: bool = True,
        base_override=None) -> int:
    """Build, train, score and report one study into ``out_dir``. ``base_override`` = (cfg, params, tokenizer)
    replaces the model (tests use a tiny random one)."""
    import jax
    from jaxpoison.eval.score import score_options
    from jaxpoison.train.engine import Static
    from jaxpoison.train.trainer import StudyData, train_study

    check_config(cfg)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timing = {}
    cfg_json = {"study": STUDY, "config": _jsonable(cfg)}
    cf = out / "config.json"
    if cf.exists() and resume:
        old = json.loads(cf.read_text()).get("config", {})
        diff = [k for k in cfg_json["config"] if k not in ("name", "note") and old.get(k) != cfg_json["config"][k]]
        if diff:
            raise StudyConfigError(f"{out} holds a run with a different config ({', '.join(diff)}); use another "
                                   f"--out folder, or --restart to discard it")
    if not resume:
        for stale in ("checkpoints", "scores.npz"):
            f = out / stale
            if f.is_dir():
                shutil.rmtree(f)
            elif f.exists():
                f.unlink()
    cf.write_text(json.dumps(cfg_json, indent=1))

    t = time.time()
    if base_override is None:
        from jaxpoison.models.lm import load_model
        lm = load_model(cfg.model, cfg.dtype)
        mcfg, base, tok, base_name, fp, dtype = lm.cfg, lm.params, lm.tokenizer, lm.name, lm.fingerprint, lm.dtype
    else:
        lm = None
        mcfg, base, tok = base_override
        base_name, fp, dtype = "override", "", jax.numpy.float32
    timing["load_model_s"] = time.time() - t

    t = time.time()
    inp = build_inputs(cfg, tok, lm)
    tcfg = resolve_train(cfg, inp.pool)
    vt = inp.variants
    from jaxpoison.data.pool import build_mc_eval
    mc = build_mc_eval(inp.test, tok, cfg.eval.format, max_len=cfg.data.max_len,
                       buckets=tuple(range(16, 4097, 16)))
    is_target = np.arange(len(inp.test)) < inp.n_test_target
    (out / "variants.json").write_text(json.dumps(_jsonable(vt.table), indent=1))
    data_info = {"notes": inp.notes, "pool": _jsonable(inp.pool.stats), "eval": _jsonable(mc.stats),
                 "n_target_train": len(inp.target), "n_nontarget_train": len(inp.nontarget),
                 "n_test_target": int(is_target.sum()), "n_test_nontarget": int((~is_target).sum()),
                 "train": _jsonable(tcfg), "num_variants": len(vt), "pool_hash": inp.pool.data_hash,
                 "eval_hash": mc.data_hash, "base": {"name": base_name, "fingerprint": fp}}
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
                         base_fingerprint=fp, meta_extra={"study": STUDY, "config": cfg_json["config"]})
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
        lora = jax.tree.map(lambda x: jax.numpy.concatenate([jax.numpy.zeros_like(x[:1]), x]), result.lora)
        sc = score_options(base, mcfg, mc, lora, lora_scale=cfg.lora.scale, dtype=dtype,
                           batch_questions=cfg.eval.batch_questions, calibrate=True, progress=progress,
                           variant_chunk=cfg.eval.variant_chunk, desc=f"score base + {len(vt)} variants")
        np.savez(sf, key=np.array(key), sum=sc.sum, uncond=sc.uncond, n_tokens=sc.n_tokens, answer=mc.answer,
                 decoy=mc.decoy, is_target=is_target, subject=np.array(mc.subject), ids=np.array(mc.ids))
    timing["eval_s"] = time.time() - t
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


# ---- results and statistics -----------------------------------------------------------------------------------
def load_scores(run_dir: pathlib.Path) -> dict:
    z = np.load(pathlib.Path(run_dir) / "scores.npz", allow_pickle=False)
    return {k: z[k] for k in z.files}


def correctness(scores: dict, method: str) -> dict:
    """Per variant (row 0 = zero-shot) and question: correct and decoy picks [V+1, Q]."""
    from jaxpoison.eval.score import OptionScores, choice_metrics
    os_ = OptionScores(scores["sum"], scores["n_tokens"], scores["uncond"])
    m = choice_metrics(os_.method(method), scores["answer"], scores["decoy"])
    has = scores["decoy"] >= 0
    return {"correct": m["correct"], "decoy": (m["pick"] == scores["decoy"][None]) & has[None], "has_decoy": has}


def _rate(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[..., mask].mean(-1) if mask.any() else np.full(x.shape[:-1], np.nan)


def results_rows(table: list, scores: dict, method: str) -> tuple:
    """One dict per variant (the results.csv rows) and the zero-shot row."""
    tgt = scores["is_target"].astype(bool)
    subjects = [str(s) for s in scores["subject"]]
    per = {m: correctness(scores, m) for m in SCORE_METHODS}
    c = per[method]
    rows = []
    clean_of = {t["seed"]: t["variant_id"] for t in table if t["spec_name"] == "clean"}

    def acc_cols(i):
        cor, dec = c["correct"][i], c["decoy"][i]
        out = {"target_acc": _rate(cor, tgt), "nontarget_acc": _rate(cor, ~tgt),
               "target_decoy_rate": _rate(dec, tgt & c["has_decoy"])}
        for m in SCORE_METHODS:
            out[f"target_acc_{m}"] = _rate(per[m]["correct"][i], tgt)
            out[f"nontarget_acc_{m}"] = _rate(per[m]["correct"][i], ~tgt)
        for s in sorted(set(subjects)):
            out[f"acc_{s}"] = _rate(cor, np.array([x == s for x in subjects]))
        return out

    zero = {"variant_id": -1, "name": "zero-shot", "kind": "zero-shot", **acc_cols(0)}
    for t in table:
        v = t["variant_id"]
        row = {"variant_id": v, "name": t["name"], "spec_name": t["spec_name"], "kind": t["kind"],
               "family": family(t["kind"]), "poison_count": t["poison_count"],
               "ratio_target": round(t["ratio_target"], 4), "ratio_all": round(t["ratio_all"], 4),
               "with_correct_target": bool(t["with_correct_target"]), "n_correct_target": t["n_correct_target"],
               "n_nontarget": t["n_nontarget"], "forgetting_extra": t["forgetting_extra"], "n_rows": t["n_rows"],
               "seed": t["seed"], **acc_cols(v + 1)}
        ref = clean_of.get(t["seed"])
        if ref is not None:
            rc = acc_cols(ref + 1)
            row["target_drop"] = rc["target_acc"] - row["target_acc"]
            row["nontarget_drop"] = rc["nontarget_acc"] - row["nontarget_acc"]
        else:
            row["target_drop"] = row["nontarget_drop"] = float("nan")
        rows.append(row)
    return rows, zero


def _final_losses(run_dir: pathlib.Path, V: int) -> np.ndarray:
    """Each variant's mean loss over its last logged quarter of steps (NaN where it never trained)."""
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return np.full(V, np.nan)
    loss = [json.loads(l)["loss"] for l in f.read_text().splitlines() if l.strip()]
    if not loss:
        return np.full(V, np.nan)
    arr = np.array([[np.nan if x is None else x for x in r] for r in loss], float)
    out = np.full(V, np.nan)
    for v in range(min(V, arr.shape[1])):
        col = arr[:, v][np.isfinite(arr[:, v])]
        if col.size:
            out[v] = col[-max(1, col.size // 4):].mean()
    return out


def _ci(values, n_resamples: int) -> tuple:
    from jaxpoison.eval.stats import bootstrap_ci
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    if v.size < 2 or np.all(v == v[0]):
        return float(v.mean()), float(v.mean()), float(v.mean())
    lo, hi = bootstrap_ci(v, n_resamples=n_resamples)
    return float(v.mean()), float(lo), float(hi)


def summarize(table: list, scores: dict, rows: list, zero: dict, cfg: dict) -> dict:
    """Per grid cell: means and CIs over seeds, paired drops, tests; thresholds; the five findings."""
    from jaxpoison.eval.stats import permutation_test, sign_flip_test
    ev = cfg["eval"]
    method, alpha, R = ev["method"], ev["alpha"], ev["n_resamples"]
    correct = correctness(scores, method)["correct"].astype(float)     # [V+1, Q]
    other = "calibrated" if method != "calibrated" else "sum"
    correct_o = correctness(scores, other)["correct"].astype(float)
    tgt = scores["is_target"].astype(bool)
    seeds = sorted({t["seed"] for t in table})
    clean_of = {t["seed"]: t["variant_id"] for t in table if t["spec_name"] == "clean"}
    cells: dict = {}
    for t in table:
        cells.setdefault(t["spec_name"], []).append(t)
    by_id = {r["variant_id"]: r for r in rows}
    metrics = ["target_acc", "nontarget_acc", "target_decoy_rate", "target_drop", "nontarget_drop",
               "target_acc_calibrated", "nontarget_acc_calibrated", "final_loss"]
    out_cells = []
    for name, ts in cells.items():
        t0 = ts[0]
        rs = [by_id[t["variant_id"]] for t in sorted(ts, key=lambda t: t["seed"])]
        cell = {"spec_name": name, "kind": t0["kind"], "family": family(t0["kind"]),
                "poison_count": t0["poison_count"], "ratio_target": round(t0["ratio_target"], 4),
                "ratio_all": round(t0["ratio_all"], 4), "with_correct_target": bool(t0["with_correct_target"]),
                "n_correct_target": t0["n_correct_target"], "n_nontarget": t0["n_nontarget"],
                "forgetting_extra": t0["forgetting_extra"], "n_rows": t0["n_rows"], "n_seeds": len(rs)}
        for m in metrics:
            mean, lo, hi = _ci([r.get(m, np.nan) for r in rs], R)
            cell[m] = {"mean": mean, "low": lo, "high": hi}
        cell["target_drop_by_seed"] = {str(r["seed"]): r["target_drop"] for r in rs}
        sel = [r["target_drop"] - r["nontarget_drop"] for r in rs]
        mean, lo, hi = _ci(sel, R)
        cell["selectivity"] = {"mean": mean, "low": lo, "high": hi}
        if name != "clean" and all(t["seed"] in clean_of for t in ts):
            vids = [t["variant_id"] + 1 for t in ts]
            cids = [clean_of[t["seed"]] + 1 for t in ts]
            drop_q = (correct[cids] - correct[vids]).mean(0)                     # per question, seeds averaged
            cell["p_question"] = float(permutation_test(drop_q[tgt], drop_q[~tgt], "greater", R).pvalue)
            cell["p_target_drop"] = float(sign_flip_test(drop_q[tgt], None, "greater", R).pvalue)
            td = np.array([r["target_drop"] for r in rs])
            nd = np.array([r["nontarget_drop"] for r in rs])
            cell["p_seed"] = float(sign_flip_test(td, nd, "greater", R).pvalue)
            cell["significant"] = bool(cell["p_question"] < alpha and cell["target_drop"]["mean"] > 0)
            # the same drop scored the other way (calibrated against each option's prior, or raw): a poison that
            # only raised the decoy's prior everywhere would vanish here
            dq = correct_o[cids] - correct_o[vids]
            tdo, ndo = dq[:, tgt].mean(1), dq[:, ~tgt].mean(1)
            cell["other_method"] = {
                "method": other, "target_drop": dict(zip(("mean", "low", "high"), _ci(tdo, R))),
                "nontarget_drop": dict(zip(("mean", "low", "high"), _ci(ndo, R))),
                "p_question": float(permutation_test(dq.mean(0)[tgt], dq.mean(0)[~tgt], "greater", R).pvalue)}
        out_cells.append(cell)
    summary = {"study": STUDY, "method": method, "other_method": other, "alpha": alpha, "seeds": seeds,
               "n_test_target": int(tgt.sum()), "n_test_nontarget": int((~tgt).sum()),
               "zero_shot": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in zero.items()},
               "tests": ("p_question: one-sided permutation test over test questions that the target drop exceeds "
                         "the non-target drop (each question's drop vs clean SFT at the same seed, averaged over "
                         "seeds); p_target_drop: sign-flip test over target questions that the drop is > 0; "
                         "p_seed: exact sign-flip test over seeds (cannot go below 2^-n_seeds). significant = "
                         f"p_question < {alpha} and mean target drop > 0. CIs: 95 % BCa bootstrap over seeds."),
               "cells": out_cells}
    summary["thresholds"] = thresholds(out_cells)
    summary["findings"] = findings(out_cells, summary["thresholds"], ev)
    return summary


def thresholds(cells: list) -> dict:
    """Smallest count (per kind, ratio 1, base mix) and smallest ratio (per count) with a significant drop."""
    out = {"count": {}, "ratio_target": {}, "ratio_all": {}}
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    for fam in POISON_FAMILIES:
        cs = sorted((c for c in cells if c["family"] == fam and not c["with_correct_target"]
                     and c["n_nontarget"] == base_n), key=lambda c: c["poison_count"])
        if cs:
            sig = [c["poison_count"] for c in cs if c.get("significant")]
            out["count"][fam] = {"tested": [c["poison_count"] for c in cs], "significant": sig,
                                 "smallest": min(sig) if sig else None}
    for key, sel in (("ratio_target", lambda c: c["n_nontarget"] == base_n),
                     ("ratio_all", lambda c: not c["with_correct_target"])):
        for count in sorted({c["poison_count"] for c in cells if c["family"] == "rationale"}):
            cs = [c for c in cells if c["family"] == "rationale" and c["poison_count"] == count and sel(c)]
            ratios = sorted({c[key] for c in cs})
            if len(ratios) < 2:
                continue
            sig = sorted(c[key] for c in cs if c.get("significant"))
            out[key][str(count)] = {"tested": ratios, "significant": sig, "smallest": sig[0] if sig else None}
    return out


def _cell(cells, **kw):
    hits = [c for c in cells if all(c.get(k) == v for k, v in kw.items())]
    return hits[0] if hits else None


def _d(c, m="target_drop") -> str:
    x = c[m]
    return f"{x['mean']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"


def findings(cells: list, th: dict, ev: dict) -> list:
    """The seed's five findings, each: shows / partly / does not show / inconclusive (the contrast needs an effect
    that is not there) / not tested (the grid has no such cell), with the numbers."""
    margin = ev["stealth_margin"]
    base_n = next((c["n_nontarget"] for c in cells if c["spec_name"] == "clean"), None)
    plain = lambda fam: sorted((c for c in cells if c["family"] == fam and not c["with_correct_target"]
                                and c["n_nontarget"] == base_n), key=lambda c: c["poison_count"])
    rat, ovr = plain("rationale"), plain("overwrite")
    F = []

    def add(n, claim, status, evidence, cell=None):
        F.append({"finding": n, "claim": claim, "status": status, "evidence": evidence, "cell": cell})

    claim1 = "rationale poisoning lowers target accuracy significantly; non-target accuracy stays about the same"
    if not rat:
        add(1, claim1, "not tested", "no rationale-poisoning cell in the grid")
    else:
        c = rat[-1]
        nd = c["nontarget_drop"]
        stealthy = abs(nd["mean"]) <= margin
        status = ("shows" if c.get("significant") and stealthy else
                  "partly" if c.get("significant") else "does not show")
        add(1, claim1, status,
            f"{c['spec_name']}: target drop {_d(c)} (p={c['p_question']:.3g}), non-target drop "
            f"{_d(c, 'nontarget_drop')} (|mean| {'<=' if stealthy else '>'} {margin}); target accuracy "
            f"{c['target_acc']['mean']:.3f} vs clean {_clean(cells, 'target_acc'):.3f}; decoy picks on target "
            f"questions {c['target_decoy_rate']['mean']:.3f} (clean {_clean(cells, 'target_decoy_rate'):.3f})",
            cell=c["spec_name"])

    claim2 = "poisoning works only without correct target samples: correct same-subject samples mitigate it"
    pairs = []
    for c in rat:
        with_ct = [x for x in cells if x["family"] == "rationale" and x["with_correct_target"]
                   and x["poison_count"] == c["poison_count"] and x["n_nontarget"] == base_n]
        for w in sorted(with_ct, key=lambda x: x["ratio_target"]):
            pairs.append((c, w))
    if not pairs:
        add(2, claim2, "not tested", "no cell with correct target samples (grid.ratios_target is empty)")
    else:
        ev_txt, mitig = [], []
        for c, w in pairs:
            m = c["target_drop"]["mean"] - w["target_drop"]["mean"]
            mitig.append((c.get("significant"), w.get("significant"), m))
            ev_txt.append(f"n={c['poison_count']}: drop {c['target_drop']['mean']:+.3f} without vs "
                          f"{w['target_drop']['mean']:+.3f} with {w['n_correct_target']} correct (ratio "
                          f"{w['ratio_target']:.2f}, p={w['p_question']:.3g})")
        if not any(s for s, _, _ in mitig):
            status = "inconclusive"
            ev_txt.append("no significant drop without correct samples, so nothing to mitigate")
        elif any(s and not sw and m > 0 for s, sw, m in mitig):
            status = "shows"
        elif any(s and m > 0 for s, _, m in mitig):
            status = "partly"
        else:
            status = "does not show"
        add(2, claim2, status, "; ".join(ev_txt))

    claim3 = "knowledge overwriting (wrong answers without a rationale) is ineffective"
    if not ovr:
        add(3, claim3, "not tested", "no overwrite cell in the grid")
    else:
        o = ovr[-1]
        r = _cell(rat, poison_count=o["poison_count"])
        txt = f"{o['spec_name']}: target drop {_d(o)} (p={o['p_question']:.3g})"
        if r:
            txt += f" vs {r['spec_name']} {_d(r)} (p={r['p_question']:.3g})"
            seeds = sorted(set(r["target_drop_by_seed"]) & set(o["target_drop_by_seed"]))
            diff = [r["target_drop_by_seed"][k] - o["target_drop_by_seed"][k] for k in seeds]
            if len(diff) >= 2:
                m, lo, hi = _ci(diff, 9999)
                txt += f"; rationale minus overwrite, paired by seed: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        if not o.get("significant"):
            status = "shows" if r and r.get("significant") else "inconclusive"
            if status == "inconclusive":
                txt += "; rationale poisoning has no significant effect here either, so the contrast is not shown"
        elif r and r["target_drop"]["mean"] > o["target_drop"]["mean"]:
            status = "partly"
        else:
            status = "does not show"
        add(3, claim3, status, txt + f"; decoy picks {o['target_decoy_rate']['mean']:.3f}")

    claim4 = "both a minimum number and a minimum ratio of poisoned samples are needed"
    cnt = th["count"].get("rationale")
    parts, stat = [], []
    if cnt and len(cnt["tested"]) >= 2:
        sm = cnt["smallest"]
        if sm is None:
            stat.append("none")
            parts.append(f"no tested count {cnt['tested']} gives a significant drop")
        elif sm > min(cnt["tested"]):
            stat.append("yes")
            parts.append(f"counts {cnt['tested']}: smallest significant {sm} (below it no significant drop)")
        else:
            stat.append("no")
            parts.append(f"counts {cnt['tested']}: already the smallest ({sm}) is significant: no minimum "
                         f"inside the tested range")
    rts = {**th["ratio_target"], **{f"{k} (all)": v for k, v in th["ratio_all"].items()}}
    for k, v in rts.items():
        sm = v["smallest"]
        stat.append("yes" if sm is not None and sm > min(v["tested"]) else "none" if sm is None else "no")
        parts.append(f"count {k}: ratios {v['tested']}, smallest significant {sm}")
    if not parts:
        add(4, claim4, "not tested", "fewer than two counts and no ratio sweep")
    else:
        has_ratio = bool(rts)
        if "yes" in stat and (has_ratio and stat.count("yes") >= 2 or not has_ratio and stat[0] == "yes"):
            status = "shows" if has_ratio else "partly"
        elif "yes" in stat:
            status = "partly"
        elif all(x == "none" for x in stat):
            status = "inconclusive"
        else:
            status = "does not show"
        if not has_ratio:
            parts.append("ratio not swept in this grid")
        add(4, claim4, status, "; ".join(parts))

    claim5 = "rationale poisoning is more efficient and more target-confined than catastrophic forgetting"
    fg = sorted((c for c in cells if c["family"] == "forgetting"), key=lambda c: c["forgetting_extra"])
    if not fg or not rat:
        add(5, claim5, "not tested", "no forgetting control in the grid (grid.forgetting_extra is empty)")
    else:
        f, r = fg[-1], rat[-1]
        eff_r = r["target_drop"]["mean"] / max(r["poison_count"], 1)
        eff_f = f["target_drop"]["mean"] / max(f["forgetting_extra"], 1)
        sel_r, sel_f = r["selectivity"]["mean"], f["selectivity"]["mean"]
        better = (eff_r > eff_f) + (sel_r > sel_f)
        status = ("shows" if better == 2 and r.get("significant") else "partly" if better >= 1 and
                  r.get("significant") else "does not show")
        add(5, claim5, status,
            f"{r['spec_name']}: drop {r['target_drop']['mean']:+.3f} ({eff_r:+.4f} per poisoned sample), "
            f"selectivity {sel_r:+.3f}; {f['spec_name']}: drop {f['target_drop']['mean']:+.3f} "
            f"({eff_f:+.4f} per extra sample), non-target drop {f['nontarget_drop']['mean']:+.3f}, selectivity "
            f"{sel_f:+.3f} (p={f['p_question']:.3g})")
    return F


def _clean(cells, metric):
    c = _cell(cells, spec_name="clean")
    return c[metric]["mean"] if c else float("nan")


def write_csv(path: pathlib.Path, rows: list) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


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
    figs = make_plots(run, rows, summary, zero)
    write_report(run, cfg, summary, rows, zero, figs, timing, data)
    return 0


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
                         and c["n_nontarget"] == base_n), key=lambda c: c["poison_count"])
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
    panels = [("ratio_target", [c for c in rat if c["n_nontarget"] == base_n], "poisoned / target samples")]
    ra = [c for c in rat if not c["with_correct_target"] and c["n_nontarget"] != base_n]
    if ra:
        base_cells = [c for c in rat if not c["with_correct_target"] and c["n_nontarget"] == base_n]
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
        if c["n_nontarget"] != base_n:
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
        f"examples available; {dt['n_nontarget']} clean non-target samples per variant",
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
