"""On 8 emulated CPU devices, sharded studies equal the unsharded study (conftest sets the device count).

Meshes are (variant, data, fsdp, model). With ``variant_chunk`` the variants run as chunks whose state waits
in host memory; each chunk keeps its variant axis split over ``variant``.
"""
import dataclasses
import re

import numpy as np
import pytest
import jax

from tiny import TINY, tiny_base, tiny_study
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static, init_program, segment_program, variant_keys
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.mesh import MeshConfig, make_mesh, mesh_rules
from jaxpoison.train.trainer import train_study

# Adam's eps at 1e-4: with the default 1e-8 a gradient component near zero is normalised to +-lr, so a last-bit
# difference of summation order (batch split over data/fsdp, tensor-parallel partial sums) would grow to 1e-4.
ST = Static(TINY, TrainConfig(learning_rate=5e-3, epochs=2, batch_size=4, log_every=4, eps=1e-4),
            LoraConfig(r=4, alpha=8, targets=("q", "v", "up")))
CHUNKED = dataclasses.replace(ST, tcfg=dataclasses.replace(ST.tcfg, variant_chunk=8))


def _close(a_tree, b_tree, atol=1e-5):
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference():
    return train_study(tiny_base(), ST, tiny_study(V=16), progress=False)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 4, 1, 1), (2, 1, 2, 2), (1, 2, 2, 2)])
def test_sharded_chunked_equals_unsharded(reference, shape):
    assert len(jax.devices()) >= 8, "conftest must emulate 8 devices"
    res = train_study(tiny_base(), CHUNKED, tiny_study(V=16), mesh=MeshConfig(*shape), progress=False)
    _close(res.lora, reference.lora)
    np.testing.assert_array_equal(np.asarray(res.state.updates), np.asarray(reference.state.updates))
    np.testing.assert_allclose(res.metrics["loss"], reference.metrics["loss"], atol=1e-5, equal_nan=True)


