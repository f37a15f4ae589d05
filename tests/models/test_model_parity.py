"""Our decoder equals transformers' PyTorch models on the same weights (fp32, padded batches included)."""
import numpy as np
import pytest

import jax.numpy as jnp

from hf_tiny import FAMILIES, hf_logprobs, make_hf_model
from jaxpoison.models.lm import load_model, sequence_logprobs


def _batch(vocab, rng):
    B, T = 4, 19
    tokens = rng.integers(3, vocab, size=(B, T))
    mask = np.ones((B, T), bool)
    mask[1, 13:] = False          # right padding
    mask[2, :6] = False           # left padding
    mask[3, :2] = False
    mask[3, 17:] = False          # both
    tokens = np.where(mask, tokens, 0)
    return tokens.astype(np.int32), mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logprobs_equal_transformers(family, tmp_path):
    model = make_hf_model(family)
    model.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), tokenizer=False)
    assert lm.cfg.model_type == FAMILIES[family]["model_type"]
    tokens, mask = _batch(lm.cfg.vocab_size, np.random.default_rng(1))
    ours = np.asarray(sequence_logprobs(lm.params, jnp.asarray(tokens), jnp.asarray(mask), cfg=lm.cfg, chunk=8))
    ref = hf_logprobs(model, tokens, mask)
    valid = mask[:, 1:] & mask[:, :-1]
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=0)
    # a padded row scores its real tokens exactly as the same row alone, unpadded
    row = tokens[2, 6:][None]
    alone = np.asarray(sequence_logprobs(lm.params, jnp.asarray(row), jnp.ones_like(row, bool), cfg=lm.cfg))
    np.testing.assert_allclose(ours[2, 6:], alone[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama_gqa_rope3", "qwen3_qknorm", "qwen2_bias"])
def test_greedy_generation_equals_transformers(family, tmp_path):
    """KV-cached greedy decoding from left-padded prompts gives transformers' greedy tokens."""
    import torch
    from jaxpoison.models.generate import generate_tokens, left_pad

    model = make_hf_model(family, seed=3)
    model.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), tokenizer=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, lm.cfg.vocab_size, n).tolist() for n in (7, 12, 3)]
    toks, mask = left_pad(prompts, 0, 16)
    out, lens = generate_tokens(lm.params, jnp.asarray(toks), jnp.asarray(mask), jnp.zeros(2, jnp.uint32),
                                cfg=lm.cfg, max_new_tokens=10, eos_ids=(), pad_id=0)
    out = np.asarray(out)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].numpy()
        np.testing.assert_array_equal(out[i], ref)
