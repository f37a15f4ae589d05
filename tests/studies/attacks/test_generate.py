"""Generation vmapped over stacked LoRA variants answers exactly as each variant does alone."""

import jax

from jaxpoison.eval.generate_variants import generate_text_variants
from jaxpoison.models.generate import generate_text
from attacks_tiny import tiny_lm as _lm, tiny_variants as _variants

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
