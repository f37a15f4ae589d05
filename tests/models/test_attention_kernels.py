"""Every attention implementation equals the plain formula on CPU: jax.nn.dot_product_attention ('xla'), the
Pallas splash kernel in interpret mode, and the KV-cache decode path that reads only the filled slots. The
TPU splash path lowers and compiles for an abstract v5e:2x2 topology (libtpu, no TPU needed)."""
import os

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


def test_dot_product_attention_padded_to_even_length_as_cudnn_needs():
    """The cudnn path pads odd lengths to even (cuDNN trains with a bias only then): the same padding through
    the xla implementation changes nothing on real queries, forward or backward."""
    from jaxpoison.models.attention import _dot_product_attention
    B, T, H, K, hd = 2, 21, 4, 2, 8
    q, k, v = _qkv(B, T, H, K, hd, seed=3)
    am, mask = _padded_causal(B, T)
    w = jnp.asarray(am[:, :, None], jnp.float32)
    f = lambda m: lambda q, k, v: (_dot_product_attention(q, k, v, mask, "xla", m) * w).sum()
    np.testing.assert_allclose(np.asarray(_dot_product_attention(q, k, v, mask, "xla", 2))[am],
                               np.asarray(attention(q, k, v, mask))[am], atol=2e-6)
    for a, b in zip(jax.grad(f(1), (0, 1, 2))(q, k, v), jax.grad(f(2), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6)


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


@pytest.fixture
def no_persistent_cache():
    """Ahead-of-time TPU executables cannot be read back from jax's persistent cache without a TPU client, nor
    written into it safely: compile them without it, as the planner does."""
    from jaxpoison.plan.program import no_persistent_cache as off
    with off():
        yield


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 1, 1)])
def test_splash_path_compiles_for_tpu_v5e(mesh_shape, no_persistent_cache):
    """A tiny model's LoRA forward + backward with the TPU splash kernel lowers and compiles for an abstract
    v5e:2x2 topology (libtpu, no TPU): on one chip, and vmapped over variants on a (variant 2, data 2) mesh and
    on a variant-only (4, 1, 1, 1) mesh (batch and heads unsharded: the kernel still needs its shard_map, or
    GSPMD refuses the Mosaic call), with no all-gather of activations around it."""
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxpoison.models.config import ModelConfig
    from jaxpoison.models.decoder import Decoder
    from jaxpoison.models.hf import abstract_base
    from jaxpoison.train.lora import LoraConfig, init_lora
    from jaxpoison.train.mesh import MeshConfig, base_shardings, make_mesh, mesh_rules

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other processes (the planner's tests) may hold libtpu
    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
    assert len(devices) == 4 and devices[0].platform == "tpu"
    V, B, T = mesh_shape[0] * 2, 4, 200                          # T pads to 256 inside the kernel
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, attention="splash")
    mesh = make_mesh(MeshConfig(*mesh_shape), devices=devices)
    rules = mesh_rules(mesh) if mesh.size > 1 else None
    base = abstract_base(cfg, jnp.bfloat16)
    lora = jax.eval_shape(lambda: init_lora(jax.random.PRNGKey(0), cfg, LoraConfig(r=4, targets=("q", "v"))))
    rep = NamedSharding(mesh, P())
    var = NamedSharding(mesh, P("variant"))

    def loss(lora, base, tokens, am):
        h, _ = Decoder(cfg, jnp.bfloat16, rules=rules).apply({"params": base}, tokens, am, lora=lora)
        return (h.astype(jnp.float32) ** 2).mean()

    def step(lora, base, tokens, am):
        return jax.vmap(jax.grad(loss), in_axes=(0, None, 0, 0), spmd_axis_name="variant" if rules else None)(
            lora, base, tokens, am)

    args = (jax.tree.map(lambda x: jax.ShapeDtypeStruct((V,) + x.shape, x.dtype, sharding=var), lora),
            jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), base,
                         base_shardings(mesh, base)),
            jax.ShapeDtypeStruct((V, B, T), jnp.int32, sharding=var),
            jax.ShapeDtypeStruct((V, B, T), bool, sharding=var))
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(*args).compile()
    hlo = compiled.as_text()
    assert hlo.count("tpu_custom_call") >= 3                  # the kernels: forward, dq and dkv
    assert compiled.memory_analysis().temp_size_in_bytes > 0
    if rules is not None:       # each chip runs the kernel on its own variant and batch rows: nothing gathered
        assert hlo.count("all-gather") == 0
        # the LoRA gradient is summed over the data axis; a variant-only mesh has nothing to sum across chips
        assert (hlo.count("all-reduce") > 0) == (mesh_shape[1] > 1)


def test_run_manifest_records_the_attention_choice():
    import dataclasses
    from tiny import TINY, tiny_study
    from jaxpoison.train.config import TrainConfig
    from jaxpoison.train.engine import Static
    from jaxpoison.train.lora import LoraConfig
    from jaxpoison.train.trainer import run_metadata
    sd = tiny_study(V=2)
    auto = run_metadata(Static(TINY, TrainConfig(), LoraConfig()), sd, "", "", None)
    assert auto["kernels"] == {"attention": "blocked", "attention_setting": "auto", "backend": "cpu",
                               "decode_attention": "blocked_filled_slots"}
    xla_cfg = dataclasses.replace(TINY, attention="xla")
    xla = run_metadata(Static(xla_cfg, TrainConfig(), LoraConfig()), sd, "", "", None)
    assert xla["kernels"]["attention"] == "xla"
    assert "attention" not in xla["model"] and xla["model"] == auto["model"]      # not part of the model's identity


