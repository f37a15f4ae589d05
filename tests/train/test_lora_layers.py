"""LoRA on the top layers only (``LoraConfig.layers_from``): the split forward equals the plain decoder, the
lower layers' adapter stays exactly zero through training, and the backward pass stops at the first LoRA layer."""
import argparse
import dataclasses
import json

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from tiny import TINY, tiny_study
from jaxpoison.models.config import ModelConfig, RopeScaling
from jaxpoison.models.decoder import Decoder, hidden_lora_from, init_params
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static, loss_terms
from jaxpoison.train.export import cmd_export, load_peft_adapter
from jaxpoison.train.lora import LoraConfig, init_lora
from jaxpoison.train.trainer import run_metadata, train_study

# vocab 97 = the tiny pool's; 4 layers so that there is a bottom and a top of more than one layer
CONFIGS = {
    "llama_gqa_rope3": ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                                   num_layers=4, num_heads=4, num_kv_heads=2, head_dim=8, tie_word_embeddings=False,
                                   rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)),
    "qwen3_qknorm": ModelConfig(model_type="qwen3", vocab_size=97, hidden_size=32, intermediate_size=48,
                                num_layers=4, num_heads=4, num_kv_heads=2, head_dim=12, qk_norm=True,
                                tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen2_bias": ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=32, intermediate_size=48,
                              num_layers=4, num_heads=4, num_kv_heads=1, head_dim=8, qkv_bias=True,
                              tie_word_embeddings=True, rms_norm_eps=1e-6),
}
ALL = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


def _base(cfg, seed=0):
    """Random base with randomised norm scales and biases (init leaves them at 1 / 0)."""
    p = init_params(cfg, jax.random.PRNGKey(seed))
    key = jax.random.PRNGKey(seed + 100)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            return x + 0.1 * jax.random.normal(jax.random.fold_in(key, hash(name) % 2**31), x.shape)
        return x
    return jax.tree_util.tree_map_with_path(perturb, p)


def _batch(n=4, left_pad=True):
    sd = tiny_study(V=1)
    toks, lm, am = (np.array(x[:n]) for x in (sd.tokens, sd.loss_mask, sd.attn_mask))
    if left_pad:   # row 0 left-padded: positions count real tokens only
        k = int((~am[0]).sum()) or 3
        toks[0], lm[0], am[0] = np.roll(toks[0], k), np.roll(lm[0], k), np.roll(am[0], k)
    return jnp.asarray(toks), jnp.asarray(lm), jnp.asarray(am)


def _top_lora(cfg, lc, seed=0):
    """init_lora (rows below layers_from are zero) with the trainable rows made generic (b != 0)."""
    lora = init_lora(jax.random.PRNGKey(seed), cfg, lc)
    k = lc.first_layer(cfg.num_layers)
    out = {}
    for i, (m, ab) in enumerate(lora.items()):
        out[m] = {}
        for n, x in ab.items():
            noise = 0.05 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed + 1), 2 * i + (n == "b")),
                                             x.shape)
            if m != "lm_head":
                noise = noise.at[:k].set(0)
            out[m][n] = x + noise
    return out


def _leaves(t):
    return [np.asarray(x) for x in jax.tree.leaves(t)]


@pytest.mark.parametrize("family,layers_from,remat", [
    ("llama_gqa_rope3", -1, False), ("llama_gqa_rope3", 2, True), ("qwen3_qknorm", -1, False),
    ("qwen3_qknorm", 1, True), ("qwen2_bias", 2, False)])
def test_split_loss_and_grads_equal_plain_decoder(family, layers_from, remat):
    cfg = CONFIGS[family]
    base = _base(cfg)
    toks, lm, am = _batch()
    lc = LoraConfig(r=4, alpha=8, targets=ALL, layers_from=layers_from)
    lora = _top_lora(cfg, lc)
    k = lc.first_layer(cfg.num_layers)
    for m in lora:
        if m != "lm_head":
            assert not np.asarray(lora[m]["a"][:k]).any() and not np.asarray(lora[m]["b"][:k]).any()
    split = Static(cfg, TrainConfig(head_chunk=5, remat=remat), lc)
    plain = Static(cfg, TrainConfig(head_chunk=5), dataclasses.replace(lc, layers_from=0))
    assert split.lora_from == k > 0 and plain.lora_from == 0
    key = jax.random.PRNGKey(3)
    f = lambda st: jax.jit(jax.value_and_grad(lambda l: loss_terms(l, base, toks, lm, am, key, st)[0]))(lora)
    (l1, g1), (l2, g2) = f(split), f(plain)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # the split path's gradient of the rows below layers_from is exactly zero, the rest is not
    for m in lora:
        if m == "lm_head":
            continue
        for n in ("a", "b"):
            g = np.asarray(g1[m][n])
            assert not g[:k].any(), (m, n)
            assert np.abs(g[k:]).max() > 1e-6, (m, n)


