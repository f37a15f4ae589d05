"""The study program: variants trained together equal variants trained alone; only the adapter learns."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tiny import TINY, subset, tiny_base, tiny_study
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static, loss_terms
from jaxpoison.train.lora import LoraConfig, init_lora
from jaxpoison.train.trainer import train_study

TC = TrainConfig(learning_rate=5e-3, epochs=2, batch_size=4, grad_accum=1, log_every=3, schedule="linear",
                 warmup_steps=1, weight_decay=0.01)
LC = LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q", "v", "down"))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_variants_together_equal_alone():
    base, sd = tiny_base(), tiny_study(V=4)
    st = Static(TINY, TC, LC)
    together = train_study(base, st, sd, progress=False)
    assert together.metrics["applied"].sum() > 0
    for v in range(4):
        alone = train_study(base, st, subset(sd, [v]), progress=False)
        for a, b in zip(_leaves(together.lora), _leaves(alone.lora)):
            np.testing.assert_allclose(a[v], b[0], atol=1e-5, rtol=0)
    # the adapters actually moved, and differently per variant
    b = np.asarray(together.lora["q"]["b"])
    assert np.abs(b).max() > 1e-4
    assert np.abs(b[0] - b[1]).max() > 1e-5


def test_gradient_is_taken_wrt_adapter_only():
    """The jaxpr of the gradient has no output shaped like a base kernel: no base-sized gradient exists."""
    base, sd = tiny_base(), tiny_study(V=1)
    st = Static(TINY, TC, LC)
    lora = init_lora(jax.random.PRNGKey(0), TINY, LC)
    toks = jnp.asarray(sd.tokens[:4]); lm = jnp.asarray(sd.loss_mask[:4]); am = jnp.asarray(sd.attn_mask[:4])
    g = jax.grad(lambda l: loss_terms(l, base, toks, lm, am, jax.random.PRNGKey(1), st)[0])
    jaxpr = jax.make_jaxpr(g)(lora)
    out_shapes = {tuple(v.aval.shape) for v in jaxpr.jaxpr.outvars}
    assert out_shapes == {tuple(x.shape) for x in jax.tree.leaves(lora)}
    assert (TINY.num_layers, TINY.hidden_size, TINY.intermediate_size) not in out_shapes


def test_nonfinite_variant_is_frozen_others_unchanged():
    base, sd = tiny_base(), tiny_study(V=3)
    sd.lr_scale = np.array([1.0, np.inf, 1.0], np.float32)   # an absurd learning rate
    st = Static(TINY, TrainConfig(learning_rate=5e-3, epochs=3, batch_size=4, log_every=2, clip_norm=0.0),
                LoraConfig(r=4, alpha=8, targets=("q", "v")))
    res = train_study(base, st, sd, progress=False)
    frozen = np.asarray(res.state.frozen)
    assert frozen.tolist() == [False, True, False]
    assert res.metrics["frozen"][-1].tolist() == [False, True, False]
    for x in _leaves(res.lora):
        assert np.isfinite(x[[0, 2]]).all()
    sd_ok = tiny_study(V=3)
    ref = train_study(base, st, subset(sd_ok, [0, 2]), progress=False)
    for a, b in zip(_leaves(res.lora), _leaves(ref.lora)):
        np.testing.assert_allclose(a[[0, 2]], b, atol=1e-6)