def test_resident_state_is_spread_over_the_mesh(reference):
    mc = MeshConfig(4, 1, 2, 1)
    res = train_study(tiny_base(), ST, tiny_study(V=16), mesh=mc, progress=False)
    assert len(res.lora["q"]["a"].sharding.device_set) == 8
    _close(res.lora, reference.lora)


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 64 devices"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(4, 4, 4, 1), progress=False)
    with pytest.raises(ValueError, match="product of the mesh sizes must divide the device count"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(3, 1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="do not split over a variant axis of 8"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(8, 1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="mesh.variant must be a positive int or 'auto'"):
        MeshConfig(variant=0)


def test_resume_onto_another_mesh_gives_the_same_adapters(tmp_path, reference):
    """Checkpoints hold every variant in the study's order: stop on 8 variant shards in chunks of 8, resume
    with the whole state resident on a (4, 1, 2, 1) mesh."""
    run = str(tmp_path / "run")
    first = dataclasses.replace(CHUNKED, tcfg=dataclasses.replace(CHUNKED.tcfg, save_every=4))
    then = dataclasses.replace(ST, tcfg=dataclasses.replace(ST.tcfg, save_every=4))
    train_study(tiny_base(), first, tiny_study(V=16), run_dir=run, mesh=MeshConfig(8, 1, 1, 1), progress=False,
                stop_after=4)
    res = train_study(tiny_base(), then, tiny_study(V=16), run_dir=run, mesh=MeshConfig(4, 1, 2, 1), progress=False)
    assert res.resumed_from == 4
    _close(res.lora, reference.lora)


def _collectives(hlo: str) -> list:
    """(kind, shape, bytes) of every collective in a compiled HLO text (async pairs counted once)."""
    out = []
    for ty, dims, kind in re.findall(r"= (\w+)\[([\d,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|"
                                     r"collective-permute|all-to-all)(?:-start)?\(", hlo):
        shape = tuple(int(d) for d in dims.split(",") if d)
        out.append((kind, shape, int(np.prod(shape)) * np.dtype({"f32": "float32", "s32": "int32", "bf16": "bfloat16",
                                                                  "pred": "bool"}[ty]).itemsize))
    return out


def _compiled_chunk_step(shape, C=8, length=2):
    mesh = make_mesh(MeshConfig(*shape))
    st = dataclasses.replace(CHUNKED, rules=mesh_rules(mesh))
    sd = tiny_study(V=16)
    var, base = sd.variants().take(np.arange(C)), tiny_base()
    keys = variant_keys(jax.random.PRNGKey(0), var)
    with jax.set_mesh(mesh):
        state = jax.eval_shape(init_program(st, mesh), keys)
        seg = segment_program(st, length, mesh, base)
        hlo = seg.lower(state, np.int32(0), keys, base, sd.pool(), var).compile().as_text()
    return _collectives(hlo), state, base, mesh


def test_chunk_on_variant_axis_has_no_collectives():
    """A chunk of 8 variants on 8 variant shards: each device trains its own variant, nothing is exchanged."""
    coll, *_ = _compiled_chunk_step((8, 1, 1, 1))
    assert coll == []


def test_pool_split_by_variant_shard_holds_only_each_shards_rows_and_exchanges_nothing():
    """The trainer's pool layout (engine ``pool_shards``): on (8, 1, 1, 1) device ``s`` holds exactly the rows that
    the chunk's variants on it draw from (``pool_layout``), the compiled step still has no collective, and the
    study trains the adapters of the replicated-pool program."""
    from jaxpoison.train.trainer import place_pool, pool_layout
    mesh = make_mesh(MeshConfig(8, 1, 1, 1))
    st = dataclasses.replace(ST, rules=mesh_rules(mesh))
    sd = tiny_study(V=8, R=48)
    layout = pool_layout(sd.rows, sd.n_rows, [np.arange(8)], 8)
    for v in range(8):      # variant v alone on shard v: its own rows, nothing else
        assert set(layout.shard_rows[v]) == set(sd.rows[v, :sd.n_rows[v]])
        np.testing.assert_array_equal(layout.padded(v)[layout.local[0][v, :sd.n_rows[v]]], sd.rows[v, :sd.n_rows[v]])
    pool, taken = place_pool(sd, layout, mesh)
    assert layout.R < 48 and pool.tokens.shape == (8, layout.R, sd.tokens.shape[1])
    for sh in pool.tokens.addressable_shards:
        s = sh.index[0].start
        np.testing.assert_array_equal(np.asarray(sh.data)[0], sd.tokens[layout.padded(s)])
    var = sd.variants()
    keys = variant_keys(jax.random.PRNGKey(0), var)
    with jax.set_mesh(mesh):
        state = init_program(st, mesh)(keys)
        seg = segment_program(st, 2, mesh, tiny_base(), pool_shards=True)
        placed = var.replace(rows=layout.local[0])
        assert _collectives(seg.lower(state, np.int32(0), keys, tiny_base(), pool, placed).compile().as_text()) == []
        got, _ = seg(state, np.int32(0), keys, tiny_base(), pool, placed)
        ref, _ = segment_program(st, 2, mesh, tiny_base())(init_program(st, mesh)(keys), np.int32(0), keys,
                                                            tiny_base(), sd.pool(), var)
    _close(got.lora, ref.lora, atol=1e-6)


def test_sharded_chunk_gathers_base_layers_only():
    """On (variant, data, fsdp, model) = (2, 1, 2, 2) the step all-gathers one base layer at a time over fsdp
    (and the embedding once) and all-reduces tensor-parallel activations; no per-variant state is gathered."""
    coll, state, base, mesh = _compiled_chunk_step((2, 1, 2, 2))
    gathers = [c for c in coll if c[0] == "all-gather"]
    L = TINY.num_layers
    # what a gather may produce: one layer's kernel [1, in, out] with the model split kept, or a whole
    # non-layer weight (embedding [V, D])
    per_module = {m: (1, i // 2, o) if m in ("o", "down") else (1, i, o // 2) for m, (i, o) in {
        "q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 64), "up": (32, 64),
        "down": (64, 32)}.items()}
    layer_kernels = set(per_module.values())
    whole = {tuple(x.shape) for k, x in base.items() if k != "layers" for x in jax.tree.leaves(x)}
    assert gathers, "a base stored over fsdp must be gathered"
    assert {g[1] for g in gathers} <= layer_kernels | whole, gathers
    state_shapes = {tuple(x.shape[1:]) for x in jax.tree.leaves(state) if x.ndim > 1}
    assert not any(c[1][1:] in state_shapes for c in coll if c[0] != "all-reduce"), coll
    # counts and bytes: at most the 7 kernels of a layer, twice (forward and backward recompute), plus the
    # embedding; all-reduces only of one layer's activations [variants/2, batch/2, T, D] or smaller
    assert len(gathers) <= 2 * 7 + 1
    one_layer = sum(np.prod(s) * 4 for s in per_module.values())
    assert sum(g[2] for g in gathers) <= 2 * one_layer + TINY.vocab_size * TINY.hidden_size * 4
    act = 4 * 2 * 16 * TINY.hidden_size * 4
    reduces = [c for c in coll if c[0] == "all-reduce"]
    assert reduces and all(c[2] <= act for c in reduces), reduces
    assert len(reduces) <= 2 * L + 2


def test_top_layers_path_with_trunk_cache_sharded_equals_unsharded():
    """LoRA on the top layer only (``lora.layers_from``, the functional ``run_layers`` path) with the trunk cache:
    the same constraints and per-layer gathers apply there, and the result equals the one-device run."""
    st = dataclasses.replace(ST, tcfg=dataclasses.replace(ST.tcfg, trunk_cache=True, variant_chunk=4),
                             lcfg=dataclasses.replace(ST.lcfg, layers_from=1))
    one = train_study(tiny_base(), st, tiny_study(V=8), progress=False)
    sharded = train_study(tiny_base(), st, tiny_study(V=8), mesh=MeshConfig(2, 1, 2, 2), progress=False)
    assert np.abs(np.asarray(one.lora["q"]["b"])[:, 1]).max() > 1e-4      # the top layer trained
    _close(sharded.lora, one.lora)


@pytest.mark.parametrize("waiting, shape", [("pinned_host", (2, 1, 2, 2)), ("numpy", (2, 1, 2, 2)),
                                            ("pinned_host", (1, 1, 1, 1))])
def test_chunks_waiting_in_host_memory_give_the_same_adapters(reference, waiting, shape, monkeypatch):
    """Waiting chunks in the pinned_host memory of their devices (what accelerators use) or as numpy arrays:
    the same adapters as the one-device run (CPU keeps them in place by default, so force the mode)."""
    import jaxpoison.train.trainer as trainer
    monkeypatch.setattr(trainer, "WAITING", waiting)
    res = train_study(tiny_base(), CHUNKED, tiny_study(V=16), mesh=MeshConfig(*shape), progress=False)
    _close(res.lora, reference.lora)
