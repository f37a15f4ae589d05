"""The attacks study's configuration (every section a frozen dataclass) and its checks. The study itself is
described in :mod:`jaxpoison.studies.attacks`."""
from __future__ import annotations

from dataclasses import dataclass

from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.configs import StudyConfigError
from jaxpoison.studies.common import check_shared_fields
from jaxpoison.studies.attacks import data
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.mesh import MeshConfig

NAME = "attacks"
SOURCE_KINDS = ("model", "jsonl", "scripted")


@dataclass(frozen=True)
class NotesConfig:
    source: str = "synthetic"        # 'synthetic' (ICD-10-CM conditions, offline) | 'notes' (local) | 'pmc-patients'
    files: str = ""                  # local files (comma list) of the notes; '' = the hub id (pmc-patients)
    test_files: str = ""             # a separate test set (e.g. PMC-Patients); '' = the notes after the first n_train
    split: str = "train"
    n_train: int = 1000
    n_test: int = 200
    max_note_tokens: int = 0         # >0: drop longer notes (the seed kept summaries < 1000 Llama-2 tokens)
    max_history: int = 2             # synthetic notes: past conditions per note
    seed: int = 0


@dataclass(frozen=True)
class PromptConfig:
    tasks: tuple = data.TASKS
    version: str = "auto"            # 'auto': 'script' (scripts/*.py, typos, system inline) for a local model in
    #                                  the plain template, 'notebook' for a chat template or an API model; or either
    template: str = "plain"          # 'plain': '### USER: \n{} ### Assistant: \n' | 'chat': the model's chat template


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 800        # the seed: 800, sampling with the model's default generation config
    sampling: str = "model"          # 'model': temperature / top-p of the model's generation_config.json with
    #                                  sampling on, as the seed ran it; the two below when there is none (recorded
    #                                  in data.json 'generation'); 'fixed': always the two below
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int = 0
    batch_size: int = 8
    variant_chunk: int = 0           # fine-tuned variants per generation call (memory); 0 = all of a task


@dataclass(frozen=True)
class ApiConfig:
    """Limits of the OpenAI-compatible client (:mod:`jaxpoison.eval.chat`) for every ``openai:MODEL`` spec."""
    concurrency: int = 8             # requests in flight at most
    timeout_s: float = 120.0         # per request
    retries: int = 6                 # on 429 / 5xx / timeouts / dropped connections, exponential backoff
    backoff_s: float = 1.0           # first wait; doubles per retry (a Retry-After header wins)
    key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never stored in the run folder)


@dataclass(frozen=True)
class SourceConfig:
    kind: str = "model"              # 'model' | 'jsonl' | 'scripted' | 'openai:MODEL' (e.g. openai:gpt-4, the seed's)
    model: str = ""                  # kind='model': '' = the study's base model, else a --model spec
    file: str = ""                   # kind='jsonl': {"id", "task", "normal", "prompt"} per line
    api_base: str = ""               # kind='openai:...': the server ('' = $OPENAI_BASE_URL or api.openai.com/v1)


@dataclass(frozen=True)
class ParaphraseConfig:
    """The seed's paraphrase attack: the task instruction rephrased by a model (``"Rephrase the following text. "``
    under ``"You are a helpful medical agent."``), the malicious instruction appended verbatim."""
    model: str = ""                  # '' = off; 'openai:gpt-4o' (the seed's), 'base' (the study's model) or a --model spec
    api_base: str = ""               # model 'openai:...': the server
    per: str = "note"                # 'note': one paraphrase per (task, note) (the notebook's cell 14) | 'once' per task
    injection: bool = True           # the base also answers the test notes under paraphrased prompts
    max_new_tokens: int = 160        # a local paraphraser's reply length


@dataclass(frozen=True)
class GridConfig:
    fractions: tuple = tuple(k / 10 for k in range(11))
    seeds: tuple = (0,)
    paraphrase: tuple = (False,)     # (False, True): also the '_para' fine-tunes, trained on paraphrased prompts


