"""Loading a HF checkpoint straight into its target sharding and dtype: the values are the checkpoint's (HF
[out, in] kernels transposed, layers stacked), each device holds only its shard, bf16 stays bf16, and a bf16
model of 1.7 GB loads with peak host memory under 1.3x its size."""
import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from hf_tiny import make_hf_model
from jaxpoison.models import hf
from jaxpoison.models.lm import load_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loader")
    make_hf_model("qwen2_untied", seed=4, hidden=64).save_pretrained(d)
    return d


def _mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("fsdp", "model"))


def _specs(params):
    """An FSDP + tensor-parallel placement: kernels [L, in, out] over (None, fsdp, model), the rest by dim 0; the
    up kernel over (fsdp, None, model), which leaves no axis to chunk along (it goes shard by shard)."""
    def spec(path, x):
        keys = tuple(k.key for k in path)
        if keys[1:] == ("up", "kernel"):
            return P("fsdp", None, "model")
        if keys[-1] == "kernel" and x.ndim == 3:
            return P(None, "fsdp", "model")
        return P("fsdp") if x.shape[0] % 2 == 0 else P()
    return jax.tree_util.tree_map_with_path(spec, params)


@pytest.mark.parametrize("chunk_bytes", [hf.CHUNK_BYTES, 4096])
def test_sharded_load_equals_host_load(tiny_dir, monkeypatch, chunk_bytes):
    """Into an (fsdp=2, model=4) placement, whole leaves or in 4 KiB chunks written in place: the same values
    as the host reader, in the target shardings, every device holding only its shard."""
    monkeypatch.setattr(hf, "CHUNK_BYTES", chunk_bytes)
    cfg = hf.read_hf_config(tiny_dir)
    ref = hf.load_hf_params(tiny_dir, cfg, np.float32)
    mesh = _mesh()
    target = jax.tree.map(lambda s: NamedSharding(mesh, s), _specs(ref), is_leaf=lambda s: isinstance(s, P))
    lm = load_model(str(tiny_dir), sharding=target, tokenizer=False)
    for (path, got), want, sh in zip(jax.tree_util.tree_leaves_with_path(lm.params), jax.tree.leaves(ref),
                                     jax.tree.leaves(target)):
        assert got.sharding == sh, path
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=str(path))
        for shard in got.addressable_shards:
            assert shard.data.shape == sh.shard_shape(want.shape)
    q = lm.params["layers"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape == (cfg.num_layers, 32, cfg.q_dim // 4)


def test_bf16_load_equals_rounded_fp32_and_kernels_are_transposed(tiny_dir):
    from safetensors.numpy import load_file
    cfg = hf.read_hf_config(tiny_dir)
    f32 = load_model(str(tiny_dir), tokenizer=False).params
    b16 = load_model(str(tiny_dir), "bfloat16", tokenizer=False).params
    for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(b16)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(b), np.asarray(jnp.asarray(a, jnp.bfloat16)))
    raw = load_file(str(tiny_dir / "model.safetensors"))
    np.testing.assert_array_equal(np.asarray(f32["layers"]["down"]["kernel"][1]),
                                  raw["model.layers.1.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(np.asarray(f32["lm_head"]["kernel"]), raw["lm_head.weight"].T)
    np.testing.assert_array_equal(np.asarray(f32["layers"]["k"]["bias"][0]),
                                  raw["model.layers.0.self_attn.k_proj.bias"])
    assert cfg.num_layers == 2


def test_abstract_base_matches_the_loaded_tree(tiny_dir):
    lm = load_model(str(tiny_dir), "bfloat16", tokenizer=False)
    abstract = hf.abstract_base(lm.cfg, jnp.bfloat16)
    assert jax.tree.structure(abstract) == jax.tree.structure(lm.params)
    for a, b in zip(jax.tree.leaves(abstract), jax.tree.leaves(lm.params)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


# ---- peak host memory on a 1.7 GB bf16 checkpoint ----------------------------------------------------------------
# Llama-3-8B's hidden width and vocabulary (tied), half its MLP width, three layers: 1.7 GB in bf16; the embedding
# is 1.07 GB of it (a host copy of it alone would read 1.6x), each stacked MLP kernel 135 MB (chunked, transposed
# on the device). Half the MLP width halves the device transposes, the bulk of the load time.
BIG = dict(model_type="llama", vocab_size=131072, hidden_size=4096, intermediate_size=5504, num_hidden_layers=3,
           num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rms_norm_eps=1e-5)


_BASE = (((np.arange(12000, dtype=np.int32) * 37) % 255 - 127) / 128).astype(ml_dtypes.bfloat16)


def _pattern(k: int, r0: int, r1: int, cols: int) -> np.ndarray:
    """Rows [r0, r1) of synthetic tensor number k: row r is ``_BASE`` from ``(7 r + 13 k) % 251`` on (small
    integers / 128, exact in bf16; shifted per row and per tensor)."""
    return np.stack([_BASE[(r * 7 + k * 13) % 251:][:cols] for r in range(r0, r1)])


def _write_big_checkpoint(d):
    """Two safetensors shards + index, written tensor by tensor in blocks of 251 rows (the pattern's period)."""
    cfg = hf.from_hf_config(BIG)
    shapes = hf.expected_shapes(cfg)
    names = [("model.embed_tokens.weight", shapes["top"]["model.embed_tokens.weight"])]
    for i in range(cfg.num_layers):
        names += [(f"model.layers.{i}.{k}", s) for k, s in shapes["layer"].items()]
    names += [("model.norm.weight", shapes["top"]["model.norm.weight"])]
    half = len(names) // 2
    weight_map = {}
    for part, chunk in enumerate([names[:half], names[half:]]):
        fname = f"model-0000{part + 1}-of-00002.safetensors"
        header, off = {}, 0
        for name, shape in chunk:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(d / fname, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for name, shape in chunk:
                rows, cols = (1, shape[0]) if len(shape) == 1 else shape
                cycle = _pattern(names.index((name, shape)), 0, min(rows, 251), cols).tobytes()   # rows repeat
                for r0 in range(0, rows, 251):                                                    # every 251
                    fh.write(cycle[:(min(rows, r0 + 251) - r0) * 2 * cols])
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(BIG))
    return cfg, names


_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from jaxpoison.models import hf, lm
    jnp.zeros(4).block_until_ready()                       # the backend is up in both measurements
    def hwm():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    out = {"hwm": hwm()}
    if len(sys.argv) > 1:
        m = lm.load_model(sys.argv[1], "bfloat16", tokenizer=False)
        p = m.params
        out["hwm"] = hwm()
        out["dtypes"] = sorted({str(x.dtype) for x in jax.tree.leaves(p)})
        out["down_1"] = np.asarray(p["layers"]["down"]["kernel"][1, 100:103, 7:10], np.float32).tolist()
        out["gate_2"] = np.asarray(p["layers"]["gate"]["kernel"][2, 4000:4002, 5500:5503], np.float32).tolist()
        out["embed"] = np.asarray(p["embed"]["embedding"][131000:131002, 4090:4093], np.float32).tolist()
        out["q_0"] = np.asarray(p["layers"]["q"]["kernel"][0, 4095, 1000:1003], np.float32).tolist()
        out["norm_2"] = np.asarray(p["layers"]["mlp_norm"]["scale"][2, :3], np.float32).tolist()
        out["bytes"] = sum(x.nbytes for x in jax.tree.leaves(p))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = ru.ru_utime + ru.ru_stime
    print(json.dumps(out))
""")


def test_bf16_load_peak_host_memory_within_1_3x(tmp_path):
    cfg, names = _write_big_checkpoint(tmp_path)
    size = sum(int(np.prod(s)) for _, s in names) * 2
    assert 1.6e9 < size < 1.8e9
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}            # one CPU device: all of it on "device"

    def probe(*args):
        r = subprocess.run([sys.executable, "-c", _PROBE, *args], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    bare, loaded = probe(), probe(str(tmp_path))
    assert loaded["bytes"] == size and loaded["dtypes"] == ["bfloat16"]
    peak = loaded["hwm"] - bare["hwm"]
    print(f"bf16 model {size / 1e9:.2f} GB: peak host memory over the bare interpreter {peak / size:.3f}x, "
          f"load CPU time {loaded['cpu_s'] - bare['cpu_s']:.1f} s")
    assert peak <= 1.3 * size, f"peak host memory {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB bf16 model"

    def want(name, rows, cols, transpose=False):
        k = [n for n, _ in names].index(name)
        shape = dict(names)[name]
        C = shape[-1] if len(shape) == 2 else shape[0]
        block = np.asarray(_pattern(k, rows[0], rows[1], C)[:, cols[0]:cols[1]], np.float32)
        return block.T if transpose else block

    eq = np.testing.assert_array_equal
    eq(loaded["down_1"], want("model.layers.1.mlp.down_proj.weight", (7, 10), (100, 103), True))
    eq(loaded["gate_2"], want("model.layers.2.mlp.gate_proj.weight", (5500, 5503), (4000, 4002), True))
    eq(loaded["embed"], want("model.embed_tokens.weight", (131000, 131002), (4090, 4093)))
    eq(loaded["q_0"], want("model.layers.0.self_attn.q_proj.weight", (1000, 1003), (4095, 4096), True)[0])
    eq(loaded["norm_2"], want("model.layers.2.post_attention_layernorm.weight", (0, 1), (0, 3))[0])


def test_loads_into_the_study_mesh_base_shardings(tiny_dir, monkeypatch):
    """The shardings train.mesh gives the base on a (variant 2, fsdp 2, model 2) mesh, from the config alone
    (hf.abstract_base), are what the loader places into; chunked leaves too."""
    from jaxpoison.train.mesh import MeshConfig, base_shardings, make_mesh
    monkeypatch.setattr(hf, "CHUNK_BYTES", 8192)
    cfg = hf.read_hf_config(tiny_dir)
    mesh = make_mesh(MeshConfig(variant=2, data=1, fsdp=2, model=2))
    target = base_shardings(mesh, hf.abstract_base(cfg, jnp.bfloat16))
    assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(target))
    lm = load_model(str(tiny_dir), "bfloat16", sharding=target, tokenizer=False)
    ref = hf.load_hf_params(tiny_dir, cfg, jnp.bfloat16)
    for got, want, sh in zip(jax.tree.leaves(lm.params), jax.tree.leaves(ref), jax.tree.leaves(target)):
        assert got.sharding == sh and got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), want)


def test_truncated_file_is_named(tiny_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 100)
    with pytest.raises(hf.WeightsError, match=r"model\.safetensors: tensor .* ends early: the file is truncated"):
        load_model(str(d), tokenizer=False)
