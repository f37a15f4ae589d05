"""Seed 000 demo: rationale poisoning vs knowledge overwriting on the embedded default, sized for 2 CPU cores.

SmolLM2-135M-Instruct (embedded), the offline ICD-10-CM question set, target subject: the circulatory chapter
(poisoned rationales argue that heart and vessel conditions are respiratory ones). Five grid cells — clean SFT,
rationale poisoning and knowledge overwriting at 4 and 12 poisoned samples — times 4 seeds = 20 LoRA variants,
all trained in one vmapped program, then scored together on 16 target and 16 non-target test questions.

Equal-size mixes (``grid.equal_size=True``): every variant trains on the same 20 rows' worth of data, so every
variant takes the same 5 optimiser steps. The clean variant trains on 20 non-target samples; at count 4 and 12
the poisoned samples replace the last 4 or 12 of them (the other 16 or 8 are the same seed's clean rows), so
poisoned / all samples is 0.2 and 0.6. (The first demo run added the poison to 8 clean samples: mixes of 8, 12
and 20 rows took 2, 3 and 5 steps, and the weight-shift detector told clean from poisoned by step count alone.
Equal sizes cost the same: the vmapped program always ran 5 steps.)

The cost of the study program is variants x steps x batch x sequence length, so the mixes are small (20 rows),
one epoch of 5 steps at a constant learning rate, and questions with descriptions of at most 40 characters keep
the sequences at 168 tokens. Findings 2 (correct target samples) and 5 (forgetting) need cells that this grid
leaves out: see configs/rationale_grid.py, or add them here with mixes large enough to hold them, e.g.
``--set data.n_nontarget=32 --set grid.ratios_target=0.5 --set grid.forgetting_extra=12`` (32-row mixes
take 8 steps).

Memory: the 20 variants train 4 at a time (``train.variant_chunk=4``, about 8 GB); all 20 at once would need
about 30 GB.
"""
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.rationale import DataConfig, EvalConfig, GridConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = RationaleConfig(
    name="demo (SmolLM2-135M, ICD-10-CM, target circulatory)",
    model="smollm2-135m",
    data=DataConfig(icd=IcdConfig(max_desc_chars=40, n_test_per_chapter=24), target="circulatory",
                    n_nontarget=20, n_test_target=16, n_test_nontarget=16,
                    buckets=tuple(range(64, 1025, 8))),
    grid=GridConfig(seeds=(0, 1, 2, 3), counts=(4, 12), kinds=("rationale", "overwrite"), equal_size=True),
    train=TrainConfig(learning_rate=2e-3, schedule="constant", epochs=1.0, batch_size=4, loss_budget=-1,
                      log_every=1, variant_chunk=4),
    lora=LoraConfig(r=8, alpha=16, targets=("all",)),
    eval=EvalConfig(format="statement", method="sum", batch_questions=8),
    note="The README's main job: seed 000 on the embedded default, sized for about a quarter of an hour on two "
         "free CPU cores (the study program's cost: 20 variants x 5 steps x 4 rows x 168 tokens).",
)