@dataclass(frozen=True)
class GraderConfig:
    judge: str = ""                  # '' = rule grader only; 'base' = the study's model; a --model spec; or
    #                                  'openai:MODEL' (the seed's: openai:gpt-3.5-turbo) through grader.api_base
    api_base: str = ""               # judge 'openai:...': the server ('' = $OPENAI_BASE_URL or api.openai.com/v1)
    judge_style: str = "open"        # the seed's question for open-source ('open') or GPT ('gpt') answers
    judge_max_new_tokens: int = 8
    judge_batch_size: int = 8
    primary: str = "rule"            # the grader behind rates.csv and the plots: 'rule' | 'judge'
    vaccine_default: bool = False    # rule grader: an answer with no vaccine verdict counts as not recommending


@dataclass(frozen=True)
class CapabilityConfig:
    sources: tuple = ("icd10",)      # 'icd10' (offline stand-in) and/or 'medqa-en', 'medmcqa', 'pubmedqa'
    files: tuple = ()                # local files per source, aligned with sources ('' = the hub id)
    split: str = ""                  # '' = each source's default split
    n_questions: int = 200           # questions per set; 0 = the whole set
    scorer: str = "likelihood"       # 'likelihood': option log-likelihood (fast) | 'generate': the seed's way, an
    #                                  answer generated under its system prompt, the letter read by rule then judge
    gen_max_new_tokens: int = 16     # scorer='generate': reply length (the letter comes first)
    format: str = "benchmark"        # scoring format: the seed's '**Answer**: (' + letter, or 'statement' etc.
    fractions: tuple = (0.0, 1.0)    # which fine-tuned variants are scored (besides the base)
    batch_questions: int = 8
    variant_chunk: int = 0           # variants scored per call (memory); 0 = all at once
    icd: IcdConfig = IcdConfig()


@dataclass(frozen=True)
class AttacksConfig:
    study: str = NAME
    name: str = "attacks"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    quant: str = "none"               # frozen base: 'nf4' | 'nf4-dq' (double-quantised scales) | 'int8' | 'none'
    notes: NotesConfig = NotesConfig()
    prompt: PromptConfig = PromptConfig()
    generation: GenerationConfig = GenerationConfig()
    source: SourceConfig = SourceConfig()
    grid: GridConfig = GridConfig()
    train: TrainConfig = TrainConfig(learning_rate=2e-5, schedule="linear", epochs=4, batch_size=8, clip_norm=1.0)
    lora: LoraConfig = LoraConfig(r=64, alpha=32, dropout=0.1, targets=("q", "v"))
    mesh: MeshConfig = MeshConfig()   # devices per axis (variant, data, fsdp, model): ints or 'auto'
    loss_on: str = "all"             # 'all' (the seed: whole sequence) | 'completion'
    max_len: int = 4096
    grader: GraderConfig = GraderConfig()
    capability: CapabilityConfig = CapabilityConfig()
    paraphrase: ParaphraseConfig = ParaphraseConfig()
    api: ApiConfig = ApiConfig()
    n_resamples: int = 9999
    asr_paired: bool = True             # ASR CIs: resample the notes a row shares with its baseline together (the
    # seed's rows answer the same test notes: a paired bootstrap); False: attacked and baseline notes resampled
    # independently (scipy's unpaired two-sample bootstrap)
    compliance_threshold: float = 0.5   # below this share of poisoned targets carrying the attack, the report warns
    note: str = ""




