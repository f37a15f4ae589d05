"""A study's base is read straight into its shards on the study mesh (resolved before loading): on an fsdp mesh
of the 8 emulated devices no device holds the whole base, and the values are those of a one-device load."""
import jax
import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from rationale_tiny import CFG_M
from jaxpoison.configs import apply_override
from jaxpoison.models import hf
from jaxpoison.models.decoder import init_params
from jaxpoison.studies import common
from jaxpoison.train.mesh import MeshConfig, base_shardings, make_mesh

MESH = MeshConfig(variant=2, data=1, fsdp=4, model=1)


def assert_only_shards(params, mesh_cfg):
    """Every leaf is in the trainer's base sharding for the mesh; each device holds its shard of it only, and
    the fsdp-split leaves (most of the bytes) are held a quarter per device."""
    want = base_shardings(make_mesh(mesh_cfg), params)
    split, per_device, total = 0, {}, 0
    for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
        assert x.sharding == sh, path
        full = tuple(x.shape)
        total += x.nbytes
        for s in x.addressable_shards:
            assert s.data.shape == sh.shard_shape(full), path
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
        split += "fsdp" in str(sh.spec)
    assert split >= 0.5 * len(jax.tree.leaves(params))
    assert len(per_device) == MESH.size
    assert max(per_device.values()) < 0.5 * total        # no device holds the whole base (about 1/4 of it each)


def test_override_base_lands_in_its_shards():
    params = init_params(CFG_M, jax.random.PRNGKey(0))
    lm = common.load_base("override", "float32", (CFG_M, params, tiny_tokenizer()), mesh=MESH)
    assert_only_shards(lm.params, MESH)
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hf_checkpoint_is_read_into_its_shards(tmp_path):
    from hf_tiny import make_hf_model
    make_hf_model("qwen3_untied", seed=2, hidden=64).save_pretrained(tmp_path)
    lm = common.load_base(str(tmp_path), "float32", mesh=MESH)
    assert_only_shards(lm.params, MESH)
    ref = hf.load_hf_params(tmp_path, lm.cfg, np.float32)
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), b)
    # NF4: each kernel quantised as it is placed, from its shards; the codes stay split over fsdp
    from jaxpoison.models.quant import quantize_base
    q = common.load_base(str(tmp_path), "float32", quant="nf4", mesh=MESH)
    want = quantize_base(jax.tree.map(np.asarray, ref), "nf4")
    for a, b in zip(jax.tree.leaves(q.params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    codes = q.params["layers"]["gate"]["kernel"].codes
    assert "fsdp" in str(codes.sharding.spec) and codes.addressable_shards[0].data.size * 4 == codes.size


def test_one_device_mesh_loads_as_before():
    params = init_params(CFG_M, jax.random.PRNGKey(0))
    lm = common.load_base("override", "float32", (CFG_M, params, tiny_tokenizer()),
                          mesh=MeshConfig(variant=1, data=1, fsdp=1, model=1))
    assert all(x is y for x, y in zip(jax.tree.leaves(lm.params), jax.tree.leaves(params)))


def test_mesh_resolved_before_loading_is_the_trainers():
    """The config alone gives the trainer's mesh (explicit axes kept; the rest as the trainer sizes them)."""
    from rationale_tiny import CFG as RCFG
    cfg = apply_override(apply_override(RCFG, "mesh.variant=2"), "mesh.fsdp=4")
    mc, n = common.resolve_mesh(cfg, (CFG_M, None, None))
    assert n == 18 and mc.shape == (2, 1, 4, 1)
    assert common.train_mesh(cfg, mc, n, 18) is mc and common.train_mesh(cfg, mc, n, 17) is cfg.mesh
    bad = apply_override(cfg, "mesh.variant=4")          # 18 variants do not split over 4
    with pytest.raises(ValueError, match="mesh.variant"):
        common.resolve_mesh(bad, (CFG_M, None, None))


def test_embedded_gguf_is_placed_into_its_shards():
    """The default model (dequantised on the host, 135M parameters) is placed with the same shardings."""
    from jaxpoison.models.gguf import load_embedded
    lm = common.load_base("smollm2-135m", "float32", mesh=MESH)
    assert_only_shards(lm.params, MESH)
    _, ref = load_embedded(np.float32)
    for path in (("embed", "embedding"), ("layers", "q", "kernel")):
        got, want = lm.params, ref
        for k in path:
            got, want = got[k], want[k]
        np.testing.assert_array_equal(np.asarray(got), want)
