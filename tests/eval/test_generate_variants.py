"""Generation over a chosen subset of stacked adapters, the base among them, gathers one chunk at a time."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attacks_tiny import tiny_lm, tiny_variants
import jaxpoison.eval.generate_variants as gv
from jaxpoison.models.generate import generate_text

PROMPTS = ["Patient: 67-year-old man. Fever", "The condition is classified in the chapter", "Answer: (A)"]


def test_selected_variants_and_the_base_without_a_zero_adapter_stack(monkeypatch):
    lm, (lora, scale) = tiny_lm(), tiny_variants(4)
    kw = dict(max_new_tokens=5, seed=3, batch_size=2, lora_scale=scale, temperature=1.0)
    pick = [gv.BASE, 2, 0]
    # the old way: a zero adapter concatenated in front of every adapter, then the rows taken from that
    stacked = jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x]), lora)
    old = gv.generate_text_variants(lm, PROMPTS, gv.take_variants(stacked, [v + 1 for v in pick]),
                                    variant_chunk=2, **kw)
    sizes = []
    real = gv.generate_tokens_variants
    monkeypatch.setattr(gv, "generate_tokens_variants",
                        lambda l, *a, **k: sizes.append({x.shape[0] for x in jax.tree.leaves(l)}) or real(l, *a, **k))
    for where in (lora, jax.tree.map(np.asarray, lora)):          # device arrays, host arrays
        sizes.clear()
        new = gv.generate_text_variants(lm, PROMPTS, where, variants=pick, variant_chunk=2, **kw)
        assert new == old
        assert sizes and all(s == {2} for s in sizes), sizes   # one chunk per call, never the stack
    assert new[0] == generate_text(lm, PROMPTS, **kw)         # the base row is the base model
    assert new[1] == generate_text(lm, PROMPTS, lora=jax.tree.map(lambda x: x[2], lora), **kw)


def test_take_variants_base_rows_and_bad_indices():
    _, (lora, _) = tiny_lm(), tiny_variants(3)
    host = jax.tree.map(np.asarray, lora)
    for src in (lora, host):
        got = gv.take_variants(src, [1, gv.BASE])
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(src)):
            assert type(x) is type(y) or isinstance(x, jax.Array)
            np.testing.assert_array_equal(np.asarray(x[0]), np.asarray(y[1]))
            assert not np.asarray(x[1]).any()
        assert gv.take_variants(src, [0, 1, 2]) is src          # all, in order: the caller's arrays
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        gv.take_variants(lora, [3])
