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

Statistics (:mod:`.stats`): the primary metric is target-specific, the per-question paired change of
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

Code: configuration and its checks in :mod:`.config`, data, mixes and test questions in :mod:`.grid`,
option scores -> per-variant results in :mod:`.results`, statistics and findings in :mod:`.stats`, plots and
report in :mod:`.report`; :mod:`.run` runs them in order (:func:`.run.run`, :func:`.run.report`).
"""
from jaxpoison.studies import Study
from jaxpoison.studies.rationale import evaluator, run
from jaxpoison.studies.rationale.config import NAME, RationaleConfig

STUDY = Study(NAME, RationaleConfig, run.run, run.report, evaluator.mitigation_evaluator, multi_host=True)
