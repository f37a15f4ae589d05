"""Option scoring over a mesh: each chunk of adapters is split over the ``variant`` axis, so each device scores its
own variants, and the scores are those of one device (same rows, same order)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_helpers import tiny_tokenizer
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import jaxpoison.eval.score as score
from tiny import TINY
from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
from jaxpoison.data.pool import build_mc_eval
from jaxpoison.eval.score import params_mesh, score_options, shared_layers
from jaxpoison.models.decoder import init_params
from jaxpoison.train.lora import LoraConfig, init_lora
from jaxpoison.train.mesh import MeshConfig, base_shardings, make_mesh

CFG = dataclasses.replace(TINY, vocab_size=448)       # the tiny tokenizer has 420 tokens; 2 layers
BASE = init_params(CFG, jax.random.PRNGKey(0))
LC = LoraConfig(r=4, alpha=8, targets=("q", "v", "down", "lm_head"), layers_from=1)
EXS = build_icd10_set(IcdConfig(seed=0, chapters=("circulatory", "respiratory", "digestive", "skin"),
                                n_train_per_chapter=1, n_test_per_chapter=2, n_keyword_train=1,
                                n_keyword_test=1, decoys=(("circulatory", "respiratory"),)))["test"][:7]
V_ALL = 11


def host_stack(V: int) -> dict:
    """V random adapters as host arrays [V, ...]; layer 0 untouched (layers_from=1), so the trunk is shared."""
    rng = np.random.default_rng(0)
    shape = init_lora(jax.random.PRNGKey(0), CFG, LC)
    out = {}
    for m, ab in shape.items():
        out[m] = {}
        for n, w in ab.items():
            x = (0.05 * rng.standard_normal((V,) + tuple(w.shape))).astype(np.float32)
            if m != "lm_head":
                x[:, :1] = 0.0
            out[m][n] = x
    return out


STACK = host_stack(V_ALL)
KW = dict(lora_scale=LC.scale, batch_questions=4, calibrate=True)


def mesh_of(**sizes):
    return make_mesh(MeshConfig(**{"variant": 1, "data": 1, "fsdp": 1, "model": 1, **sizes}))


@pytest.fixture(scope="module")
def mc():
    return build_mc_eval(EXS, tiny_tokenizer(), "statement")


@pytest.fixture(scope="module")
def reference(mc):
    """One device: the base and all V_ALL variants, per path."""
    assert len(jax.devices()) >= 8 and shared_layers(STACK, CFG.num_layers) == 1
    return {path: score_options(BASE, CFG, mc, STACK, with_base=True, path=path, **KW)
            for path in ("plain", "shared_prefix")}


def close(got, want, atol=1e-5):
    # float32 sums near -60 (one ulp there is 3.8e-6): other chunk sizes and partitions (a base split over fsdp
    # reduces its matmuls in another order) move the rounding by an ulp or two
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol)


@pytest.mark.parametrize("V, with_base, sizes, chunk, host, path", [
    (5, True, {"variant": 8}, 0, True, "shared_prefix"),           # one chunk of 5 host adapters, padded to 8
    (11, False, {"variant": 8}, 0, False, "plain"),                # 11 device arrays, padded to 16
    (11, False, {"variant": 4, "data": 2}, 6, True, "shared_prefix"),  # chunks of 8 (6 rounded up), 3 (padded)
    (5, True, {"variant": 4, "fsdp": 2}, 0, False, "plain"),       # the base stored over fsdp, as a study loads it
])
def test_sharded_scores_equal_one_device(mc, reference, path, V, with_base, sizes, chunk, host):
    mesh = mesh_of(**sizes)
    base = BASE
    if sizes.get("fsdp", 1) > 1:
        base = jax.device_put(BASE, base_shardings(mesh, BASE))
        assert params_mesh(base) == mesh
    stack = jax.tree.map(lambda x: x[:V], STACK)
    lora = stack if host else jax.tree.map(jnp.asarray, stack)
    got = score_options(base, CFG, mc, lora, with_base=with_base, path=path, variant_chunk=chunk, mesh=mesh, **KW)
    ref = reference[path]
    rows = np.arange(0 if with_base else 1, V + 1)
    assert got.sum.shape == got.uncond.shape == (len(rows), len(EXS), 4)
    close(got.sum, ref.sum[rows])
    close(got.uncond, ref.uncond[rows])
    close(got.calibrated, ref.calibrated[rows], atol=2e-5)      # sum - uncond: both errors add up
    np.testing.assert_array_equal(got.n_tokens, ref.n_tokens)


def test_a_selection_in_another_order_on_a_mesh(mc, reference):
    """``variants=`` (gathered rows) over a mesh: the rows in the caller's order."""
    sel = [9, 2, 4, 0, 7]
    got = score_options(BASE, CFG, mc, STACK, with_base=True, variants=sel, path="shared_prefix",
                        mesh=mesh_of(variant=8), **KW)
    rows = [0] + [v + 1 for v in sel]
    close(got.sum, reference["shared_prefix"].sum[rows])
    close(got.uncond, reference["shared_prefix"].uncond[rows])


