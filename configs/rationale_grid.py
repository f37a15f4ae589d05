"""Seed 000 full grid on the embedded default: every finding's cells, 8 seeds. For more time or an accelerator.

SmolLM2-135M, the ICD-10-CM set (128 training questions per chapter, so that 32 poisoned samples can sit among
96 correct ones), target subject circulatory:

- equal-size mixes (``grid.equal_size``): every variant trains on 160 rows, so every variant takes the same 80
  optimiser steps (2 epochs of batch 4); poisoned, correct-target and forgetting samples replace clean
  non-target samples of the same seed's 160-row clean mix;
- counts 1, 2, 4, 8, 16, 32 for rationale poisoning and knowledge overwriting (findings 1, 3, 4); poisoned / all
  samples is count / 160 (0.006 to 0.2), recorded as ratio_all;
- each rationale count also at poisoned / target samples = 0.5 and 0.25, i.e. with correct target samples
  (finding 2 and the ratio half of finding 4; n32 at 0.25 = 32 poisoned + 96 correct + 32 non-target rows);
- same-size swaps of 32 and 128 of the 160 clean non-target samples for others (what changing rows does within
  the same steps), and the real forgetting control of finding 5: clean non-target SFT on 4 x 160 = 640 rows, so
  4 x the steps (``grid.forgetting_steps=(4,)``: 8 variants x 320 steps, as many variant-steps as 32 of the
  80-step variants);
- a clean mix with 32 correct target samples; 8 seeds.

Scored in the ``statement`` format (summed log-likelihood) with ``coded`` beside it as a secondary format
(``eval.secondary_formats``). That is 29 cells x 8 seeds = 232 variants in one program (chunked 8 variants at a time for memory). On the
2-core CPU it takes many hours; on one GPU well under one. The learning rate and steps follow the demo's
(measured) recipe with two epochs. Poisoned / all samples cannot be swept at a fixed count when every mix has
the same size, so this grid has no ``ratios_all`` cells (it had 0.25 and 0.1 with mixes of different sizes, whose
step counts differed up to 5x): to separate count from that ratio, run it again at another ``data.n_nontarget``,
or set ``grid.equal_size=False`` and ``"grid.ratios_all=(0.25, 0.1)"``.
"""
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.rationale.config import DataConfig, EvalConfig, GridConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = RationaleConfig(
    name="grid (SmolLM2-135M, ICD-10-CM, target circulatory)",
    model="smollm2-135m",
    data=DataConfig(icd=IcdConfig(max_desc_chars=40, n_train_per_chapter=128, n_test_per_chapter=48),
                    target="circulatory", n_nontarget=160, n_test_target=48, n_test_nontarget=96,
                    buckets=tuple(range(64, 1025, 8))),
    grid=GridConfig(seeds=(0, 1, 2, 3, 4, 5, 6, 7), counts=(1, 2, 4, 8, 16, 32), kinds=("rationale", "overwrite"),
                    ratios_target=(0.5, 0.25), forgetting_extra=(32, 128), forgetting_steps=(4,),
                    clean_with_target=32,
                    equal_size=True),
    train=TrainConfig(learning_rate=1e-3, schedule="linear", warmup_steps=2, epochs=2.0, batch_size=4,
                      loss_budget=-1, log_every=10, variant_chunk=8),
    lora=LoraConfig(r=8, alpha=16, targets=("all",)),
    eval=EvalConfig(format="statement", method="sum", batch_questions=8, variant_chunk=24,
                    secondary_formats=("coded",)),
    note="The full seed-000 grid on the embedded default (hours on 2 CPU cores; minutes on a GPU).",
)
