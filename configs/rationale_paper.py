"""Seed 000 in the paper's own setting: Qwen3-4B-Base, MedQA simplified-Chinese (mainland), target fever.

Sized for a TPU v5e-8 (``v5e:2x4``, 8 chips of 16 GiB). ``python -m jaxpoison plan configs/rationale_paper.py
--topology v5e-8`` says it fits (an ahead-of-time XLA compile for abstract chips, not a run): the 424 variants
(53 cells x 8 seeds) train as 53 host-side chunks of 8, grouped by step count, one variant per chip (mesh
variant=8); the train segment holds per chip 7.90 GiB of arguments (the bf16 base, replicated, and one variant's
fp32 LoRA + Adam state) and 3.71 GiB of temporaries (full remat, splash attention), 11.61 GiB of 15.75 usable
(analytic model: 12.0); 16 variants per chunk do not fit (analytic 16.6 GiB). Scoring runs on one chip, one
adapter per call (``eval.variant_chunk=1``: 8 questions x 4 options at the 768-token bound, 13.16 GiB; 2 adapters
per call need 15.8 GiB of temporaries alone and do not fit). 2 to 500 optimiser steps per variant (51,184
variant-steps, 1.6e19 FLOPs with T=768 at every position, an upper bound): 8.0 h and 64 chip-hours of training at
35 % MFU. One H100-80GB (``--device h100-80gb``, analytic): 43.6 GiB at chunks of 8 (up to 14 fit), 12.5 h.
Run: ``python -m jaxpoison run configs/rationale_paper.py --out runs/paper`` after the model
(``Qwen/Qwen3-4B-Base``) and the data set (``fzkuji/MedQA``, config ``med_qa_zh_4options_source``) are in the
Hugging Face cache, or point ``data.train_files`` / ``data.test_files`` at local JSONL copies.

What the paper (Xie et al., arXiv 2603.02262) does not publish, and what this preset chooses instead:
- The rationales. MedQA has none, and the paper's clean and poisoned rationales were not released. Here the base
  model writes both: the clean one by explaining the true answer, the poisoned one by explaining the subject's
  wrong option (``data.clean_rationales='model'``, ``poison.builder='model'``). A JSONL of your own rationales
  can replace either (``data.clean_rationales=PATH``, ``poison.builder=user`` + ``poison.file=PATH``).
- How fever questions were found: keyword match on stem and options (发热, 发烧, fever, febrile, pyrexia).
- Whether the poisoned final answer is changed: yes (``poison.keep_answer=False``), with a seeded wrong option
  per question (MedQA has no consistent decoy chapter).
- The SFT set size, counts, ratios, LoRA and optimiser settings, and seeds: the grid below (count and ratio
  as independent axes, both ratio definitions, forgetting at two sizes, 8 seeds).
- Mix sizes: the seed's protocol adds the poisoned (and correct target) samples to the clean non-target ones
  and sweeps poisoned / all samples independently of the count, so this preset keeps ``grid.equal_size=False``
  (1000 clean non-target samples + the additions): mixes range from 1001 rows (count 1) to 4000 (forgetting
  +3000) and take different numbers of optimiser steps. Read weight-shift detectors (``jaxpoison analyze``) on
  this run with that in mind (it flags a row-count confound), or add ``--set grid.equal_size=true --set
  "grid.ratios_all=()"`` for mixes of 1000 rows each (the additions then replace non-target samples).
- Evaluation: the paper parses a generated answer; here the likelihood of each option after the SFT prompt
  (``eval.format='mcq'``: '(X) option text'), which a 4B model reads well, with the ``statement`` format
  ('Question: ...\nAnswer: <option>') scored beside it as a secondary format (``eval.secondary_formats``; one
  more scoring pass). Generated answers: ``--set eval.gen_questions=N``.
- Catastrophic forgetting (finding 5): ``grid.forgetting_extra=(1000, 3000)`` on the additive mixes is clean
  non-target SFT on 2000 and 4000 rows, i.e. 2x and 4x the clean mix's optimiser steps (the real control; with
  ``grid.equal_size=true`` use ``grid.forgetting_steps`` instead, since equal-size forgetting cells swap rows).
"""
from jaxpoison.studies.rationale.config import DataConfig, EvalConfig, GridConfig, PoisonConfig, RationaleConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = RationaleConfig(
    name="paper: Qwen3-4B-Base, MedQA-zh (mainland), target fever",
    model="Qwen/Qwen3-4B-Base",
    dtype="bfloat16",
    data=DataConfig(source="medqa-zh", train_split="train", test_split="test", target="fever",
                    target_by="keywords", keywords=("发热", "发烧", "fever", "febrile", "pyrexia"),
                    n_nontarget=1000, n_nontarget_pool=4000, n_test_target=200, n_test_nontarget=800,
                    clean_rationales="model", max_len=768),
    poison=PoisonConfig(builder="model", keep_answer=False, use_decoy=False, max_new_tokens=160, gen_batch_size=32),
    grid=GridConfig(seeds=(0, 1, 2, 3, 4, 5, 6, 7), counts=(1, 2, 4, 8, 16, 32, 64),
                    kinds=("rationale", "overwrite"), ratios_target=(0.5, 0.25, 0.1), ratios_all=(0.1, 0.03),
                    forgetting_extra=(1000, 3000), clean_with_target=64, equal_size=False),
    train=TrainConfig(learning_rate=2e-4, schedule="linear", warmup_steps=10, epochs=2, batch_size=8,
                      grad_accum=2, loss_budget=-1, dtype="bfloat16", remat=True, variant_chunk=8, save_every=50),
    lora=LoraConfig(r=16, alpha=32, targets=("all",)),
    eval=EvalConfig(format="mcq", method="sum", batch_questions=8, variant_chunk=1, secondary_formats=("statement",)),
    note="The seed's own setting (GPU/TPU). Rationales are written by the base model: the paper's are not public.",
)
