"""Every attention implementation equals the plain formula on CPU: jax.nn.dot_product_attention ('xla'), the
Pallas splash kernel in interpret mode, and the KV-cache decode path that reads only the filled slots. The
TPU splash path lowers and compiles for an abstract v5e:2x2 topology (libtpu, no TPU needed)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxpoison.models.attention import attention, cached_attention, resolve_attention, self_attention


def _qkv(B, T, H, K, hd, seed):
    r = np.random.default_rng(seed)
    return [jnp.asarray(r.standard_normal(s), jnp.float32) for s in [(B, T, H, hd), (B, T, K, hd), (B, T, K, hd)]]


def _padded_causal(B, T):
    am = np.ones((B, T), bool)
    am[-1, :T // 3] = False                                      # left padding in the last row
    if B > 2:
        am[1, T - 5:] = False                                    # right padding
    i = np.arange(T)
    return am, jnp.asarray((i[None, :, None] >= i[None, None, :]) & am[:, None, :])


@pytest.mark.parametrize("impl,T,H,K", [("xla", 70, 6, 2), ("splash_interpret", 70, 4, 1)])
def test_self_attention_equals_plain_attention_forward_and_gradients(impl, T, H, K):
    B, hd = 3, 16
    q, k, v = _qkv(B, T, H, K, hd, seed=T + H)
    am, mask = _padded_causal(B, T)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H * hd)) * am[:, :, None], jnp.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * w).sum()

    ref_out = attention(q, k, v, mask)
    out = jax.jit(lambda q, k, v: self_attention(q, k, v, mask, impl))(q, k, v)
    np.testing.assert_allclose(np.asarray(out)[am], np.asarray(ref_out)[am], atol=2e-5)
    ref = jax.grad(loss(lambda q, k, v: attention(q, k, v, mask)), (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(lambda q, k, v: self_attention(q, k, v, mask, impl)), (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ref, got):
        scale = float(jnp.abs(a).max())
        assert scale > 0.1, name
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=3e-6 * scale, err_msg=name)


def test_auto_picks_by_backend_and_rejects_unknown():
    assert resolve_attention("auto") == "blocked"                 # this suite runs on CPU
    assert resolve_attention("auto", platform="tpu") == "splash"
    assert resolve_attention("auto", platform="gpu", dtype=jnp.bfloat16) == "cudnn"
    assert resolve_attention("auto", platform="gpu", dtype=jnp.float32) == "xla"   # cuDNN flash has no fp32
    assert resolve_attention("xla", platform="tpu") == "xla"
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*splash"):
        resolve_attention("flash")


@pytest.mark.parametrize("T,slot", [(1, 20), (3, 13), (9, 0)])
def test_cached_attention_reads_only_filled_slots(T, slot):
    """Over a cache whose unfilled slots hold NaN, the decode path equals plain attention over the same cache
    with those slots zeroed (plain attention reads every slot: NaN there would reach its output)."""
    B, H, K, hd, S, L = 2, 4, 2, 8, 26, 3
    r = np.random.default_rng(T)
    ck, cv = (r.standard_normal((L, B, S, K, hd)).astype(np.float32) for _ in range(2))
    filled = slot + T
    ck[:, :, filled:] = np.nan
    cv[:, :, filled:] = np.nan
    q = jnp.asarray(r.standard_normal((B, T, H, hd)), jnp.float32)
    kv_mask = np.zeros((B, S), bool)
    kv_mask[:, :filled] = True
    kv_mask[1, :4] = False                                       # a left-padded prompt
    mask = (np.arange(S)[None, None, :] <= (slot + np.arange(T))[None, :, None]) & kv_mask[:, None, :]
    layer = 1
    got = jax.jit(cached_attention, static_argnums=(6,))(q, jnp.asarray(ck), jnp.asarray(cv), layer,
                                                         jnp.asarray(mask), filled, 8)
    assert np.isfinite(np.asarray(got)).all()
    ref = attention(q, jnp.asarray(np.nan_to_num(ck[layer])), jnp.asarray(np.nan_to_num(cv[layer])),
                    jnp.asarray(mask))
    seen = mask.any(-1)                                          # queries with a real key (the others: padding)
    assert (~seen).any() == (T > 4 and slot == 0)
    np.testing.assert_allclose(np.asarray(got)[seen], np.asarray(ref)[seen], atol=2e-6)