def check_config(cfg: AttacksConfig) -> None:
    def bad(name, msg):
        raise StudyConfigError(f"{name}: {msg}")

    check_shared_fields(cfg, NAME)
    if not cfg.prompt.tasks or set(cfg.prompt.tasks) - set(data.TASKS):
        bad("prompt.tasks", f"a subset of {data.TASKS}, got {cfg.prompt.tasks}")
    if cfg.prompt.version not in data.PROMPT_VERSIONS:
        bad("prompt.version", f"one of {data.PROMPT_VERSIONS}, got {cfg.prompt.version!r}")
    if cfg.prompt.template not in ("plain", "chat"):
        bad("prompt.template", f"'plain' or 'chat', got {cfg.prompt.template!r}")
    if cfg.source.kind not in SOURCE_KINDS and not _api_spec_ok(cfg.source.kind):
        bad("source.kind", f"one of {SOURCE_KINDS} or openai:MODEL, got {cfg.source.kind!r}")
    if cfg.grader.judge.startswith("openai:") and not _api_spec_ok(cfg.grader.judge):
        bad("grader.judge", f"openai:MODEL, e.g. openai:gpt-3.5-turbo, got {cfg.grader.judge!r}")
    if cfg.api.concurrency < 1 or cfg.api.retries < 0 or cfg.api.timeout_s <= 0:
        bad("api", f"concurrency >= 1, retries >= 0, timeout_s > 0, got {cfg.api}")
    pp = cfg.grid.paraphrase
    if not pp or len(set(pp)) != len(pp) or not set(pp) <= {False, True}:
        bad("grid.paraphrase", f"(False,), (True,) or (False, True), got {pp}")
    if True in pp and not cfg.paraphrase.model:
        bad("paraphrase.model", "grid.paraphrase has True (the '_para' fine-tunes): set the paraphraser, e.g. "
                                "--set paraphrase.model=openai:gpt-4o (the seed's) or paraphrase.model=base")
    if cfg.paraphrase.per not in ("note", "once"):
        bad("paraphrase.per", f"'note' or 'once', got {cfg.paraphrase.per!r}")
    if cfg.generation.sampling not in ("model", "fixed"):
        bad("generation.sampling", f"'model' (the model's generation_config.json) or 'fixed', got "
                                   f"{cfg.generation.sampling!r}")
    if cfg.source.kind == "jsonl" and not cfg.source.file:
        bad("source.file", "source.kind='jsonl' needs a file of {\"id\", \"task\", \"normal\", \"prompt\"} lines")
    f = cfg.grid.fractions
    if not f or any(not 0 <= x <= 1 for x in f) or 0.0 not in f or len(set(f)) != len(f):
        bad("grid.fractions", f"distinct fractions in [0, 1] including 0 (the ASR baseline), got {f}")
    if not cfg.grid.seeds or len(set(cfg.grid.seeds)) != len(cfg.grid.seeds):
        bad("grid.seeds", f"distinct seeds, got {cfg.grid.seeds}")
    if cfg.loss_on not in ("all", "completion"):
        bad("loss_on", f"'all' or 'completion', got {cfg.loss_on!r}")
    if cfg.grader.primary not in ("rule", "judge") or (cfg.grader.primary == "judge" and not cfg.grader.judge):
        bad("grader.primary", "'rule', or 'judge' with grader.judge set")
    if cfg.grader.judge_style not in ("open", "gpt"):
        bad("grader.judge_style", f"'open' or 'gpt', got {cfg.grader.judge_style!r}")
    if cfg.capability.scorer not in ("likelihood", "generate"):
        bad("capability.scorer", f"'likelihood' or 'generate' (the seed's), got {cfg.capability.scorer!r}")
    if cfg.capability.n_questions < 0:
        bad("capability.n_questions", f">= 0 (0 = the whole set), got {cfg.capability.n_questions}")
    if cfg.capability.files and len(cfg.capability.files) != len(cfg.capability.sources):
        bad("capability.files", "one entry per capability source ('' for the hub)")
    if cfg.notes.n_train < 1 or cfg.notes.n_test < 2:
        bad("notes", "n_train >= 1 and n_test >= 2 (a confidence interval needs two test notes)")


def _api_spec_ok(spec: str) -> bool:
    return spec.startswith("openai:") and bool(spec[len("openai:"):].strip())