def test_hidden_lora_from_equals_decoder_hidden_states():
    """Hidden states themselves, incl. lora_from = 0 (no bottom scan) and an explicit positions array."""
    cfg = CONFIGS["qwen3_qknorm"]
    base = _base(cfg, 1)
    toks, _, am = _batch()
    pos = jnp.maximum(jnp.cumsum(am, -1) - 1, 0) + 5
    for lf in (0, 3):
        lc = LoraConfig(r=2, alpha=4, targets=("v", "up"), layers_from=lf)
        lora = _top_lora(cfg, lc, 2)
        ref, _ = Decoder(cfg, jnp.float32, lc.scale).apply({"params": base}, toks, am, pos, lora=lora)
        got = hidden_lora_from(base, cfg, toks, am, pos, lora=lora, lora_from=lf, lora_scale=lc.scale)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="lora_from=4 is out of range for a model with 4 layers"):
        hidden_lora_from(base, cfg, toks, am, lora=lora, lora_from=4)


def test_dropout_split_path_draws_distinct_masks_per_layer():
    """With LoRA dropout the split path is stochastic (key-dependent) and differs from no dropout."""
    cfg = CONFIGS["llama_gqa_rope3"]
    base = _base(cfg)
    toks, lm, am = _batch()
    lc = LoraConfig(r=4, alpha=8, targets=("q", "v"), dropout=0.5, layers_from=-2)
    lora = _top_lora(cfg, lc)
    st = Static(cfg, TrainConfig(), lc)
    st0 = Static(cfg, TrainConfig(), dataclasses.replace(lc, dropout=0.0))
    loss = jax.jit(loss_terms, static_argnums=6)        # one program per Static, not op by op
    l = lambda st, key: float(loss(lora, base, toks, lm, am, jax.random.PRNGKey(key), st)[0])
    assert l(st, 1) == l(st, 1)
    assert l(st, 1) != l(st, 2)
    assert l(st, 1) != l(st0, 1)


def _scans(jaxpr, out):
    """(length, reverse, dot_general count of the body) of every scan, nested jaxprs included."""
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            out.append((e.params["length"], e.params["reverse"], _dots(e.params["jaxpr"].jaxpr)))
        for sub in _subjaxprs(e):
            _scans(sub, out)
    return out


def _dots(jaxpr):
    return sum((e.primitive.name == "dot_general") + sum(_dots(s) for s in _subjaxprs(e)) for e in jaxpr.eqns)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for j in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(j, jax.extend.core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jax.extend.core.Jaxpr):
                yield j


@pytest.mark.parametrize("remat", [False, True])
def test_backward_pass_stops_at_first_lora_layer(remat):
    """In the jaxpr of value_and_grad, the layer scans (bodies with >= 7 dots; the head's scans have fewer) are:
    plain: forward L, backward (reverse scan) L; split: forward k (no LoRA) + forward L - k, backward L - k."""
    cfg = dataclasses.replace(TINY, num_layers=5)
    base = init_params(cfg, jax.random.PRNGKey(0))
    toks, lm, am = _batch()
    found = {}
    for lf in (0, -2):
        lc = LoraConfig(r=4, alpha=8, targets=("q", "v"), layers_from=lf)
        st = Static(cfg, TrainConfig(remat=remat), lc)
        lora = init_lora(jax.random.PRNGKey(0), cfg, lc)
        f = lambda l: loss_terms(l, base, toks, lm, am, jax.random.PRNGKey(1), st)[0]
        scans = _scans(jax.make_jaxpr(jax.value_and_grad(f))(lora).jaxpr, [])
        layer_scans = [(n, rev) for n, rev, d in scans if d >= 7]
        found[lf] = (sorted(n for n, rev in layer_scans if not rev), sorted(n for n, rev in layer_scans if rev))
    assert found[0] == ([5], [5])
    assert found[-2] == ([2, 3], [2])


def test_bottom_layers_stay_zero_through_training(tmp_path):
    """AdamW + weight decay + dropout, several updates: rows below layers_from stay exactly zero, the top moves;
    layers_from travels in the run metadata and in the exported adapter's jaxpoison metadata."""
    cfg = dataclasses.replace(TINY, num_layers=4)
    base = init_params(cfg, jax.random.PRNGKey(0))
    sd = tiny_study(V=2)
    tc = TrainConfig(learning_rate=5e-3, epochs=2, batch_size=4, log_every=3, schedule="linear", warmup_steps=1,
                     weight_decay=0.01)
    lc = LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q", "v", "down"), layers_from=-2)
    st = Static(cfg, tc, lc)
    assert run_metadata(st, sd, "", "", None)["lora"]["layers_from"] == -2
    res = train_study(base, st, sd, run_dir=str(tmp_path / "run"), progress=False)
    assert res.metrics["applied"].sum() >= 4
    init = init_lora(jax.random.PRNGKey(0), cfg, lc)
    for m in lc.targets:
        a, b = np.asarray(res.lora[m]["a"]), np.asarray(res.lora[m]["b"])   # [V, L, ...]
        assert not a[:, :2].any() and not b[:, :2].any(), m
        assert (np.abs(b[:, 2:]).max(axis=(-2, -1)) > 1e-5).all(), m       # every top layer moved
        assert not np.asarray(init[m]["a"][:2]).any() and np.asarray(init[m]["a"][2:]).all()
    # export: zero rows are written as zero tensors; layers_from goes beside peft's config
    out = tmp_path / "peft"
    cmd_export(argparse.Namespace(run_dir=str(tmp_path / "run"), step=None, variant=1, out=str(out)))
    assert json.loads((out / "jaxpoison_adapter.json").read_text())["layers_from"] == -2
    back, _ = load_peft_adapter(out, cfg)
    for m in lc.targets:
        np.testing.assert_array_equal(back[m]["b"], np.asarray(res.lora[m]["b"][1]))


