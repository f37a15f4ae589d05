"""Seed 003 in the paper's setting: a Llama-family chat model, MIMIC summaries, the full poison grid.

Sized for a TPU v5e-8 (``v5e:2x4``, 8 chips of 16 GiB) with the NF4 base (``quant='nf4'``, as the seed's 4-bit
QLoRA). ``python -m jaxpoison plan configs/attacks_paper.py --topology v5e-8`` says it fits (an ahead-of-time XLA
compile for abstract chips, not a run): 99 variants (3 tasks x 11 fractions x 3 seeds) in 33 chunks of 3, each
variant's batch of 8 split over the 8 chips (mesh data=8); per chip the train segment holds 5.21 GiB of arguments
(NF4 base, replicated, + 3 variants' fp32 LoRA and Adam state) and 8.54 GiB of temporaries (splash attention, full
remat), 13.75 GiB of 15.75 (analytic model: 13.1). The evaluation calls run on one chip and are sized to fit it:
generation one fine-tune x 2 prompts per call (``generation.variant_chunk=1``, ``generation.batch_size=2``; 1280
prompt tokens + 800 new, 11.07 GiB; 4 prompts need 17.1 GiB; sample keys are drawn per batch of 2), capability scoring one adapter x one question
(``capability.variant_chunk=1``, ``capability.batch_questions=1``; at the 4096-token bound, 13.24 GiB). 500
optimiser steps per variant (49,500 variant-steps, 7.5e19 FLOPs at max_len 4096, an upper bound): 37.7 h and 302
chip-hours of training at 35 % MFU. One H100-80GB (``--device h100-80gb``, analytic): 60.2 GiB, 58 h.
Run: ``python -m jaxpoison run configs/attacks_paper.py --out runs/attacks_paper`` with the model in the Hugging
Face cache (or a local directory: ``--set model=/path/to/Llama-2-7b-chat-hf``) and the notes as local files.

What this preset fixes, following what the seed's code effectively ran (docs/studies/attacks.md):
- LoRA r 64, alpha 32, dropout 0.1 on q and v (the trainer's PEFT default; the 8-module list the script declared
  was attached to a dead adapter; ``--set lora.targets=q,k,v,o,gate,up,down,lm_head`` runs it anyway), 4 epochs,
  batch 8, LR 2e-5 with linear decay and no warmup (the trl defaults that ran, not the 1e-5 constant the script
  declared), clip 1.0, loss on the whole sequence (``loss_on='completion'`` is the option), max length 4096.
- Poison fractions 0, 10, ..., 100 % of the training notes, one seeded subset per seed shared by the three tasks
  (the seed shuffled without a seed), one adapter per task, 3 seeds.
- Notes: the seed's 1201 GPT-4-shortened MIMIC-III summaries (credentialed data; bring them as a JSONL/CSV with an
  id and a text column). The first 1000 train and the next 200 test, so no note is in both (the seed's note 1000
  was). PMC-Patients as the test set: ``--set notes.test_files=pmc_patients_200.jsonl``.
- Prompts: ``prompt.version='auto'`` = the strings the authors ran on each kind of model: the script strings of
  ``scripts/train_lora.py`` / ``scripts/get_finetune.py`` (system sentence inline, their typos) in the plain
  ``### USER:`` template for the local model (training and testing), the notebook strings with a system role
  for API models (``source.kind=openai:gpt-4``, the judge). ``--set prompt.version=notebook`` sends the notebook
  strings everywhere.
- Generation: up to 800 new tokens, sampling on with the temperature / top-p of the model's own
  generation_config.json (``generation.sampling='model'``, as the seed ran it; 0.6 / 0.9 for the Llama-2/3 chat
  models, which are also the fallback when the file is missing; data.json records which ran), a fixed seed,
  attention mask and special tokens handled.
- Response source: the seed trained on GPT-4's answers. Without them the base model answers (``source.kind=model``);
  with them: ``--set source.kind=jsonl --set source.file=gpt4_answers.jsonl`` ({"id", "task", "normal", "prompt"}).
- Grading: the rule grader; the seed's GPT-3.5 judge with ``--set grader.judge=openai:gpt-3.5-turbo`` (key in
  ``$OPENAI_API_KEY``, any OpenAI-compatible server with ``--set grader.api_base=URL``; every request and reply
  cached in the run folder) or any local model with ``--set grader.judge=ID``; its yes/no parsed as a word, not the
  seed's substring test. ``--set source.kind=openai:gpt-4`` asks GPT-4 for the training targets as the seed did;
  ``--set paraphrase.model=openai:gpt-4o --set grid.paraphrase=False,True`` adds the paraphrase attack and the
  '_para' fine-tunes.
- General capability: MedQA (4 options), MedMCQA and PubMedQA accuracy of the 0 % and 100 % variants over the
  whole sets (``n_questions=0``, as the seed scored them), by the likelihood of each option letter after the seed's
  benchmark prompt (fast), bootstrap SE; ``--set capability.scorer=generate`` scores them the seed's way: an
  answer generated under its system prompt "Answer the following questions with medical knowledge. ", the letter
  read from its first character, else by the judge (``grader.judge``) with the seed's extraction prompt.
- QLoRA: the frozen base in NF4 (block 64, fp32 absmax) with bf16 compute, as the seed loaded it
  (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bfloat16)``; its
  ``bnb_4bit_use_double_quant`` line is commented out, so no double quantisation: ``--set quant=nf4-dq`` adds it,
  ``--set quant=none`` trains on the bf16 base). :mod:`jaxpoison.models.quant`.
"""
from jaxpoison.studies.attacks.config import (AttacksConfig, CapabilityConfig, GenerationConfig, GraderConfig,
                                              GridConfig, NotesConfig, PromptConfig, SourceConfig)
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

CONFIG = AttacksConfig(
    name="paper: Llama-2-7B-chat, MIMIC summaries, poison 0-100 %",
    model="meta-llama/Llama-2-7b-chat-hf",
    dtype="bfloat16",
    quant="nf4",
    notes=NotesConfig(source="notes", files="data/mimic_shortened_summaries.jsonl", n_train=1000, n_test=200,
                      max_note_tokens=1000),
    prompt=PromptConfig(version="auto", template="plain"),
    generation=GenerationConfig(max_new_tokens=800, temperature=0.6, top_p=0.9, seed=0, batch_size=2, variant_chunk=1),
    source=SourceConfig(kind="model"),
    grid=GridConfig(fractions=tuple(k / 10 for k in range(11)), seeds=(0, 1, 2)),
    train=TrainConfig(learning_rate=2e-5, schedule="linear", warmup_steps=0, epochs=4, batch_size=8, clip_norm=1.0,
                      dtype="bfloat16", remat=True, variant_chunk=3, save_every=100),
    lora=LoraConfig(r=64, alpha=32, dropout=0.1, targets=("q", "v")),
    loss_on="all",
    max_len=4096,
    grader=GraderConfig(judge="", judge_style="open"),
    capability=CapabilityConfig(sources=("medqa-en", "medmcqa", "pubmedqa"), n_questions=0, format="benchmark",
                                fractions=(0.0, 1.0), batch_questions=1, variant_chunk=1),
    note="The seed's open-source setting (GPU/TPU). Bring MIMIC summaries (and GPT-4 answers if you have them).",
)
