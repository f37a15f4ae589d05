"""Generation vmapped over stacked LoRA variants answers exactly as each variant does alone."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from test_data_helpers import tiny_tokenizer

from tiny import TINY
from jaxpoison.eval.generate_variants import generate_text_variants, take_variants
from jaxpoison.models.decoder import init_params
from jaxpoison.models.generate import generate_text
from jaxpoison.models.lm import LM
from jaxpoison.train.lora import LoraConfig, init_lora, stack_variants

CFG = dataclasses.replace(TINY, vocab_size=448, eos_token_id=(3,))


@functools.lru_cache(maxsize=1)
def tiny_params():
    """The tiny random base shared by the attacks tests (one Flax init per test process)."""
    return init_params(CFG, jax.random.PRNGKey(0))


def _lm():
    return LM(CFG, tiny_params(), tiny_tokenizer(), "tiny", "", jnp.float32)


def _variants(V=3):
    lc = LoraConfig(r=2, alpha=4, targets=("q", "v"))
    trees = []
    for v in range(V):
        t = init_lora(jax.random.PRNGKey(10 + v), CFG, lc)
        for m in t:   # non-zero b so that every variant answers differently
            t[m]["b"] = 0.5 * jax.random.normal(jax.random.PRNGKey(100 + v), t[m]["b"].shape)
        trees.append(t)
    return stack_variants(trees), lc.scale


PROMPTS = ["### USER: \n You are a medical assistant ### Assistant: \n", "Patient: 67-year-old man. Fever",
           "The condition is classified in the chapter", "Answer: (A)", "Question: Which ICD-10-CM chapter"]


def test_vmapped_variants_equal_per_variant_generation():
    lm, (lora, scale) = _lm(), _variants(3)
    kw = dict(max_new_tokens=6, seed=5, batch_size=2, lora_scale=scale)
    greedy = generate_text_variants(lm, PROMPTS, lora, **kw)
    assert len(greedy) == 3 and all(len(r) == len(PROMPTS) for r in greedy)
    for v in range(3):
        assert greedy[v] == generate_text(lm, PROMPTS, lora=jax.tree.map(lambda x: x[v], lora), **kw)
    assert greedy[0] != greedy[1]                       # the adapters matter
    sampled = generate_text_variants(lm, PROMPTS, lora, temperature=1.0, variant_chunk=2, **kw)   # 2 + 1 padded
    assert sampled[1] == generate_text(lm, PROMPTS, lora=jax.tree.map(lambda x: x[1], lora), temperature=1.0, **kw)
