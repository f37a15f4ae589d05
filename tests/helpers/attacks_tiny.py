"""Tiny models and configs shared by the attack-study tests."""
import dataclasses
import functools
import jax
import jax.numpy as jnp
from data_helpers import tiny_tokenizer
from tiny import TINY
from jaxpoison.models.decoder import init_params
from jaxpoison.models.lm import LM
from jaxpoison.train.lora import LoraConfig, init_lora, stack_variants
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.studies.attacks import config
from jaxpoison.train.config import TrainConfig


GEN_CFG = dataclasses.replace(TINY, vocab_size=448, eos_token_id=(3,))

@functools.lru_cache(maxsize=1)
def tiny_params():
    """The tiny random base shared by the attacks tests (one Flax init per test process)."""
    return init_params(GEN_CFG, jax.random.PRNGKey(0))

def tiny_lm():
    return LM(GEN_CFG, tiny_params(), tiny_tokenizer(), "tiny", "", jnp.float32)

def tiny_variants(V=3):
    lc = LoraConfig(r=2, alpha=4, targets=("q", "v"))
    trees = []
    for v in range(V):
        t = init_lora(jax.random.PRNGKey(10 + v), GEN_CFG, lc)
        for m in t:   # non-zero b so that every variant answers differently
            t[m]["b"] = 0.5 * jax.random.normal(jax.random.PRNGKey(100 + v), t[m]["b"].shape)
        trees.append(t)
    return stack_variants(trees), lc.scale


ICD = IcdConfig(seed=0, chapters=("circulatory", "respiratory", "digestive", "skin"), n_train_per_chapter=2,
                n_test_per_chapter=3, keyword_subjects=(), n_keyword_train=0, n_keyword_test=0,
                decoys=(("circulatory", "respiratory"),), max_desc_chars=40)

PIPE_CFG = config.AttacksConfig(
    name="tiny", notes=config.NotesConfig(n_train=4, n_test=3, max_history=0),
    prompt=config.PromptConfig(template="chat"),
    generation=config.GenerationConfig(max_new_tokens=6, temperature=0.0, batch_size=6, variant_chunk=3),
    source=config.SourceConfig(kind="scripted"), grid=config.GridConfig(fractions=(0.0, 0.5, 1.0), seeds=(0, 1)),
    train=TrainConfig(learning_rate=1e-2, epochs=1, batch_size=2, log_every=2),
    lora=LoraConfig(r=2, alpha=4, dropout=0.1, targets=("q", "v")), max_len=768, loss_on="completion",
    grader=config.GraderConfig(judge="base", judge_max_new_tokens=2, judge_batch_size=8),
    capability=config.CapabilityConfig(sources=("icd10",), n_questions=6, format="statement", icd=ICD, batch_questions=6),
    n_resamples=999)
