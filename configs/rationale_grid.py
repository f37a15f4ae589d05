"""Seed 000 full grid on the embedded default: every finding's cells, 8 seeds. For more time or an accelerator.

SmolLM2-135M, the ICD-10-CM set (128 training questions per chapter, so that 32 poisoned samples can sit among
96 correct ones), target subject circulatory:

- counts 1, 2, 4, 8, 16, 32 for rationale poisoning and knowledge overwriting (findings 1, 3, 4);
- each rationale count also at poisoned / target samples = 0.5 and 0.25, i.e. with correct target samples
  (finding 2 and the ratio half of finding 4), and at poisoned / all samples = 0.25 and 0.1 (the other ratio);
- the forgetting control at 32 and 128 extra non-target samples (finding 5);
- a clean mix with 32 correct target samples; 8 seeds.

That is 40 cells x 8 seeds = 320 variants in one program (chunked 8 variants at a time for memory). On the
2-core CPU it takes many hours; on one GPU well under one. The learning rate and steps follow the demo's
(measured) recipe with two epochs.
"""
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.rationale import DataConfig, EvalConfig, GridConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = RationaleConfig(
    name="grid (SmolLM2-135M, ICD-10-CM, target circulatory)",
    model="smollm2-135m",
    data=DataConfig(icd=IcdConfig(max_desc_chars=40, n_train_per_chapter=128, n_test_per_chapter=48),
                    target="circulatory", n_nontarget=32, n_test_target=48, n_test_nontarget=96,
                    buckets=tuple(range(64, 1025, 8))),
    grid=GridConfig(seeds=(0, 1, 2, 3, 4, 5, 6, 7), counts=(1, 2, 4, 8, 16, 32), kinds=("rationale", "overwrite"),
                    ratios_target=(0.5, 0.25), ratios_all=(0.25, 0.1), forgetting_extra=(32, 128),
                    clean_with_target=32),
    train=TrainConfig(learning_rate=1e-3, schedule="linear", warmup_steps=2, epochs=2.0, batch_size=4,
                      loss_budget=-1, log_every=10, variant_chunk=8),
    lora=LoraConfig(r=8, alpha=16, targets=("all",)),
    eval=EvalConfig(format="statement", method="sum", batch_questions=8, variant_chunk=24),
    note="The full seed-000 grid on the embedded default (hours on 2 CPU cores; minutes on a GPU).",
)
