"""The study program: variants trained together equal variants trained alone; only the adapter learns."""
import dataclasses

import numpy as np
import jax
import jax.numpy as jnp

from tiny import TINY, subset, tiny_base, tiny_study
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static, loss_terms, make_train, num_steps, variant_keys
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


def test_make_train_is_the_whole_study_as_one_pure_function():
    """``jax.jit(jax.vmap(make_train(spec, steps), in_axes=(0, None, None, 0)))`` trains every variant in one
    program, as purejaxrl's ``make_train``; it equals the checkpointed host loop, which runs the same segment."""
    base, sd = tiny_base(), tiny_study(V=4)
    st = Static(TINY, TC, LC)
    S = num_steps(sd.n_rows, TC)
    train = jax.jit(jax.vmap(make_train(st, S), in_axes=(0, None, None, 0)))
    var = sd.variants()
    state, metrics = train(variant_keys(jax.random.PRNGKey(TC.seed), var), base, sd.pool(), var)
    host = train_study(base, st, sd, progress=False)
    for a, b in zip(_leaves(state.lora), _leaves(host.lora)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(np.asarray(state.updates), np.asarray(host.state.updates))
    np.testing.assert_allclose(np.asarray(metrics["loss"]).T, host.metrics["loss"], atol=1e-6, equal_nan=True)


def test_chunks_are_grouped_by_step_count_and_finished_chunks_do_not_run(monkeypatch):
    """Variants sorted by their number of updates, in chunks: a chunk whose variants have all finished is not
    dispatched at all, and the adapters equal the unchunked run."""
    import jaxpoison.train.trainer as trainer
    base, sd = tiny_base(), tiny_study(V=8)
    sd.n_rows = np.array([12, 4, 12, 4, 12, 4, 4, 12], np.int32)       # 6 and 2 updates (batch 4, 2 epochs)
    tc = dataclasses.replace(TC, log_every=2)
    chunks = trainer.variant_chunks(sd.n_rows, dataclasses.replace(tc, variant_chunk=4))
    assert [sorted(c.tolist()) for c in chunks] == [[0, 2, 4, 7], [1, 3, 5, 6]]
    calls = []
    real = trainer.segment_program

    def counting(*a, **k):
        seg = real(*a, **k)

        def run(state, s0, keys, *rest):
            calls.append((int(s0), keys.shape[0]))
            return seg(state, s0, keys, *rest)
        return run

    monkeypatch.setattr(trainer, "segment_program", counting)
    chunked = train_study(base, Static(TINY, dataclasses.replace(tc, variant_chunk=4), LC), sd, progress=False)
    assert calls == [(0, 4), (0, 4), (2, 4), (4, 4)]          # the 2-update chunk runs once, not three times
    whole = train_study(base, Static(TINY, tc, LC), sd, progress=False)
    for a, b in zip(_leaves(chunked.lora), _leaves(whole.lora)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert np.isnan(chunked.metrics["loss"][2:, [1, 3, 5, 6]]).all()
    np.testing.assert_array_equal(chunked.metrics["applied"], whole.metrics["applied"])