def test_layers_from_validation():
    cfg = dataclasses.replace(TINY, num_layers=4)
    assert [LoraConfig(layers_from=k).first_layer(4) for k in (0, 3, -1, -4)] == [0, 3, 3, 0]
    assert LoraConfig(layers_from=np.int64(-2)).layers_from == -2
    for bad in (1.5, True, "2", None):
        with pytest.raises(ValueError, match=r"LoraConfig\.layers_from must be an int"):
            LoraConfig(layers_from=bad)
    for bad in (4, 9, -5):
        msg = rf"LoraConfig\.layers_from={bad} is out of range for a model with 4 layers: use 0\.\.3 .* -4\.\.-1"
        with pytest.raises(ValueError, match=msg):
            Static(cfg, TrainConfig(), LoraConfig(layers_from=bad))
        with pytest.raises(ValueError, match=msg):
            init_lora(jax.random.PRNGKey(0), cfg, LoraConfig(layers_from=bad))


def test_run_saved_before_a_new_lora_field_still_resumes():
    """A checkpoint whose metadata predates ``layers_from`` matches a run that leaves it at its default, and
    not one that sets it."""
    import dataclasses
    import json
    from jaxpoison.train.trainer import _same_run
    from jaxpoison.train.lora import LoraConfig as LC

    def meta(lc):
        return json.loads(json.dumps({"lora": {**dataclasses.asdict(lc), "targets": list(lc.targets),
                                               "scale": lc.scale}}, default=str))
    old = meta(LC(r=4, alpha=8))
    del old["lora"]["layers_from"]
    assert _same_run(old, meta(LC(r=4, alpha=8))) == []
    assert _same_run(old, meta(LC(r=4, alpha=8, layers_from=-2))) == ["lora"]
    assert _same_run(old, meta(LC(r=8, alpha=8))) == ["lora"]


def test_trunk_cache_trains_the_same_adapters():
    """train.trunk_cache: the pool's rows run through the layers below layers_from once, and every step gathers
    those states; adapters and losses equal recomputing the lower layers in every step (dropout, accumulation,
    right padding, unequal variant sizes)."""
    from jaxpoison.models.decoder import pool_trunk
    cfg = dataclasses.replace(TINY, num_layers=4)
    base = init_params(cfg, jax.random.PRNGKey(3))
    sd = tiny_study(V=3)
    lc = LoraConfig(r=4, alpha=8, dropout=0.1, targets=("q", "v", "down"), layers_from=2)
    res = {}
    for cache in (False, True):
        tc = TrainConfig(learning_rate=5e-3, epochs=2, batch_size=2, grad_accum=2, log_every=3, weight_decay=0.01,
                         trunk_cache=cache)
        res[cache] = train_study(base, Static(cfg, tc, lc), sd, progress=False)
    assert res[True].metrics["applied"].sum() >= 6
    np.testing.assert_allclose(res[True].metrics["loss"], res[False].metrics["loss"], rtol=1e-5)
    for m in lc.targets:      # after 8 AdamW updates: rounding of the two batch shapes, amplified by Adam
        for n in ("a", "b"):
            np.testing.assert_allclose(res[True].lora[m][n], res[False].lora[m][n], atol=1e-4)
    # one micro-batch: loss and gradients from the cached rows equal the recomputed ones
    whole = pool_trunk(base, cfg, sd.tokens, sd.attn_mask, 2, rows_per_call=len(sd.tokens))
    rows = np.array([3, 17, 5, 0])
    lora = jax.tree.map(lambda x: x[1], res[True].lora)
    st = Static(cfg, TrainConfig(), LoraConfig(r=4, alpha=8, targets=("q", "v", "down"), layers_from=2))
    args = (lora, base, jnp.asarray(sd.tokens[rows]), jnp.asarray(sd.loss_mask[rows]), jnp.asarray(sd.attn_mask[rows]),
            jax.random.PRNGKey(0), st)
    grad = jax.jit(jax.value_and_grad(loss_terms, has_aux=True), static_argnums=6)     # one program each way,
    (l0, n0), g0 = grad(*args)                                                          # not op by op
    (l1, n1), g1 = grad(*args, whole[rows])
    assert n0 == n1 and abs(float(l0 - l1)) <= 1e-5 * abs(float(l0))
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(y, x, atol=1e-5 * float(jnp.abs(x).max()) + 1e-9)
    # a row's cached states do not depend on the rows computed with it
    np.testing.assert_allclose(pool_trunk(base, cfg, sd.tokens, sd.attn_mask, 2, rows_per_call=5), whole, atol=1e-6)
