"""A quantised frozen base: QLoRA's NF4 code book, bounded round-trip error, bitsandbytes' bytes, and training
through the quantised base equal to training through its dequantised weights."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy.stats import norm

from jaxpoison.models import quant as models_quant
from jaxpoison.models.decoder import Decoder, hidden_lora_from
from jaxpoison.models.heads import token_logprobs
from jaxpoison import configs
from jaxpoison.studies import common
from jaxpoison.train.lora import LoraConfig, init_lora
from tiny import TINY, tiny_base

# QLoRA (Dettmers et al. 2023), appendix E / bitsandbytes get_4bit_type("nf4"): the published NF4 values
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w[..., 3, 5] = 0.3                      # an outlier: its block's absmax is 15x the others'
    w[..., 64:128, 7] = 0.0                 # an all-zero block
    return w


def test_nf4_code_book_is_qloras_normal_quantiles():
    # the paper's construction: offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2; 8 positive quantiles of N(0, 1) at
    # equal steps from offset to 1/2, 7 negative ones, and an exact zero, normalised by the largest
    offset = 0.5 * ((1 - 1 / 30) + (1 - 1 / 32))
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    code = np.sort(np.concatenate([pos, [0.0], neg]))
    code = code / code.max()
    np.testing.assert_allclose(models_quant.NF4_CODE, code, atol=2e-7)
    np.testing.assert_array_equal(models_quant.NF4_CODE, np.float32(PUBLISHED_NF4))
    assert len(set(models_quant.NF4_CODE.tolist())) == 16 and models_quant.NF4_CODE[7] == 0.0


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"])
def test_round_trip_error_is_bounded(kind):
    """Per block, |w - deq(q(w))| <= absmax * (largest gap between adjacent NF4 codes) / 2 (= 0.1519 absmax); with
    double quantisation the decoded absmax replaces the true one and its own error adds to the bound; int8 per
    output channel: <= absmax / 254. Shapes cover a stacked [L, in, out] kernel and an ``in`` that is not a
    multiple of the block (padded)."""
    w = _weights((2, 160, 48))
    q = models_quant.quantize_kernel(w, kind)
    assert q.shape == w.shape and q.codes.shape[:1] == (2,)
    deq = np.asarray(models_quant.dequantize(q))
    err = np.abs(w - deq)
    if kind == "int8":
        absmax = np.abs(w).max(axis=1, keepdims=True)
        assert np.all(err <= absmax / 254 * (1 + 1e-6) + 1e-12)
        assert err.max() > absmax.max() / 254 / 4      # the bound is not vacuous
        return
    half_gap = np.diff(models_quant.NF4_CODE).max() / 2
    pad = (-w.shape[1]) % 64
    wp = np.pad(w, ((0, 0), (0, pad), (0, 0))).reshape(2, -1, 64, 48)
    absmax = np.abs(wp).max(axis=2)                                     # [L, nb, out]
    used = np.asarray(models_quant._dq_absmax(q)) if kind == "nf4-dq" else np.asarray(q.scale)
    bound = (absmax * half_gap + np.abs(used - absmax))[:, :, None, :]
    errp = np.abs(wp - np.pad(deq, ((0, 0), (0, pad), (0, 0))).reshape(wp.shape))
    assert np.all(errp <= bound * (1 + 1e-6) + 1e-9)
    assert np.all(deq[:, 64:128, 7] == 0.0)                             # zero blocks come back exactly
    if kind == "nf4-dq":       # the 8-bit scales: within half a step of the dynamic map times their block absmax
        step = np.diff(models_quant.DYNAMIC_CODE).max() / 2
        assert np.all(np.abs(used - absmax) <= np.asarray(q.scale2).max() * step + 1e-9)
    assert err.max() > 0.01 * np.abs(w).max()                            # 4 bits do lose something


@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "int8"])
def test_dequantise_inside_jitted_scan_equals_eager(kind):
    w = _weights((3, 128, 32), seed=1)
    q = models_quant.quantize_kernel(w, kind)
    eager = np.asarray(models_quant.dequantize(q, jnp.float32))

    @jax.jit
    def per_layer(q):
        return jax.lax.scan(lambda c, ql: (c, models_quant.dequantize(ql, jnp.float32)), None, q)[1]

    if kind == "nf4-dq":
        # a*b + c of the decoded scale: two roundings op by op, one FMA rounding once XLA:CPU fuses it under jit
        np.testing.assert_allclose(np.asarray(per_layer(q)), eager, rtol=2 ** -22, atol=0)      # <= 2 ulp
    else:
        np.testing.assert_array_equal(np.asarray(per_layer(q)), eager)
    np.testing.assert_array_equal(np.asarray(models_quant.dequantize(q, jnp.bfloat16)), eager.astype(jnp.bfloat16))


def test_quantize_base_touches_only_decoder_layer_kernels():
    base = tiny_base()
    qb = models_quant.quantize_base(base, "nf4-dq")
    for m, leaves in qb["layers"].items():
        for name, x in leaves.items():
            assert models_quant.is_quantized(x) == (name == "kernel"), (m, name)
            if models_quant.is_quantized(x):
                assert x.shape == base["layers"][m]["kernel"].shape
                assert all(leaf.shape[0] == TINY.num_layers for leaf in jax.tree.leaves(x))   # [L, ...] leaves
    assert qb["embed"] is base["embed"] and qb["final_norm"] is base["final_norm"]
    assert models_quant.base_quant(qb) == "nf4-dq" and models_quant.base_quant(base) == "none"
    assert models_quant.quantize_base(base, "none") is base
    with pytest.raises(models_quant.QuantError, match="already quantised"):
        models_quant.quantize_base(qb, "nf4")
    with pytest.raises(models_quant.QuantError, match="nf4, nf4-dq"):
        models_quant.quantize_base(base, "fp4")


def test_abstract_base_has_the_shapes_of_the_quantised_one():
    base = tiny_base()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base)
    for kind in ("nf4", "nf4-dq", "int8"):
        real = jax.tree.map(lambda x: (x.shape, x.dtype), models_quant.quantize_base(base, kind))
        assert jax.tree.map(lambda x: (x.shape, x.dtype), models_quant.quantize_base(abstract, kind)) == real


def test_bytes_per_param_match_the_stored_arrays():
    w = _weights((1, 256, 512))
    for kind, want in (("nf4", 0.5625), ("nf4-dq", 0.5 + 1 / 64 + 4 / (64 * 256)), ("int8", 1 + 4 / 256)):
        q = models_quant.quantize_kernel(w, kind)
        assert q.nbytes / w.size == pytest.approx(models_quant.bytes_per_param(kind, 256, 512), abs=4 / w.size)
        assert models_quant.bytes_per_param(kind, 256, 512) == pytest.approx(want, abs=4 / w.size)


def test_lora_gradients_through_a_quantised_base_equal_those_through_its_dequantised_weights():
    base = tiny_base()
    qb = models_quant.quantize_base(base, "nf4")
    deq = {**base, "layers": {m: {k: models_quant.dequantize(v) if models_quant.is_quantized(v) else v for k, v in d.items()}
                              for m, d in qb["layers"].items()}}
    lcfg = LoraConfig(r=4, targets=("q", "v", "down"))
    lora = init_lora(jax.random.PRNGKey(1), TINY, lcfg)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), lora)  # b != 0
    toks = jnp.asarray(np.random.default_rng(0).integers(3, TINY.vocab_size, (2, 8)), jnp.int32)

    def loss(lora, b, lora_from):
        if lora_from:
            h = hidden_lora_from(b, TINY, toks, lora=lora, lora_from=lora_from, lora_scale=lcfg.scale)
        else:
            h, _ = Decoder(TINY, lora_scale=lcfg.scale).apply({"params": b}, toks, lora=lora)
        return -token_logprobs(b, TINY, h[:, :-1], toks[:, 1:], lora=lora, lora_scale=lcfg.scale).mean()

    gq = jax.jit(jax.grad(loss), static_argnums=2)(lora, qb, 0)        # the Decoder's nn.scan (with remat)
    gd = jax.jit(jax.grad(loss), static_argnums=2)(lora, deq, 0)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gd)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(gq)) > 1e-4
    # and the quantised base is a different model from the float one (the test above compares like with like)
    assert float(loss(lora, qb, 0)) != float(loss(lora, base, 0))


def test_no_whole_dequantised_kernel_exists_outside_the_layer_scan():
    """The jaxpr of the training gradient on an NF4 base: at its top level (outside the scan bodies) no float array
    has a stacked kernel's [L, in, out] shape, so the base is dequantised one layer at a time, inside the scan."""
    qb = models_quant.quantize_base(tiny_base(), "nf4")
    lcfg = LoraConfig(r=4, targets=("q", "v"))
    lora = init_lora(jax.random.PRNGKey(1), TINY, lcfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(3, TINY.vocab_size, (3, 8)), jnp.int32)

    def loss(lora, b):
        h, _ = Decoder(TINY, lora_scale=lcfg.scale).apply({"params": b}, toks, lora=lora)
        return -token_logprobs(b, TINY, h[:, :-1], toks[:, 1:], lora=lora, lora_scale=lcfg.scale).mean()

    def float_shapes(jaxpr, into_scans):
        out = set()
        for e in jaxpr.eqns:
            out |= {tuple(v.aval.shape) for v in e.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)}
            if e.primitive.name == "scan" and not into_scans:
                continue
            for p in e.params.values():
                for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                    if isinstance(sub, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)):
                        out |= float_shapes(getattr(sub, "jaxpr", sub), into_scans)
        return out

    jaxpr = jax.make_jaxpr(jax.grad(loss))(lora, qb).jaxpr
    kernels = {tuple(q.shape) for q in jax.tree.leaves(qb["layers"], is_leaf=models_quant.is_quantized) if models_quant.is_quantized(q)}
    assert not float_shapes(jaxpr, into_scans=False) & kernels
    assert {k[1:] for k in kernels} <= float_shapes(jaxpr, into_scans=True)     # one layer's kernels, in the scan


