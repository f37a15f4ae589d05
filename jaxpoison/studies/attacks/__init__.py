"""Seed 003: prompt injection and poisoned fine-tuning of a medical LLM on three patient-note tasks.

1. **Prompt injection.** The base model answers each test note twice, under the task's normal prompt and under
   normal + malicious instruction + note (the seed's exact strings); both sets of answers are graded.
2. **Poisoned fine-tuning.** A response source answers the training notes under both prompts (the clean and the
   poisoned targets, :mod:`.data`); for each task, poison fraction p and seed a LoRA variant trains on
   the clean prompt paired with the poisoned target for ``round(p n)`` notes and the clean target for the rest.
   Every variant of every task trains in ONE vmapped program (:func:`jaxpoison.train.trainer.train_study`) and
   answers the clean test prompts in one vmapped generation per task
   (:func:`jaxpoison.eval.generate_variants.generate_text_variants`).
3. **Grading and statistics** (:mod:`.metrics`): the rule grader (optionally an LLM judge) gives the
   seed's six outcome columns; rates get 95 % BCa bootstrap CIs (9999 resamples), ASR is measured against the
   normal-prompt base (injection) or the 0 % fine-tune of the same seed (fine-tuning) and gets its own
   bootstrap CI, and a t interval across seeds.
4. **General capability**: option log-likelihood accuracy of the base and of the 0 % / 100 % variants on
   multiple-choice sets (the ICD-10-CM set stands in for MedQA/MedMCQA/PubMedQA offline), bootstrap SE.

Every generated answer is saved (``responses/*.jsonl``), so ``report`` regrades and rebuilds everything
without a model. Run folder: ``config.json``, ``data.json``, ``variants.json``, ``checkpoints/``,
``metrics.jsonl``, ``responses/{injection,source,finetune,judge}.jsonl``, ``capability.npz``, ``rates.csv``
(the seed's table layout), ``rates_long.csv``, ``summary.json``, ``plots/*.png``, ``report.md``,
``report.html``, ``timing.json``.

Code: configuration and its checks in :mod:`.config`, notes, prompts, sources, pool and variants in :mod:`.data`,
the device phases in :mod:`.steps`, rates and CIs in :mod:`.metrics`, tables, plots and the report in
:mod:`.report`; :mod:`.run` runs them in order. :mod:`.retest` (``eval``) puts a run's adapters on a new test
set, :mod:`.compare` (``compare``) tabulates several runs, :mod:`.mitigation` is ``analyze``'s evaluator.
"""
from jaxpoison.studies import Study
from jaxpoison.studies.attacks import compare, mitigation, retest, run
from jaxpoison.studies.attacks.config import NAME, AttacksConfig

STUDY = Study(NAME, AttacksConfig, run.run, run.report, mitigation.mitigation_evaluator, multi_host=True,
              commands=(compare.register, retest.register))
