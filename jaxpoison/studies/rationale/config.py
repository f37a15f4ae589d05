"""Seed 000 study configuration: the config dataclasses, their validation, and the names every part of the
study shares (families, score methods). The study itself is :mod:`jaxpoison.studies.rationale`."""
from __future__ import annotations

from dataclasses import dataclass

from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.configs import StudyConfigError
from jaxpoison.studies.common import check_shared_fields
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.mesh import MeshConfig

NAME = "rationale"
FAMILIES = ("clean", "rationale", "overwrite", "forgetting", "decoy")
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
    n_nontarget: int = 32              # clean non-target SFT samples (grid.equal_size: every mix's row count)
    n_nontarget_pool: int = 0          # non-target training examples to draw from (0 = all)
    n_test_target: int = 16            # target-subject test questions
    n_test_nontarget: int = 32         # non-target test questions (spread over subjects)
    n_test_decoy_free: int = 0         # decoy-free copies of target test questions (icd.test_decoy makes them)
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
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    counts: tuple[int, ...] = (4, 16)            # poisoned target samples (rationale and overwrite alike)
    kinds: tuple = ("rationale", "overwrite")
    ratios_target: tuple[float, ...] = ()        # extra cells: poisoned / target samples < 1, filled with correct target samples
    ratio_kinds: tuple = ("rationale",)  # kinds that get the ratios_target cells
    ratio_counts: tuple[int, ...] = ()   # counts that get the ratios_target cells (() = every count)
    overwrite_counts: tuple[int, ...] = ()  # counts of the overwrite cells (() = grid.counts)
    ratios_all: tuple[float, ...] = ()           # extra rationale cells: poisoned / all samples, by fewer non-target samples
    forgetting_extra: tuple[int, ...] = ()     # forgetting controls: this many extra non-target samples, no target samples
                                               # (with equal_size: that many swapped within the same steps)
    forgetting_steps: tuple[int, ...] = ()     # catastrophic-forgetting controls at k x the clean mix's steps: clean
    # non-target SFT on k x data.n_nontarget rows (the clean mix's rows, then (k-1) x n_nontarget more) at the same
    # epochs and batch, so k x the optimiser steps; no target samples. Cells 'forgetting-steps<k>x'; costs k x the
    # clean cell's training per seed (its own chunk group in the engine: variants are chunked by step count)
    clean_with_target: int = 0         # >0: also a clean variant with this many correct target samples
    decoy_counts: tuple[int, ...] = ()  # decoy (label-prior) controls: this many non-target rows arguing for the
                                        # target's decoy chapter, no target samples (jaxpoison.data.poison)
    equal_size: bool = False           # every mix has data.n_nontarget rows: additions replace non-target samples


@dataclass(frozen=True)
class EvalConfig:
    format: str = "statement"          # option-text scoring format (jaxpoison.data.prompts.scoring_pairs)
    method: str = "sum"                # accuracy's score: 'sum' | 'mean' | 'calibrated' (minus the option's prior)
    min_effect: float = 0.5            # nats of calibrated margin: a CI wholly below this = "does not show"
    gen_questions: int = 0             # >0: generated answers on this many target + as many non-target questions
    gen_tokens: int = 64               # new tokens per generated answer (greedy)
    secondary_formats: tuple = ()      # more scoring formats, scored on the same questions and models and reported
    # beside the primary one as secondary (scores_<format>.npz); each costs about one more scoring pass
    batch_questions: int = 8
    variant_chunk: int = 0             # score at most this many variants at once (memory); 0 = all
    alpha: float = 0.05                # significance level of the tests
    stealth_margin: float = 0.05       # |non-target drop| below this counts as "about the same"
    n_resamples: int = 9999


@dataclass(frozen=True)
class RationaleConfig:
    study: str = NAME
    name: str = "rationale"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    quant: str = "none"                 # frozen base: 'nf4' | 'nf4-dq' (double-quantised scales) | 'int8' | 'none'
    data: DataConfig = DataConfig()
    poison: PoisonConfig = PoisonConfig()
    grid: GridConfig = GridConfig()
    train: TrainConfig = TrainConfig(loss_budget=-1, loss_norm="example")   # -1: the pool's longest completion;
    # per-example loss, so an 11-token answer-only row weighs as much as a 60-token rationale row
    lora: LoraConfig = LoraConfig()
    mesh: MeshConfig = MeshConfig()     # devices per axis (variant, data, fsdp, model): ints or 'auto'
    eval: EvalConfig = EvalConfig()
    note: str = ""                     # free text carried into the report (what the preset stands for)




def check_config(cfg: RationaleConfig) -> None:
    """Refuse values that cannot work, saying which field and what to use instead."""
    def bad(field_name, msg):
        raise StudyConfigError(f"{field_name}: {msg}")

    check_shared_fields(cfg, NAME)
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
    if any((not isinstance(k, int)) or k < 2 for k in g.forgetting_steps) or \
            len(set(g.forgetting_steps)) != len(g.forgetting_steps):
        bad("grid.forgetting_steps", f"distinct integer multiples of the clean mix's steps, each >= 2 (e.g. (4,)), "
                                     f"got {g.forgetting_steps}")
    if any((not isinstance(x, int)) or x < 1 for x in g.decoy_counts):
        bad("grid.decoy_counts", f"positive counts, got {g.decoy_counts}")
    if e.min_effect <= 0:
        bad("eval.min_effect", f"a positive margin in nats, got {e.min_effect}")
    if e.gen_questions < 0 or e.gen_tokens < 1:
        bad("eval.gen_questions", "gen_questions >= 0 and gen_tokens >= 1")
    if g.clean_with_target < 0:
        bad("grid.clean_with_target", "0 (off) or a positive count")
    if g.equal_size and g.ratios_all:
        bad("grid.ratios_all", f"with grid.equal_size every mix has data.n_nontarget={d.n_nontarget} rows, so "
                               f"poisoned / all samples = count / {d.n_nontarget} is set by grid.counts (results "
                               f"record it as ratio_all) and cannot be swept at a fixed count; fix: ratios_all=() "
                               f"and sweep counts (or run a second study at another n_nontarget), or "
                               f"equal_size=False")
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
    for f in e.secondary_formats:
        if f not in SCORING_FORMATS or f == e.format:
            bad("eval.secondary_formats", f"formats of {SCORING_FORMATS} other than eval.format={e.format!r}, "
                                          f"each once; got {tuple(e.secondary_formats)}")
    if len(set(e.secondary_formats)) != len(e.secondary_formats):
        bad("eval.secondary_formats", f"each format once, got {tuple(e.secondary_formats)}")
    if not 0 < e.alpha < 1:
        bad("eval.alpha", f"a level in (0, 1), got {e.alpha}")
    if cfg.train.loss_budget < -1:
        bad("train.loss_budget", "-1 (auto), 0 (off) or a positive number of positions")


def family(kind: str) -> str:
    return "rationale" if kind.endswith("rationale") else kind