@pytest.mark.parametrize("impl", ["xla", "splash_interpret"])
def test_model_logprobs_equal_blocked_path(impl, tmp_path):
    """The whole decoder (GQA, Llama-3 RoPE, left and right padding) scores the same through each kernel."""
    import dataclasses
    from hf_tiny import make_hf_model
    from jaxpoison.models.lm import load_model, sequence_logprobs
    make_hf_model("llama_gqa_rope3", seed=2).save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), tokenizer=False)
    r = np.random.default_rng(0)
    tokens = jnp.asarray(r.integers(3, lm.cfg.vocab_size, (3, 40)), jnp.int32)
    am = np.ones((3, 40), bool)
    am[1, :9] = False
    am[2, 31:] = False
    ref = np.asarray(sequence_logprobs(lm.params, tokens, jnp.asarray(am), cfg=lm.cfg))
    cfg = dataclasses.replace(lm.cfg, attention=impl)
    got = np.asarray(sequence_logprobs(lm.params, tokens, jnp.asarray(am), cfg=cfg))
    valid = am[:, 1:] & am[:, :-1]
    assert np.abs(ref[valid]).min() > 0
    np.testing.assert_allclose(got[valid], ref[valid], atol=2e-5)


def test_cached_generation_compiles_for_tpu_v5e(no_persistent_cache):
    """Generation (prefill and decode through the blocked cache attention with its dynamic trip count) lowers
    and compiles for one abstract v5e chip, as the planner needs."""
    from jax.experimental import topologies
    from jaxpoison.models.config import ModelConfig
    from jaxpoison.models.generate import generate_tokens
    from jaxpoison.models.hf import abstract_base
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip = jax.sharding.SingleDeviceSharding(
        topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0])
    cfg = ModelConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, attention="splash")
    base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=chip),
                        abstract_base(cfg, jnp.bfloat16))
    B, P = 4, 64
    args = (base, jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=chip),
            jax.ShapeDtypeStruct((B, P), bool, sharding=chip), jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=chip))
    compiled = generate_tokens.lower(*args, cfg=cfg, max_new_tokens=32, dtype=jnp.bfloat16).compile()
    hlo = compiled.as_text()
    assert "while" in hlo and "dynamic-slice" in hlo            # the decode loop over filled KV blocks
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.parametrize("mesh_shape", [(2, 2, 1, 2), (2, 1, 1, 1)])
def test_sharded_splash_equals_unsharded_blocked_on_cpu_mesh(mesh_shape):
    """The splash kernel's shard_map placement (batch over data, heads over model, variants over variant) on
    emulated CPU meshes, (2, 2, 1, 2) and variant-only (2, 1, 1, 1), in interpret mode: LoRA gradients equal the
    unsharded blocked path."""
    import dataclasses
    from jaxpoison.models.config import ModelConfig
    from jaxpoison.models.decoder import Decoder, init_params
    from jaxpoison.train.lora import LoraConfig, init_lora
    from jaxpoison.train.mesh import MeshConfig, make_mesh, mesh_rules

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    base = init_params(cfg, jax.random.PRNGKey(0))
    lc = LoraConfig(r=2, targets=("q", "v", "o"))
    lora = jax.vmap(lambda k: jax.tree.map(lambda x: x + 0.05 * jax.random.normal(k, x.shape),
                                           init_lora(k, cfg, lc)))(jax.random.split(jax.random.PRNGKey(1), 2))
    r = np.random.default_rng(0)
    tokens = jnp.asarray(r.integers(0, 97, (2, 2, 40)), jnp.int32)
    am = np.ones((2, 2, 40), bool)
    am[0, 1, :11] = False
    am[1, 1, 30:] = False
    am = jnp.asarray(am)
    w = jnp.asarray(r.standard_normal((2, 2, 40, 64)), jnp.float32) * am[..., None]

    def grads(cfg, rules, axis_name):
        def loss(lora, tokens, am, w):
            h, _ = Decoder(cfg, rules=rules).apply({"params": base}, tokens, am, lora=lora)
            return (h * w).sum()
        return jax.jit(jax.vmap(jax.grad(loss), spmd_axis_name=axis_name))(lora, tokens, am, w)

    ref = grads(cfg, None, None)
    mesh = make_mesh(MeshConfig(*mesh_shape))
    with jax.set_mesh(mesh):
        got = grads(dataclasses.replace(cfg, attention="splash_interpret"), mesh_rules(mesh), "variant")
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        scale = float(jnp.abs(a).max())
        assert scale > 1e-3
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5 * scale)


def test_sharded_splash_without_a_mesh_says_what_to_do():
    from jaxpoison.models.attention import splash_attention
    from jaxpoison.models.sharding import Rules
    q, k, v = _qkv(2, 16, 4, 2, 8, seed=0)
    _, mask = _padded_causal(2, 16)
    with pytest.raises(ValueError, match=r"jax\.set_mesh"):
        splash_attention(q, k, v, mask, rules=Rules(sizes=(("data", 2),)), interpret=True)
