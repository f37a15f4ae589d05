"""Option scoring: one vmapped program over adapters equals scoring each adapter alone and a direct computation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from tiny import TINY
from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
from jaxpoison.data.pool import build_mc_eval
from jaxpoison.eval.score import choice_metrics, score_options, split_shared_prefix
from jaxpoison.models.decoder import init_params
from jaxpoison.models.lm import sequence_logprobs
from jaxpoison.train.lora import LoraConfig, init_lora, stack_variants

CFG = dataclasses.replace(TINY, vocab_size=448)       # the tiny tokenizer has 420 tokens
BASE = init_params(CFG, jax.random.PRNGKey(0))
LC = LoraConfig(r=4, alpha=8, targets=("q", "v", "down", "lm_head"))
EXS = build_icd10_set(IcdConfig(seed=0, chapters=("circulatory", "respiratory", "digestive", "skin"),
                                n_train_per_chapter=1, n_test_per_chapter=2, n_keyword_train=1,
                                n_keyword_test=1, decoys=(("circulatory", "respiratory"),)))["test"][:7]


def random_lora(i):
    lora = init_lora(jax.random.PRNGKey(10 + i), CFG, LC)
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(100 + i), x.shape), lora)


LORAS = [random_lora(i) for i in range(3)]
STACK = stack_variants(LORAS)


def direct(tokens, cont, attn, lora=None):
    """sum of log p over continuation tokens, every (question, option) row in full, via sequence_logprobs."""
    Q, C, T = tokens.shape
    lp = sequence_logprobs(BASE, jnp.asarray(tokens.reshape(Q * C, T)), jnp.asarray(attn.reshape(Q * C, T)),
                           cfg=CFG, lora=lora, lora_scale=LC.scale)
    return (np.asarray(lp) * cont.reshape(Q * C, T)[:, 1:]).sum(-1).reshape(Q, C)


@pytest.fixture(scope="module")
def mc():
    return build_mc_eval(EXS, tiny_tokenizer(), "statement")


def test_vmapped_scores_equal_alone_and_direct(mc):
    assert split_shared_prefix(mc.tokens, mc.cont_mask, mc.attn_mask) is not None
    together = score_options(BASE, CFG, mc, STACK, lora_scale=LC.scale, batch_questions=3)
    plain = score_options(BASE, CFG, mc, STACK, lora_scale=LC.scale, batch_questions=3, path="plain")
    assert together.sum.shape == (3, len(EXS), 4) and together.uncond.shape == (3, len(EXS), 4)
    np.testing.assert_allclose(together.sum, plain.sum, atol=2e-4)
    np.testing.assert_allclose(together.uncond, plain.uncond, atol=2e-4)
    for v, lora in enumerate(LORAS):
        alone = score_options(BASE, CFG, mc, jax.tree.map(lambda x: x[None], lora), lora_scale=LC.scale,
                              batch_questions=3, calibrate=False)
        np.testing.assert_allclose(together.sum[v], alone.sum[0], atol=2e-4)
    ref = direct(mc.tokens, mc.cont_mask, mc.attn_mask, LORAS[1])
    np.testing.assert_allclose(together.sum[1], ref, atol=2e-4)
    ref_u = direct(mc.uncond_tokens, mc.uncond_cont_mask, mc.uncond_attn_mask, LORAS[1])
    np.testing.assert_allclose(together.uncond[1], ref_u, atol=2e-4)
    np.testing.assert_allclose(together.calibrated[1], ref - ref_u, atol=4e-4)
    assert (together.n_tokens == (mc.cont_mask[..., 1:] > 0).sum(-1)).all()
    np.testing.assert_allclose(together.mean, together.sum / together.n_tokens)


def test_long_shared_prompt_mcq_format():
    """The 'mcq' format: a long shared prompt (question + lettered options), short continuations."""
    mc = build_mc_eval(EXS, tiny_tokenizer(), "mcq")
    got = score_options(BASE, CFG, mc, STACK, lora_scale=LC.scale, batch_questions=4, calibrate=False)
    np.testing.assert_allclose(got.sum[2], direct(mc.tokens, mc.cont_mask, mc.attn_mask, LORAS[2]), atol=2e-4)


def test_zero_shot_is_the_base_alone(mc):
    zs = score_options(BASE, CFG, mc, None, batch_questions=5, calibrate=False)
    assert zs.sum.shape == (1, len(EXS), 4) and zs.uncond is None
    np.testing.assert_allclose(zs.sum[0], direct(mc.tokens, mc.cont_mask, mc.attn_mask), atol=2e-4)
    with pytest.raises(ValueError, match="calibrate=True"):
        zs.method("calibrated")
    # an adapter of zeros is the base exactly (the study scores zero-shot that way, in the same program)
    zero = jax.tree.map(lambda x: jnp.zeros_like(x[:1]), STACK)
    same = score_options(BASE, CFG, mc, zero, lora_scale=LC.scale, batch_questions=3, calibrate=False)
    np.testing.assert_allclose(same.sum, zs.sum, atol=1e-5)


def test_plain_path_without_a_shared_prefix(mc):
    """Options whose prefixes differ (here: a question's options cut at different points) use the plain path."""
    tokens, cont, attn = mc.tokens.copy(), mc.cont_mask.copy(), mc.attn_mask.copy()
    tokens[0, 1, 0] = (tokens[0, 1, 0] + 1) % 400
    odd = dataclasses.replace(mc, tokens=tokens, cont_mask=cont, attn_mask=attn)
    assert split_shared_prefix(tokens, cont, attn) is None
    with pytest.raises(ValueError, match="plain"):
        score_options(BASE, CFG, odd, STACK, path="shared_prefix")
    got = score_options(BASE, CFG, odd, STACK, lora_scale=LC.scale, batch_questions=3, calibrate=False)
    assert got.sum.shape == (3, len(EXS), 4)
    np.testing.assert_allclose(got.sum[2], direct(tokens, cont, attn, LORAS[2]), atol=2e-4)


def test_choice_metrics():
    s = np.array([[[0, 1, 0], [2, 0, 0], [0, 0, 3]],
                  [[1, 0, 0], [0, 0, 1], [0, 1, 0]]], float)
    m = choice_metrics(s, answer=np.array([1, 0, 2]), decoy=np.array([0, 2, -1]))
    assert m["pick"].tolist() == [[1, 0, 2], [0, 2, 1]]
    np.testing.assert_allclose(m["accuracy"], [1.0, 0.0])
    np.testing.assert_allclose(m["decoy_rate"], [0.0, 1.0])      # over the two questions that have a decoy
    assert np.isnan(choice_metrics(s, np.zeros(3, int), np.full(3, -1))["decoy_rate"]).all()


def test_layers_no_adapter_touches_run_once_with_the_same_scores(mc):
    from jaxpoison.eval.score import shared_layers
    cfg = dataclasses.replace(CFG, num_layers=4)
    base = init_params(cfg, jax.random.PRNGKey(1))
    lc = LoraConfig(r=4, alpha=8, targets=("q", "v", "down", "lm_head"), layers_from=2)
    loras = []
    for i in range(3):   # trained on the top 2 layers: rows 0-1 exactly zero (init_lora makes them so)
        lo = init_lora(jax.random.PRNGKey(20 + i), cfg, lc)
        loras.append({m: {n: (w if m == "lm_head" else w.at[2:].add(0.05 * jax.random.normal(
            jax.random.PRNGKey(30 + i), w[2:].shape))) for n, w in ab.items()} for m, ab in lo.items()})
    loras[1]["q"]["a"] = loras[1]["q"]["a"].at[1].set(1.0)     # A set, B zero: layer 1 still untouched
    stack = stack_variants(loras)
    assert shared_layers(stack, 4) == 2
    for path in ("auto", "plain"):
        kw = dict(lora_scale=lc.scale, batch_questions=3, path=path)
        fast = score_options(base, cfg, mc, stack, **kw)
        slow = score_options(base, cfg, mc, stack, share_trunk=False, **kw)
        np.testing.assert_allclose(fast.sum, slow.sum, atol=1e-5)
        np.testing.assert_allclose(fast.uncond, slow.uncond, atol=1e-5)
        # the base riding on the shared trunk of the first chunk equals the base alone, and the chunks are kept
        both = score_options(base, cfg, mc, stack, with_base=True, variant_chunk=2, **kw)
        alone = score_options(base, cfg, mc, None, **kw)
        np.testing.assert_allclose(both.sum, np.concatenate([alone.sum, slow.sum]), atol=1e-5)
        np.testing.assert_allclose(both.uncond, np.concatenate([alone.uncond, slow.uncond]), atol=1e-5)
    # one variant's non-zero row in layer 0 (A and B) and no layer is shared; fresh adapters (B = 0) share all
    # but the top layer
    bad = jax.tree.map(lambda x: x, stack)
    bad["v"] = {"a": bad["v"]["a"].at[2, 0].set(0.1), "b": bad["v"]["b"].at[2, 0].set(0.1)}
    assert shared_layers(bad, 4) == 0
    fresh = stack_variants([init_lora(jax.random.PRNGKey(i), cfg, LoraConfig(r=4, alpha=8)) for i in range(2)])
    assert shared_layers(fresh, 4) == 3 and shared_layers(None, 4) == 0


@pytest.mark.parametrize("path", ["auto", "plain"])
def test_with_base_equals_a_zero_adapter_in_front_without_stacking_one(mc, path, monkeypatch):
    """``with_base=True`` scores the base once with the adapter term off and the adapters chunk by chunk from
    the caller's arrays: the same scores as the old way (a zero adapter concatenated in front of all of them),
    and no program ever receives a [V + 1, ...] stack or more than one chunk of adapters; the base rides in the
    first chunk's program (base_row), not a program of its own."""
    import jaxpoison.eval.score as score
    stack = stack_variants([random_lora(i) for i in range(5)])           # V = 5, chunks of 2: 2 + 2 + 1
    old_stack = jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x]), stack)
    kw = dict(lora_scale=LC.scale, batch_questions=3, variant_chunk=2, path=path)
    old = score_options(BASE, CFG, mc, old_stack, **kw)
    seen, bases = [], []

    def spy(fn):
        def wrapped(lora, *a, **k):
            seen.append(None if lora is None else {x.shape[0] for x in jax.tree.leaves(lora)})
            bases.append(k.get("base_row", False))
            return fn(lora, *a, **k)
        return wrapped

    monkeypatch.setattr(score, "score_rows", spy(score.score_rows))
    monkeypatch.setattr(score, "score_shared_prefix", spy(score.score_shared_prefix))
    for lora in (stack, jax.tree.map(np.asarray, stack)):                 # device arrays, host arrays
        seen.clear(), bases.clear()
        new = score_options(BASE, CFG, mc, lora, with_base=True, **kw)
        assert new.sum.shape == old.sum.shape == (6, len(EXS), 4)
        # within 1e-6 relative (sums near -60: one float32 ulp there is 3.8e-6; other chunk sizes move the
        # vmapped programs' rounding by that much, the scores no more)
        np.testing.assert_allclose(new.sum, old.sum, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(new.uncond, old.uncond, rtol=1e-6, atol=1e-6)
        # chunks of 2 models: the base and adapter 0, then 1-2 and 3-4; no call holds more than 2 models
        assert None not in seen and all(s <= {1, 2} for s in seen), seen
        assert any(bases) and all(s == {1} for s, b in zip(seen, bases) if b), (seen, bases)
    # a subset in another order: its rows gathered a chunk at a time, never the whole selection at once
    seen.clear()
    sub = score_options(BASE, CFG, mc, stack, with_base=True, variants=[4, 1, 2], **kw)
    np.testing.assert_allclose(sub.sum, old.sum[[0, 5, 2, 3]], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sub.uncond, old.uncond[[0, 5, 2, 3]], rtol=1e-6, atol=1e-6)
    assert all(s is None or s <= {1, 2} for s in seen), seen
    # the base row is the base alone
    alone = score_options(BASE, CFG, mc, None, batch_questions=3, path=path)
    np.testing.assert_allclose(new.sum[0], alone.sum[0], rtol=1e-6, atol=1e-6)


def test_passes_never_put_more_than_variant_chunk_models_in_a_call():
    """The base takes one adapter's place in the first call, or has a call of its own when the chunk is 1."""
    from jaxpoison.eval.score import _passes
    lora = {"a": np.zeros((7, 1))}

    def show(*a, **k):
        return [None if p is None else p.tolist() for p in _passes(lora, *a, **k)]

    assert show(3, True) == [[0, 1], [2, 3, 4], [5, 6]]
    assert show(3, False) == [[0, 1, 2], [3, 4, 5], [6]]
    assert show(1, True) == [None, [0], [1], [2], [3], [4], [5], [6]]
    assert show(0, True) == [[0, 1, 2, 3, 4, 5, 6]]
    assert show(2, True, variants=[4, 1]) == [[4], [1]]
    # a variant mesh axis of 2: the calls beside the base stay a multiple of it (padded where short)
    assert show(4, True, multiple=2) == [[0, 1], [2, 3, 4, 5], [6]]
    assert show(2, True, multiple=2) == [None, [0, 1], [2, 3], [4, 5], [6]]
    assert show(0, True, variants=[]) == [None] and show(0, False, variants=[]) == []