def all_gathers(hlo: str) -> list:
    """The result shapes of the all-gather ops of a compiled HLO module's text."""
    found = re.findall(r"=\s*\(?\s*\w+\[([\d,]*)\][^\n]*?\ball-gather(?:-start)?\(", hlo)
    return [tuple(int(d) for d in s.split(",") if d) for s in found]


@pytest.mark.parametrize("name", ["score_rows", "score_shared_prefix"])
def test_each_device_holds_and_scores_only_its_own_variants(mc, reference, monkeypatch, name):
    """The chunk program receives the adapters split over ``variant`` (each device: its 2 of 16 rows), gathers no
    adapter leaf, and returns each device's scores on that device alone."""
    mesh = mesh_of(variant=8)
    original = getattr(score, name)
    calls = []

    def spy(lora, *args, **kw):
        out = original(lora, *args, **kw)
        calls.append((lora, args, kw, out))
        return out

    monkeypatch.setattr(score, name, spy)
    path = "plain" if name == "score_rows" else "shared_prefix"
    score_options(BASE, CFG, mc, STACK, path=path, mesh=mesh, **{**KW, "calibrate": False})
    assert calls and all(not c[2]["base_row"] for c in calls)
    lora, args, kw, out = calls[0]
    n_pad = 16
    for got, want in zip(jax.tree.leaves(lora), jax.tree.leaves(STACK)):
        assert got.shape[0] == n_pad and got.sharding.spec[0] == "variant"
        np.testing.assert_array_equal(np.asarray(got)[:V_ALL], want)
        shards = got.addressable_shards
        assert len(shards) == 8 and all(s.data.shape[0] == n_pad // 8 for s in shards)
        assert len({s.index[0].start for s in shards}) == 8                  # 8 different pairs of variants
    # the output: each device's rows are the scores of its own variants
    assert out.shape[0] == n_pad and len(out.addressable_shards) == 8
    whole = np.asarray(out)
    want = reference[path].sum[1:, :4]         # the first batch: questions 0-3 -> [V, 4, C]
    close(whole[:V_ALL], want.reshape(V_ALL, 16) if name == "score_rows" else want)
    held = {s.device: s.index[0] for s in jax.tree.leaves(lora)[0].addressable_shards}
    for s in out.addressable_shards:
        assert s.data.shape[0] == n_pad // 8 and s.index[0] == held[s.device]     # the rows of its own variants
        np.testing.assert_array_equal(np.asarray(s.data), whole[s.index])
    # the compiled program: no all-gather of anything adapter-sized (the adapters never leave their devices)
    leaf_sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(lora)]
    for base_row in (False, True):
        hlo = original.lower(lora, *args, **{**kw, "base_row": base_row}).compile().as_text()
        gathered = all_gathers(hlo)
        assert not [g for g in gathered if int(np.prod(g)) >= min(leaf_sizes)], (base_row, gathered)
        if not base_row:
            assert gathered == [], gathered


def test_mesh_helpers_and_errors(mc):
    mesh = mesh_of(variant=8)
    assert params_mesh(jax.device_put(BASE, NamedSharding(mesh, PartitionSpec()))) == mesh
    assert params_mesh(jax.tree.map(np.asarray, BASE)) is None
    bad = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("stack",))
    with pytest.raises(ValueError, match="no 'variant' axis"):
        score_options(BASE, CFG, mc, STACK, mesh=bad, **KW)
