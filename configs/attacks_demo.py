"""Seed 003 demo: prompt injection and poisoned fine-tuning on the embedded default, sized for 2 CPU cores.

SmolLM2-135M-Instruct (embedded) answers SYNTHETIC patient notes (real ICD-10-CM conditions, no real patients)
for the three tasks, in its chat template with the seed's notebook strings. Prompt injection: the base model on
16 test notes, normal vs attacked prompt. Poisoned fine-tuning: 12 training notes, poison fractions 0 / 50 /
100 % for each task = 9 LoRA variants trained in one vmapped program, then each answers its task's 16 clean
test prompts in one vmapped generation. General capability: ICD-10-CM questions scored by option-text
likelihood (letters are at chance for a 135M model, so the seed's letter prompt could not show a drop).

How it is scaled down from configs/attacks_paper.py, and why:
- Response source: scripted compliant answers (``source.kind='scripted'``), not the base model. Measured on 12
  synthetic notes (chat template, greedy, 64 new tokens) the base model carried the attack in 100 % of its
  vaccine answers but 17 % of drug and 0 % of lab-test answers, so fine-tuning on its own answers could not show
  the attack for most outcomes; the report states the measured rate of this run. ``--set source.kind=model``
  runs the default (the base model's own answers) at the cost of 72 more generations.
- Short answers (48 new tokens, greedy: ``sampling='fixed'``, not the model's generation config), 12 training notes, 3 fractions, 1 seed, loss on the completion only
  (the answer is the only part that differs between clean and poisoned targets), LoRA r 8 on q and v at a
  constant learning rate of 6e-3 for 2 epochs (6 steps of 4), where the seed ran r 64, LR 2e-5 linear and 4
  epochs over 1000 notes. A probe with 8 notes, 100 % poison and 6 steps: LR 2e-3 (linear) taught the drug
  attack to 0 of 8 test answers, 5e-3 to 3 of 8.
- Every variant costs a full forward and backward pass over ~250-token sequences; variants train in chunks of 3
  (about 2 GB of activations each).
"""
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.attacks.config import (AttacksConfig, CapabilityConfig, GenerationConfig, GraderConfig,
                                              GridConfig, NotesConfig, PromptConfig, SourceConfig)
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = AttacksConfig(
    name="demo (SmolLM2-135M, synthetic notes, scripted source)",
    model="smollm2-135m",
    notes=NotesConfig(source="synthetic", n_train=12, n_test=16, max_history=0, seed=0),
    prompt=PromptConfig(version="notebook", template="chat"),
    generation=GenerationConfig(max_new_tokens=48, sampling="fixed", temperature=0.0, top_p=1.0, seed=0, batch_size=16),
    source=SourceConfig(kind="scripted"),
    grid=GridConfig(fractions=(0.0, 0.5, 1.0), seeds=(0,)),
    train=TrainConfig(learning_rate=6e-3, schedule="constant", epochs=2, batch_size=4, clip_norm=1.0, log_every=3,
                      variant_chunk=3),
    lora=LoraConfig(r=8, alpha=16, dropout=0.1, targets=("q", "v")),
    loss_on="completion",
    max_len=512,
    grader=GraderConfig(judge=""),
    capability=CapabilityConfig(sources=("icd10",), n_questions=48, format="statement", fractions=(0.0, 1.0),
                                batch_questions=16, icd=IcdConfig(max_desc_chars=40, n_test_per_chapter=8)),
    note="The README's attacks demo: seed 003 on the embedded default in about a quarter of an hour on 2 CPU cores.",
)
