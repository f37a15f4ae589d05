"""Chunked cross-entropy equals the plain one; accumulation and variant chunking change nothing."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tiny import TINY, tiny_base, tiny_study
from jaxpoison.models.decoder import Decoder
from jaxpoison.models.heads import logits as head_logits, token_logprobs
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static, loss_terms
from jaxpoison.train.lora import LoraConfig, init_lora
from jaxpoison.train.trainer import train_study


def _plain_loss(lora, base, toks, lm, am, lc):
    h, _ = Decoder(TINY, jnp.float32, lc.scale).apply({"params": base}, toks, am, lora=lora)
    z = head_logits(base, TINY, h[:, :-1], lora, lc.scale)          # the whole [B, T, V] at once
    lp = jnp.take_along_axis(jax.nn.log_softmax(z, -1), toks[:, 1:, None], -1)[..., 0]
    w = lm[:, 1:] * am[:, 1:]
    return -(lp * w).sum()


@pytest.mark.parametrize("targets", [("q", "v"), ("q", "down", "lm_head")])
@pytest.mark.parametrize("chunk,budget", [(3, 0), (16, 0), (4, 9)])
def test_chunked_loss_and_grads_equal_plain(targets, chunk, budget):
    base, sd = tiny_base(), tiny_study(V=1)
    lc = LoraConfig(r=4, alpha=8, targets=targets)
    lora = init_lora(jax.random.PRNGKey(0), TINY, lc)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), lora)  # b != 0
    toks, lm, am = (jnp.asarray(x[:6]) for x in (sd.tokens, sd.loss_mask, sd.attn_mask))
    st = Static(TINY, TrainConfig(head_chunk=chunk, loss_budget=budget), lc)
    f = lambda l: loss_terms(l, base, toks, lm, am, jax.random.PRNGKey(2), st)[0]
    g = lambda l: _plain_loss(l, base, toks, lm, am, lc)
    (l1, g1), (l2, g2) = jax.value_and_grad(f)(lora), jax.value_and_grad(g)(lora)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g1)) > 1e-4


def test_token_logprobs_gradient_wrt_hidden():
    base = tiny_base()
    h = jax.random.normal(jax.random.PRNGKey(0), (2, 7, TINY.hidden_size))
    t = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, TINY.vocab_size)
    w = jax.random.uniform(jax.random.PRNGKey(2), (2, 7))
    f = lambda h: (token_logprobs(base, TINY, h, t, chunk=3) * w).sum()
    ref = lambda h: (jnp.take_along_axis(jax.nn.log_softmax(head_logits(base, TINY, h), -1), t[..., None], -1)[..., 0]
                     * w).sum()
    np.testing.assert_allclose(jax.grad(f)(h), jax.grad(ref)(h), atol=1e-5)


def _train(sd, **kw):
    base = {"learning_rate": 5e-3, "epochs": 2, "batch_size": 4, "log_every": 2, "weight_decay": 0.01}
    base.update(kw)
    st = Static(TINY, TrainConfig(**base), LoraConfig(r=4, alpha=8, targets=("q", "v")))
    return train_study(tiny_base(), st, sd, progress=False)


def test_gradient_accumulation_equals_larger_batch():
    sd = tiny_study(V=2)
    big = _train(sd, batch_size=8, grad_accum=1)
    acc = _train(sd, batch_size=4, grad_accum=2)
    for a, b in zip(jax.tree.leaves(big.lora), jax.tree.leaves(acc.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_variant_chunks_equal_all_at_once():
    sd = tiny_study(V=4)
    whole = _train(sd)
    chunked = _train(sd, variant_chunk=2)
    for a, b in zip(jax.tree.leaves(whole.lora), jax.tree.leaves(chunked.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    np.testing.assert_allclose(whole.metrics["loss"], chunked.metrics["loss"], atol=1e-6)


def test_schedules_and_bad_config():
    from jaxpoison.train.engine import learning_rate
    tc = TrainConfig(learning_rate=1.0, warmup_steps=2, schedule="linear")
    lrs = [float(learning_rate(jnp.int32(c), 10, tc)) for c in range(11)]
    assert lrs[:3] == [0.0, 0.5, 1.0] and lrs[-1] == 0.0 and lrs[6] == pytest.approx(0.5)
    cos = [float(learning_rate(jnp.int32(c), 10, TrainConfig(learning_rate=1.0, schedule="cosine")))
           for c in (0, 5, 10)]
    assert cos == pytest.approx([1.0, 0.5, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        TrainConfig(schedule="step")
    with pytest.raises(ValueError, match="LoRA target 'attn' matches no module"):
        LoraConfig(targets=("attn",))
    assert LoraConfig(targets="all-linear").targets == ("q", "k", "v", "o", "gate", "up", "down")
    assert LoraConfig(targets=("q_proj", "(gate|up)")).targets == ("q", "gate", "up")
