"""The hand-written backward passes (blocked causal attention, the LoRA product) and the training loss's LoRA
gradient against independent references: JAX autodiff of the plain formulas, and torch autograd through
transformers + peft on the same tiny model."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import torch

from hf_tiny import make_hf_model
from jaxpoison.models.attention import attention, causal_attention
from jaxpoison.models.decoder import lora_delta
from jaxpoison.models.lm import load_model
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static, loss_terms
from jaxpoison.train.export import save_peft_adapter
from jaxpoison.train.lora import LoraConfig, init_lora


def _padded_causal(B, T, pad):
    am = np.ones((B, T), bool)
    am[-1, :pad] = False                                        # left padding in the last row
    i = np.arange(T)
    return am, jnp.asarray((i[None, :, None] >= i[None, None, :]) & am[:, None, :])


@pytest.mark.parametrize("T,block,H,K", [(70, 32, 6, 2), (96, 32, 4, 4), (130, 64, 4, 1)])
def test_causal_attention_gradients_equal_plain_attention(T, block, H, K):
    B, hd = 2, 16
    r = np.random.default_rng(T)
    q, k, v = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in [(B, T, H, hd), (B, T, K, hd), (B, T, K, hd)])
    am, mask = _padded_causal(B, T, pad=T // 3)
    w = jnp.asarray(r.standard_normal((B, T, H * hd)) * am[:, :, None], jnp.float32)   # real queries only

    def plain(q, k, v):
        return (attention(q, k, v, mask) * w).sum()

    def blocked(q, k, v):
        return (causal_attention(q, k, v, mask, block=block) * w).sum()

    ref = jax.grad(plain, (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(blocked, (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ref, got):
        scale = float(jnp.abs(a).max())
        assert scale > 0.1, name
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6 * scale, err_msg=name)
    # vmapped over a leading axis (variants) it is the same function
    qs = jnp.stack([q, 0.5 * q])
    gv = jax.vmap(jax.grad(blocked, 0), (0, None, None))(qs, k, v)
    np.testing.assert_allclose(np.asarray(gv[0]), np.asarray(got[0]), atol=1e-6)
    assert float(jnp.abs(gv[1] - gv[0]).max()) > 1e-3


def test_lora_delta_gradients_equal_autodiff():
    r = np.random.default_rng(1)
    x = jnp.asarray(r.standard_normal((3, 5, 7)), jnp.float32)
    a = jnp.asarray(r.standard_normal((7, 4)), jnp.float32)
    b = jnp.asarray(r.standard_normal((4, 6)), jnp.float32)
    w = jnp.asarray(r.standard_normal((3, 5, 6)), jnp.float32)
    ref = jax.grad(lambda x, a, b: ((2.5 * (x @ a) @ b) * w).sum(), (0, 1, 2))(x, a, b)
    got = jax.grad(lambda x, a, b: (lora_delta(x, a, b, 2.5) * w).sum(), (0, 1, 2))(x, a, b)
    np.testing.assert_allclose(np.asarray(lora_delta(x, a, b, 2.5)), np.asarray(2.5 * (x @ a) @ b), rtol=1e-5)
    for g0, g1 in zip(ref, got):
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,targets", [("qwen3_qknorm", ("q", "v", "down")),
                                            ("llama_gqa_rope3", ("q", "k", "o", "gate", "up"))])
def test_lora_gradient_matches_torch_peft(tmp_path, family, targets):
    """Loss and LoRA gradient of one micro-batch (left padding, completion-only mask, T > one attention
    block) equal torch autograd through the transformers model with the same adapter loaded by peft."""
    peft = pytest.importorskip("peft")
    hf = make_hf_model(family, seed=3)
    hf.save_pretrained(tmp_path / "base")
    lm = load_model(str(tmp_path / "base"), tokenizer=False)
    cfg = lm.cfg
    lc = LoraConfig(r=4, alpha=8, targets=targets)
    lora = init_lora(jax.random.PRNGKey(0), cfg, lc)
    lora = {m: {"a": ab["a"], "b": 0.05 * jax.random.normal(jax.random.PRNGKey(7), ab["b"].shape)}
            for m, ab in lora.items()}                               # non-zero B: every gradient path is live
    save_peft_adapter(tmp_path / "ad", lora, cfg, lc.r, lc.alpha, lc.scale_rule)

    B, T = 3, 80
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32)
    attn, _ = _padded_causal(B, T, pad=11)
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, 30:] = 1.0                                          # completion-only
    st = Static(cfg, TrainConfig(head_chunk=16), lc)
    (l, n), g = jax.value_and_grad(loss_terms, has_aux=True)(
        lora, lm.params, jnp.asarray(tokens), jnp.asarray(loss_mask), jnp.asarray(attn), jax.random.PRNGKey(0), st)

    model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad"), is_trainable=True)
    model.train()
    t = torch.as_tensor(tokens, dtype=torch.long)
    m = torch.as_tensor(attn, dtype=torch.long)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=t, attention_mask=m, position_ids=pos).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, t[:, 1:, None])[..., 0]
    w = torch.as_tensor(loss_mask[:, 1:] * attn[:, 1:])
    ref_loss = -(lp * w).sum()
    ref_loss.backward()
    assert float(n) == pytest.approx(float(w.sum()))
    assert float(l) == pytest.approx(float(ref_loss), rel=1e-5)

    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
             "down": "down_proj"}
    grads = {n_: p.grad for n_, p in model.named_parameters() if p.requires_grad}
    checked = 0
    for mod in targets:
        for layer in range(cfg.num_layers):
            for which, ours in (("A", g[mod]["a"][layer]), ("B", g[mod]["b"][layer])):
                key = next(k for k in grads if f".layers.{layer}." in k and f"{names[mod]}.lora_{which}." in k)
                ref = grads[key].numpy().T
                scale = np.abs(ref).max()
                assert scale > 1e-4, key
                np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4 * scale, err_msg=key)
                checked += 1
    assert checked == 2 * len(targets) * cfg.num_layers


@pytest.mark.parametrize("remat", [False, True])
def test_bfloat16_training_gradient_tracks_float32(remat):
    """The custom backward passes keep bf16 dtypes consistent (custom_vjp demands cotangents of the primal's
    dtype) and the bf16 LoRA gradient points where the fp32 one does (T > one attention block)."""
    from tiny import TINY, tiny_base
    lc = LoraConfig(r=4, alpha=8, targets=("q", "v", "up"))
    lora = init_lora(jax.random.PRNGKey(0), TINY, lc)
    lora = {m: {"a": ab["a"], "b": 0.05 * jax.random.normal(jax.random.PRNGKey(3), ab["b"].shape)}
            for m, ab in lora.items()}
    base = tiny_base()
    B, T = 2, 90
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, TINY.vocab_size, (B, T)).astype(np.int32))
    attn, _ = _padded_causal(B, T, pad=7)
    ones = jnp.ones((B, T), jnp.float32)
    grads = {}
    for dt in ("float32", "bfloat16"):
        st = Static(TINY, TrainConfig(dtype=dt, remat=remat), lc)
        grads[dt] = jax.grad(lambda l: loss_terms(l, base, tokens, ones, jnp.asarray(attn), jax.random.PRNGKey(0),
                                                  st)[0])(lora)
    for mod in lc.targets:
        for which in ("a", "b"):
            g32 = np.asarray(grads["float32"][mod][which], np.float32).ravel()
            g16 = np.asarray(grads["bfloat16"][mod][which], np.float32).ravel()
            assert grads["bfloat16"][mod][which].dtype == lora[mod][which].dtype
            assert np.isfinite(g16).all()
            cos = g32 @ g16 / (np.linalg.norm(g32) * np.linalg.norm(g16))
            assert cos > 0.98, (mod, which, cos)


@pytest.mark.parametrize("remat", [False, True])
def test_training_keeps_no_attention_probabilities(remat):
    """What the backward pass keeps per layer (stacked over layers) grows with T, never T^2: the named
    activations of decoder.SAVE_POLICY (8 at most: q, k, v, attention output, log-sum-exp, the residual after
    attention, gate, up, plus the layer input), and under full remat only the layer input."""
    from jax._src.ad_checkpoint import saved_residuals
    from tiny import TINY, tiny_base
    lc = LoraConfig(r=4, alpha=8, targets=("q", "v"))
    lora, base = init_lora(jax.random.PRNGKey(0), TINY, lc), tiny_base()
    B, T = 3, 136                       # B != num_layers, so only the stacked per-layer arrays lead with L
    tok, ones, am = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.float32), jnp.ones((B, T), bool)
    st = Static(TINY, TrainConfig(remat=remat), lc)
    res = saved_residuals(lambda l: loss_terms(l, base, tok, ones, am, jax.random.PRNGKey(0), st)[0], lora)
    per_layer = [a.shape for a, _ in res if a.ndim >= 3 and a.shape[0] == TINY.num_layers and T in a.shape]
    assert per_layer, res
    assert all(list(s).count(T) == 1 for s in per_layer), per_layer
    assert len(per_layer) == (1 if remat else 9), per_layer