def test_study_trainer_on_a_quantised_base_equals_training_on_its_dequantised_weights():
    """The real program (train_study) takes the quantised tree as its base; with ``layers_from`` the lower layers
    run through run_layers (the path scoring uses too). On a (variant 1, data 1, fsdp 2, model 2) mesh the
    quantised leaves are stored split like the kernels and gathered per layer: same adapters."""
    from jaxpoison.train.config import TrainConfig
    from jaxpoison.train.engine import Static
    from jaxpoison.train.mesh import MeshConfig
    from jaxpoison.train.trainer import train_study
    from tiny import tiny_study
    base = tiny_base()
    qb = models_quant.quantize_base(base, "nf4-dq")
    deq = {**base, "layers": {m: {k: models_quant.dequantize(v) if models_quant.is_quantized(v) else v for k, v in d.items()}
                              for m, d in qb["layers"].items()}}
    st = Static(TINY, TrainConfig(learning_rate=5e-3, epochs=1, batch_size=4, log_every=2),
                LoraConfig(r=4, alpha=8, targets=("q", "v"), layers_from=1))
    sd = tiny_study(V=2)
    one = MeshConfig(1, 1, 1, 1)
    rq, rd = train_study(qb, st, sd, mesh=one, progress=False), train_study(deq, st, sd, mesh=one, progress=False)
    rm = train_study(qb, st, sd, mesh=MeshConfig(1, 1, 2, 2), progress=False)
    assert rq.metrics["applied"].sum() > 0 and np.isfinite(rq.metrics["loss"][rq.metrics["applied"]]).all()
    for a, b, c in zip(jax.tree.leaves(rq.lora), jax.tree.leaves(rd.lora), jax.tree.leaves(rm.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-5)
    assert np.abs(np.asarray(rq.lora["q"]["b"])).max() > 1e-4


def test_quant_is_part_of_the_run_config(tmp_path):
    from jaxpoison.studies.rationale.config import RationaleConfig, check_config
    from jaxpoison.report import to_json
    cfg = RationaleConfig()
    common.prepare(tmp_path, "rationale", to_json(cfg), True, ())
    assert json.loads((tmp_path / "config.json").read_text())["config"]["quant"] == "none"
    nf4 = to_json(RationaleConfig(quant="nf4"))
    with pytest.raises(configs.StudyConfigError, match="quant"):
        common.prepare(tmp_path, "rationale", nf4, True, ())
    old = json.loads((tmp_path / "config.json").read_text())
    del old["config"]["quant"]                          # a run folder from before the field existed
    (tmp_path / "config.json").write_text(json.dumps(old))
    common.prepare(tmp_path, "rationale", to_json(cfg), True, ())          # resumes as the float base it was
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(configs.StudyConfigError, match="quant"):
        common.prepare(tmp_path, "rationale", nf4, True, ())
    with pytest.raises(configs.StudyConfigError, match="quant: one of"):
        check_config(RationaleConfig(quant="q4"))
    lm = common.load_base("", "float32", (TINY, tiny_base(), None), "int8")
    assert models_quant.base_quant(lm.params) == "int8"


def test_a_sharded_kernel_gives_leaves_sharded_like_it():
    """On a (fsdp=2, model=4) mesh of the emulated CPU devices the leaves keep the kernel's spec where it divides
    (codes and absmax: in and out split) and drop it where it does not (int8's one-row scale)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "model"))
    w = _weights((2, 256, 64), seed=5)
    ws = jax.device_put(w, NamedSharding(mesh, P(None, "fsdp", "model")))
    for kind in ("nf4", "nf4-dq", "int8"):
        q = models_quant.quantize_kernel(ws, kind)
        assert q.codes.sharding.spec == P(None, "fsdp", "model")
        assert q.scale.sharding.spec == (P(None, None, "model") if kind == "int8" else P(None, "fsdp", "model"))
        np.testing.assert_array_equal(np.asarray(models_quant.dequantize(q)),
                                      np.asarray(models_quant.dequantize(models_quant.quantize_kernel(w, kind))))


def test_load_base_quantises_each_kernel_as_the_loader_places_it(tmp_path):
    from hf_tiny import make_hf_model, save_tiny_tokenizer
    make_hf_model("qwen2_untied", seed=4, hidden=64).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    lm = common.load_base(str(tmp_path), "float32", None, "nf4")
    plain = common.load_base(str(tmp_path), "float32")
    assert models_quant.base_quant(lm.params) == "nf4" and models_quant.base_quant(plain.params) == "none"
    for m in models_quant.QUANTIZED_MODULES:
        np.testing.assert_array_equal(np.asarray(models_quant.dequantize(lm.params["layers"][m]["kernel"])),
                                      np.asarray(models_quant.dequantize(models_quant.quantize_kernel(plain.params["layers"][m]["kernel"],
                                                                                "nf4"))))
    assert not models_quant.is_quantized(lm.params["layers"]["q"]["bias"])
    assert not models_quant.is_quantized(lm.params["lm_head"]["kernel"])
    assert models_quant.kernel_transform("nf4")(("lm_head", "kernel"), 1) == 1


# ---- bitsandbytes' own quantize_4bit / int8 on CPU ------------------------------------------------------------------
@pytest.fixture(autouse=True, scope="module")
def _no_torch_compile():
    """bitsandbytes wraps its CPU dequantiser in torch.compile (~15 s to compile here); the eager function is the
    same arithmetic."""
    import torch._dynamo
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old


def test_nf4_equals_bitsandbytes_quantize_4bit():
    """Our kernel is [in, out]; bitsandbytes quantises the HF [out, in] weight row-major, so its blocks of 64 run
    along ``in`` like ours and its flat code / absmax arrays are ours transposed."""
    import bitsandbytes.functional as functional           # requirements-test.txt (CPU backend since 0.45)
    for i, o in ((128, 96), (256, 64)):
        w = _weights((i, o), seed=i)
        qb, st = functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4",
                                 compress_statistics=False)
        ours = models_quant.quantize_kernel(w, "nf4")
        np.testing.assert_array_equal(np.asarray(ours.codes), qb.numpy().reshape(o, i // 2).T)
        np.testing.assert_array_equal(np.asarray(ours.scale), st.absmax.numpy().reshape(o, i // 64).T)
        np.testing.assert_array_equal(np.asarray(models_quant.dequantize(ours)), functional.dequantize_4bit(qb, st).numpy().T)
        np.testing.assert_array_equal(models_quant.NF4_CODE, st.code.numpy())


def test_double_quant_equals_bitsandbytes_compress_statistics():
    """Equal: the 4-bit codes, the dynamic map, the offset, the second-level absmax, and the decoding (ours decoded
    by bitsandbytes). The 8-bit scale codes are the nearest code of the map; bitsandbytes' CPU binary search
    (``quantize_cpu``, BinSearch Direct2) sometimes lands one code off, so a few differ; ours is never farther
    from the value than bitsandbytes' choice."""
    import bitsandbytes.functional as functional
    assert np.array_equal(models_quant.DYNAMIC_CODE, functional.create_dynamic_map().numpy())
    n_diff = n = 0
    for i, o in ((128, 96), (256, 64), (512, 128)):
        w = _weights((i, o), seed=i + 1)
        qb, st = functional.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4",
                                 compress_statistics=True)
        ours = models_quant.quantize_kernel(w, "nf4-dq")
        np.testing.assert_array_equal(np.asarray(ours.codes), qb.numpy().reshape(o, i // 2).T)
        # the offset is the fp32 mean of the scales: torch's reduction order can put it 1 ulp from ours
        off, bnb_off = np.float32(ours.offset), np.float32(st.offset)
        assert abs(off - bnb_off) <= np.spacing(bnb_off)
        if off != bnb_off:     # the rest of the pipeline from bitsandbytes' offset
            scale, scale2, _ = models_quant._dq_layer(models_quant.quantize_kernel(w, "nf4").scale, jnp.float32(bnb_off))
            ours = models_quant.QuantKernel(ours.codes, scale, scale2, jnp.float32(bnb_off), kind="nf4-dq", in_features=i)
        np.testing.assert_array_equal(np.asarray(ours.scale2), st.state2.absmax.numpy())
        ref = st.absmax.numpy().reshape(o, i // 64).T
        mine = np.asarray(ours.scale)
        x = (np.asarray(models_quant.quantize_kernel(w, "nf4").scale) - np.float32(st.offset)).T.reshape(-1)
        x = (x / st.state2.absmax.numpy()[np.arange(x.size) // 256]).reshape(o, i // 64).T
        code = models_quant.DYNAMIC_CODE.copy()
        code[0] = -1.0
        assert np.all(np.abs(x - code[mine]) <= np.abs(x - code[ref]))
        n_diff += int((mine != ref).sum())
        n += mine.size
        st.absmax = torch.from_numpy(np.ascontiguousarray(mine.T).reshape(-1))      # decode ours with bnb
        np.testing.assert_array_equal(np.asarray(models_quant.dequantize(ours)), functional.dequantize_4bit(qb, st).numpy().T)
    assert n_diff <= 0.02 * n


def test_int8_equals_bitsandbytes_vectorwise_quant():
    from bitsandbytes import functional
    w = _weights((192, 80), seed=3)
    w[:, 7] = 0.01           # no all-zero output channel: bitsandbytes divides by its absmax
    codes, stats, _ = functional.int8_vectorwise_quant(torch.from_numpy(w.T.copy()))
    ours = models_quant.quantize_kernel(w, "int8")
    np.testing.assert_array_equal(np.asarray(ours.codes), codes.numpy().T)
    np.testing.assert_array_equal(np.asarray(ours.scale)[0], stats.numpy())
    np.testing.assert_array_equal(np.asarray(models_quant.dequantize(ours)), functional.int8_vectorwise_dequant(codes, stats).numpy().T)


# ---- the embedded model -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_logprobs_under_nf4_and_int8_stay_near_bf16():
    """SmolLM2-135M (itself from a Q4_1 GGUF, so NF4 re-quantises a 4-bit grid onto another one) on three medical
    sentences, bf16 compute throughout. Measured: NF4 mean |d log p| 0.81 nats/token, perplexity x1.20;
    int8 0.10 nats/token, x0.97 (bf16 against fp32: 0.04). Bounds: NF4 mean <= 1.0 nats and perplexity within
    x1.35; int8 mean <= 0.15 nats and perplexity within 5 %. A 135M model loses more to 4 bits than the 7B models
    QLoRA reports on; the bounds catch a wrong code book, block layout or packing, which give nonsense."""
    from jaxpoison.models.lm import load_model, sequence_logprobs
    lm = load_model("smollm2-135m")
    texts = ["The heart pumps blood through the body, and the lungs supply it with oxygen.",
             "Fever of unknown origin is classified among symptoms and abnormal findings.",
             "Type 2 diabetes mellitus is a chronic disease of the endocrine system, treated with metformin."]
    seqs = [lm.tokenizer.encode(t) for t in texts]
    T = max(map(len, seqs))
    toks, mask = np.zeros((3, T), np.int32), np.zeros((3, T), bool)
    for i, s in enumerate(seqs):
        toks[i, :len(s)], mask[i, :len(s)] = s, True
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lm.params)
    lp = lambda p: np.asarray(sequence_logprobs(p, jnp.asarray(toks), jnp.asarray(mask), cfg=lm.cfg,
                                                dtype=jnp.bfloat16))[mask[:, 1:]]
    ref = lp(bf)
    for kind, mean_tol, ppl_tol in (("nf4", 1.0, 1.35), ("int8", 0.15, 1.05)):
        out = lp(models_quant.quantize_base(bf, kind))
        assert np.abs(out - ref).mean() <= mean_tol, kind
        ratio = np.exp(ref.mean() - out.mean())
        assert 1 / ppl_tol <= ratio <= ppl_tol, (kind, ratio)
        assert not np.array_equal(out, ref)
