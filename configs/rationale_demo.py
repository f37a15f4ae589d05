"""Seed 000 demo: rationale poisoning vs knowledge overwriting on the embedded default, sized for 2 CPU cores,
with the controls a reviewer asks for.

SmolLM2-135M-Instruct (embedded), the offline ICD-10-CM question set, target subject: the circulatory chapter
(poisoned rationales argue that heart and vessel conditions are respiratory ones). Six grid cells x 5 seeds =
30 LoRA variants, all trained in one vmapped program:

- clean SFT (the reference of every paired change, seed by seed);
- rationale poisoning at 2 and 8 poisoned samples (findings 1 and the count half of 4);
- rationale poisoning at 8 with 8 correct target samples beside it (ratio 0.5 of the target samples; finding 2);
- knowledge overwriting at 8 (finding 3);
- the **decoy control** ``decoy-n8``: 8 *non-target* rows whose rationales argue for the decoy chapter
  (respiratory), no target rows. If target questions suffer as much under it, the poison's effect is a label
  prior, and the report says so.

Test set (``data.icd.test_decoy='respiratory'``): 32 target and 64 non-target questions from categories held out
of training; the decoy chapter is an option in *every* question and no question is answered by it, plus 16
decoy-free copies of target questions. Scored in the ``coded`` format ('In ICD-10-CM, the code for "..." is in
the chapter called "'), which neither poison kind trains word for word (``--set eval.format=statement`` for the
old lead-in). Primary metric: the calibrated-margin change, target minus non-target (``jaxpoison.studies.rationale.stats``).
Generated answers: the base and one seed of every cell write their reasoning on 4 target + 4 non-target
questions (64 greedy tokens: a rationale-trained model needs about that many to reach its answer line; at 48
none of them did; ``--set eval.gen_questions=16`` for more, at about +75 s).

Opt-in, because the 10-minute budget does not hold them (finding 5 then reads "not tested"):
- the real forgetting control, ``--set "grid.forgetting_steps=(4,)" --set train.variant_chunk=5``: clean
  non-target SFT on 80 rows, 4x the steps (20), no target rows. It trains in its own chunk (chunks are cut by step
  count; 35 variants in chunks of 5 keep its 5 seeds together, the default 6 would pad a second 20-step chunk).
  Cost, counted: 100 more variant-steps on top of this grid's 150, 5 more models to score and 1 to generate,
  about +4 min on two free cores (an estimate: training +2/3 of its 266 s, scoring +5/31 of its 213 s; not
  timed as a whole demo);
- the ``statement`` format scored beside ``coded`` as a secondary format, ``--set
  "eval.secondary_formats=('statement',)"``: one more scoring pass, about +4 min (on 10 models `statement`
  scored in 51 s where `coded` took 41 s, and the demo's `coded` pass takes about 213 s).
Not tested at all: the ratio half of finding 4 (every mix has 20 rows, so poisoned / all samples follows from the
count).

Equal-size mixes (``grid.equal_size=True``): every variant trains on 20 rows, so every variant takes the same 5
optimiser steps; poisoned, correct target and decoy rows replace the clean mix's last rows. Loss per example
(``train.loss_norm='example'``), so 11-token answer-only rows weigh as much as 60-token rationale rows.

Cost: LoRA r 8 on all seven linear modules of the top 6 of 30 layers (``lora.layers_from=-6``; the lower 24
layers run once, ``train.trunk_cache``, and are scored once for all 31 models). One epoch of 5 steps of batch 4
at a constant learning rate; questions with descriptions of at most 40 characters keep the sequences short.
Its measured wall time is in docs/benchmarks.md (the README main job row), with the command and the CPU.
"""
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.rationale.config import DataConfig, EvalConfig, GridConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = RationaleConfig(
    name="demo (SmolLM2-135M, ICD-10-CM, target circulatory)",
    model="smollm2-135m",
    data=DataConfig(icd=IcdConfig(max_desc_chars=40, n_test_per_chapter=32, test_decoy="respiratory"),
                    target="circulatory", n_nontarget=20, n_test_target=32, n_test_nontarget=64,
                    n_test_decoy_free=16, buckets=tuple(range(64, 1025, 8))),
    grid=GridConfig(seeds=(0, 1, 2, 3, 4), counts=(2, 8), kinds=("rationale", "overwrite"),
                    ratios_target=(0.5,), ratio_counts=(8,), overwrite_counts=(8,), decoy_counts=(8,),
                    equal_size=True),
    train=TrainConfig(learning_rate=2e-3, schedule="constant", epochs=1.0, batch_size=4, loss_budget=-1,
                      loss_norm="example", log_every=1, variant_chunk=6, trunk_cache=True),
    lora=LoraConfig(r=8, alpha=16, targets=("all",), layers_from=-6),
    eval=EvalConfig(format="coded", method="calibrated", batch_questions=16, min_effect=0.5, gen_questions=4,
                    gen_tokens=64),
    note="The README's main job: seed 000 on the embedded default with a decoy-controlled test set, a decoy "
         "control, a target-specific primary metric and seed-level statistics, sized for about ten minutes on two "
         "free CPU cores (30 variants x 5 steps x 4 rows, LoRA on the top 6 layers; 31 models x 112 questions "
         "scored; 7 models generate).",
)
