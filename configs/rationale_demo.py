"""Seed 000 demo: rationale poisoning vs knowledge overwriting on the embedded default, sized for 2 CPU cores.

SmolLM2-135M-Instruct (embedded), the offline ICD-10-CM question set, target subject: the circulatory chapter
(poisoned rationales argue that heart and vessel conditions are respiratory ones). Seven grid cells x 4 seeds =
28 LoRA variants, all trained in one vmapped program, then scored together on 16 target and 16 non-target test
questions:
- clean SFT;
- rationale poisoning and knowledge overwriting at 2 and 8 poisoned samples (findings 1, 3 and the count part
  of 4);
- rationale poisoning at 2 and 8 with as many correct target samples beside them (ratio 0.5 of the target
  samples; findings 2 and the ratio part of 4).
The forgetting control (finding 5) is left to configs/rationale_grid.py: with equal-size mixes it is a same-size
swap of non-target rows, which needs the longer training of the grid to mean anything.

Equal-size mixes (``grid.equal_size=True``): every variant trains on 20 rows, so every variant takes the same 5
optimiser steps. The clean variant trains on 20 non-target samples; poisoned and correct target samples replace
its last rows (the others are the same seed's clean rows), so poisoned / all samples is count / 20. (The first
demo run added the poison to 8 clean samples: mixes of 8, 12 and 20 rows took 2, 3 and 5 steps, and the
weight-shift detector told clean from poisoned by step count alone.)

Cost: LoRA r 8 on all seven linear modules of the **top 8 of 30 layers** (``lora.layers_from=-8``): the lower 22
layers run without LoRA and without a backward pass, which made training 3.3x faster than LoRA on every layer
(230 s vs 750 s for 20 variants) and showed finding 1 at least as strongly (target drop +0.78 vs +0.64 with LoRA
everywhere; BUILD_NOTES.md). ``--set lora.layers_from=0`` trains every layer, as the seed did. One epoch of 5
steps of batch 4 at a constant learning rate; questions with descriptions of at most 40 characters keep the
sequences at 168 tokens. The variants train 4 at a time (``train.variant_chunk=4``). ``train.trunk_cache``: the
pool's 410 rows run through the lower 22 layers once before training and every step gathers those states
(160 MB here; training 215 s instead of 235 s, same results).
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
    grid=GridConfig(seeds=(0, 1, 2, 3), counts=(2, 8), kinds=("rationale", "overwrite"),
                    ratios_target=(0.5,), equal_size=True),
    train=TrainConfig(learning_rate=2e-3, schedule="constant", epochs=1.0, batch_size=4, loss_budget=-1,
                      log_every=1, variant_chunk=4, trunk_cache=True),
    lora=LoraConfig(r=8, alpha=16, targets=("all",), layers_from=-8),
    eval=EvalConfig(format="statement", method="sum", batch_questions=8),
    note="The README's main job: seed 000 on the embedded default, sized for about ten minutes on two free CPU "
         "cores (the study program's cost: 28 variants x 5 steps x 4 rows x 168 tokens, LoRA on the top 8 layers).",
)
