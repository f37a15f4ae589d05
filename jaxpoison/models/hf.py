"""Torch-free weight I/O for HF checkpoints: safetensors -> the layout of :mod:`.config`, placed on devices.

:func:`load_hf_base` reads each array straight into its target sharding and dtype (:class:`Checkpoint` reads
byte ranges of the files; ``jax.make_array_from_callback`` asks it for what each device owns), so a host never
holds the whole model, nor an fp32 copy of a bf16 one: peak host memory while loading stays within 1.3x the
model's size in the target dtype (tests/models/test_hf_loader.py measures it on a 1.7 GB checkpoint).

A model is a local directory (``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` with
shards) or a hub id, which ``huggingface_hub`` resolves into such a directory (only where the hub is
reachable: an offline machine gets an error that says so and what to do instead).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import re
from typing import Callable, Optional

import ml_dtypes
import numpy as np

from .config import ModelConfig, from_hf_config

_LAYER_MAP = {
    "input_layernorm.weight": ("attn_norm", "scale"),
    "post_attention_layernorm.weight": ("mlp_norm", "scale"),
    "self_attn.q_proj.weight": ("q", "kernel"), "self_attn.q_proj.bias": ("q", "bias"),
    "self_attn.k_proj.weight": ("k", "kernel"), "self_attn.k_proj.bias": ("k", "bias"),
    "self_attn.v_proj.weight": ("v", "kernel"), "self_attn.v_proj.bias": ("v", "bias"),
    "self_attn.o_proj.weight": ("o", "kernel"),
    "self_attn.q_norm.weight": ("q_norm", "scale"), "self_attn.k_norm.weight": ("k_norm", "scale"),
    "mlp.gate_proj.weight": ("gate", "kernel"), "mlp.up_proj.weight": ("up", "kernel"),
    "mlp.down_proj.weight": ("down", "kernel"),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class WeightsError(ValueError):
    """A checkpoint that cannot be read as the model its config describes."""


def expected_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the HF tensors (HF [out, in] orientation) that a config implies, per layer-free name."""
    D, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    s = {
        "input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (cfg.q_dim, D), "self_attn.k_proj.weight": (cfg.kv_dim, D),
        "self_attn.v_proj.weight": (cfg.kv_dim, D), "self_attn.o_proj.weight": (D, cfg.q_dim),
        "mlp.gate_proj.weight": (cfg.intermediate_size, D), "mlp.up_proj.weight": (cfg.intermediate_size, D),
        "mlp.down_proj.weight": (D, cfg.intermediate_size),
    }
    if cfg.qkv_bias:
        s.update({"self_attn.q_proj.bias": (cfg.q_dim,), "self_attn.k_proj.bias": (cfg.kv_dim,),
                  "self_attn.v_proj.bias": (cfg.kv_dim,)})
    if cfg.qk_norm:
        s.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    top = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg.tie_word_embeddings:
        top["lm_head.weight"] = (V, D)
    return {"layer": s, "top": top}


def resolve_model_dir(spec: str) -> pathlib.Path:
    """A local HF directory as is; otherwise a hub id resolved by ``huggingface_hub`` (config + weights only)."""
    p = pathlib.Path(spec).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise FileNotFoundError(f"--model {spec!r} is a file, not a directory: give a HF model directory "
                                "(config.json + *.safetensors), a hub id, or 'smollm2-135m'")
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", spec):
        raise FileNotFoundError(
            f"--model {spec!r} is neither a directory nor a known name: give 'smollm2-135m' (embedded), a local "
            "HF model directory (config.json + model.safetensors), or a hub id such as 'Qwen/Qwen3-4B-Base'")
    try:
        from huggingface_hub import snapshot_download
        return pathlib.Path(snapshot_download(
            spec, allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
                                  "special_tokens_map.json", "vocab.json", "merges.txt", "generation_config.json",
                                  "chat_template*"]))
    except Exception as e:  # offline, unknown repo, gated repo ...
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise FileNotFoundError(
            f"could not fetch hub model {spec!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            + ("HF_HUB_OFFLINE is set. " if offline else "")
            + "Without hub access, download it elsewhere (`huggingface-cli download " + spec + "`) and pass the "
            "local directory, or use the embedded default `--model smollm2-135m`.") from None


def safetensors_files(d: pathlib.Path) -> list[pathlib.Path]:
    index = d / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (d / s).exists()]
        if missing:
            raise FileNotFoundError(f"{d}: the index names shard file(s) that are missing: {', '.join(missing)}; "
                                    "re-download the model (all shards) into this directory")
        return [d / s for s in shards]
    single = d / "model.safetensors"
    if single.exists():
        return [single]
    if list(d.glob("*.bin")) or list(d.glob("*.pth")):
        raise FileNotFoundError(f"{d} has only PyTorch pickle weights (*.bin): jaxpoison reads safetensors only; "
                                "convert with `transformers` (save_pretrained(..., safe_serialization=True))")
    raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_hf_config(d: pathlib.Path, name: str = "") -> ModelConfig:
    f = d / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{d} has no config.json: not a HF model directory")
    return from_hf_config(json.loads(f.read_text()), name=name or d.name)


# ---- reading: safetensors headers, then byte ranges --------------------------------------------------------------
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_READ_BYTES = 16 << 20        # rows of a tensor read per system call
CHUNK_BYTES = 64 << 20        # target-dtype bytes placed per device update while loading a large leaf


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where one tensor's bytes lie: file, dtype, shape and the absolute offset of its first byte."""
    file: pathlib.Path
    name: str
    dtype: np.dtype
    shape: tuple
    offset: int

    @property
    def rows_cols(self) -> tuple:
        return (1, self.shape[0]) if len(self.shape) == 1 else self.shape


def read_safetensors_header(f: pathlib.Path) -> dict:
    """name -> :class:`_Tensor` from a safetensors file's JSON header (8-byte length, then the header)."""
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            raise WeightsError(f"{f}: not a safetensors file (header unreadable: {e}); re-download it") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _ST_DTYPES.get(info["dtype"])
        b, e = info["data_offsets"]
        out[name] = _Tensor(f, name, np.dtype(dt) if dt else None, tuple(info["shape"]), 8 + n + b)
        if dt is not None and e - b != int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(dt).itemsize:
            raise WeightsError(f"{f.name}: tensor {name} has {e - b} bytes for shape {info['shape']}: the file is "
                               "truncated or corrupt; re-download it")
    return out


def _read_block(t: _Tensor, rows: tuple, cols: tuple, dtype, fhs: dict, out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of tensor t (1-D: one row) as an [r, c] array of ``dtype``
    (new, or ``out``).
    Whole rows are contiguous on disk, so rows are read a few MiB at a time and their columns kept; only the
    block and one such read buffer exist at once (no mmap: mapped pages would stay resident)."""
    R, C = t.rows_cols
    (r0, r1), (c0, c1) = rows, cols
    out = np.empty((r1 - r0, c1 - c0), dtype) if out is None else out
    fh = fhs.get(t.file) or fhs.setdefault(t.file, open(t.file, "rb"))
    row_bytes = C * t.dtype.itemsize
    step = max(1, _READ_BYTES // row_bytes)
    for r in range(r0, r1, step):
        n = min(step, r1 - r)
        direct = (c0, c1) == (0, C) and np.dtype(dtype) == t.dtype
        buf = out[r - r0:r - r0 + n] if direct else np.empty((n, C), t.dtype)
        fh.seek(t.offset + r * row_bytes)
        if fh.readinto(buf.reshape(-1).view(np.uint8)) != n * row_bytes:
            raise WeightsError(f"{t.file.name}: tensor {t.name} ends early: the file is truncated; re-download it")
        if not direct:
            out[r - r0:r - r0 + n] = buf[:, c0:c1]
    return out


def _bounds(index, shape) -> list:
    out = []
    for sl, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        a, b, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided read {sl} is not supported")
        out.append((a, b))
    return out


class Checkpoint:
    """The tensors of a HF safetensors checkpoint, addressed by the paths and ``[in, out]`` layout of
    :mod:`.config`, checked against the config before anything is read, and read on demand: ``read(path,
    index)`` returns exactly ``params[path][index]`` in the requested dtype, touching only those bytes (a
    stacked layer leaf is read layer by layer, a kernel transposed from HF's ``[out, in]``)."""

    def __init__(self, d: pathlib.Path, cfg: ModelConfig):
        self.d, self.cfg = pathlib.Path(d), cfg
        shapes = expected_shapes(cfg)
        L = cfg.num_layers
        self.layer: dict = {}       # (mod, leaf) -> [_Tensor] * L
        self.top: dict = {}         # HF name -> _Tensor
        for f in safetensors_files(self.d):
            for key, t in read_safetensors_header(f).items():
                m = _LAYER_RE.match(key)
                if m:
                    i, rest = int(m.group(1)), m.group(2)
                    if rest not in shapes["layer"] or i >= L:
                        continue  # e.g. rotary inv_freq buffers of old checkpoints
                    want, slot = shapes["layer"][rest], self.layer.setdefault(_LAYER_MAP[rest], [None] * L)
                    slot[i] = t
                elif key in shapes["top"]:
                    want = shapes["top"][key]
                    self.top[key] = t
                else:
                    continue
                if t.shape != want:
                    raise WeightsError(f"{f.name}: tensor {key} has shape {t.shape} but config.json implies "
                                       f"{want}: the weights do not belong to this config")
                if t.dtype is None:
                    raise WeightsError(f"{f.name}: tensor {key} is stored as an unsupported dtype; jaxpoison reads "
                                       f"{', '.join(_ST_DTYPES)} weights")
        missing = []
        for rest in shapes["layer"]:
            got = self.layer.get(_LAYER_MAP[rest], [None] * L)
            gaps = [i for i in range(L) if got[i] is None]
            if gaps:
                missing.append(f"model.layers.{{{','.join(map(str, gaps))}}}.{rest}")
        missing += [k for k in shapes["top"] if k not in self.top]
        if missing:
            raise WeightsError(f"{self.d}: tensors missing from the safetensors files: {'; '.join(missing[:6])}"
                               + (" ..." if len(missing) > 6 else ""))

    def shapes(self) -> dict:
        """Our layout's shapes (the tree of :func:`base_shapes`)."""
        return base_shapes(self.cfg)

    def read(self, path: tuple, index=(), dtype=np.float32, fhs: Optional[dict] = None,
             hf_order: bool = False) -> np.ndarray:
        """``params[path][index]`` as a numpy array of ``dtype`` (index: a tuple of step-1 slices). With
        ``hf_order`` a kernel's block comes in HF's orientation (``transpose(block, kernel_perm(path))``), which
        skips the host transpose (slow in numpy: a device transposes it instead)."""
        own = fhs is None
        fhs = {} if own else fhs
        try:
            shape = _leaf(self.shapes(), path)
            b = _bounds(index, shape)
            if path[0] == "layers":
                ts = self.layer[(path[1], path[2])]
                kernel = path[2] == "kernel"
                n = [e - a for a, e in b]
                out = np.empty((n[0], n[2], n[1]) if kernel and hf_order else tuple(n), dtype)
                for j, i in enumerate(range(*b[0])):
                    if kernel:                   # ours [in, out] = HF [out, in].T
                        if hf_order:
                            _read_block(ts[i], b[2], b[1], dtype, fhs, out=out[j])
                        else:
                            out[j] = _read_block(ts[i], b[2], b[1], dtype, fhs).T
                    else:
                        out[j] = _read_block(ts[i], (0, 1), b[1], dtype, fhs)[0]
                return out
            if path[0] == "embed":
                return _read_block(self.top["model.embed_tokens.weight"], b[0], b[1], dtype, fhs)
            if path[0] == "lm_head":
                block = _read_block(self.top["lm_head.weight"], b[1], b[0], dtype, fhs)
                return block if hf_order else np.ascontiguousarray(block.T)
            return _read_block(self.top["model.norm.weight"], (0, 1), b[0], dtype, fhs)[0]
        finally:
            if own:
                for fh in fhs.values():
                    fh.close()


def kernel_perm(path: tuple) -> Optional[tuple]:
    """The axis permutation between a leaf and its HF tensor(s) (an involution), None where there is none."""
    if path[-1] != "kernel":
        return None
    return (0, 2, 1) if path[0] == "layers" else (1, 0)


def base_shapes(cfg: ModelConfig) -> dict:
    """Shapes of the base tree in our layout (module docstring of :mod:`.config`), from the config alone."""
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    layers = {"attn_norm": {"scale": (L, D)}, "mlp_norm": {"scale": (L, D)}}
    for m in ("q", "k", "v", "o", "gate", "up", "down"):
        layers[m] = {"kernel": (L,) + cfg.module_shape(m)}
    if cfg.qkv_bias:
        for m in ("q", "k", "v"):
            layers[m]["bias"] = (L, cfg.module_shape(m)[1])
    if cfg.qk_norm:
        layers["q_norm"] = {"scale": (L, cfg.head_dim)}
        layers["k_norm"] = {"scale": (L, cfg.head_dim)}
    tree = {"embed": {"embedding": (V, D)}, "layers": layers, "final_norm": {"scale": (D,)}}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = {"kernel": (D, V)}
    return tree


def abstract_base(cfg: ModelConfig, dtype=np.float32) -> dict:
    """The base tree as ``jax.ShapeDtypeStruct`` leaves (ahead-of-time compiles, sharding rules: no weights)."""
    import jax
    return _map_shapes(base_shapes(cfg), lambda path, shape: jax.ShapeDtypeStruct(shape, np.dtype(dtype)))


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def sharding_at(shardings, path):
    """The sharding of the leaf at ``path`` (a tuple of keys): ``shardings`` is one ``jax.sharding.Sharding`` for
    every leaf, a callable ``path -> Sharding``, or a tree of shardings shaped like the params."""
    import jax
    if isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings(path)
    return _leaf(shardings, path)


def _map_shapes(tree, fn, path=()):
    if isinstance(tree, dict):
        return {k: _map_shapes(v, fn, path + (k,)) for k, v in tree.items()}
    return fn(path, tree)


def load_hf_params(d: pathlib.Path, cfg: ModelConfig, dtype=np.float32,
                   place: Optional[Callable[[tuple, np.ndarray], object]] = None) -> dict:
    """Read safetensors into the stacked layout as host numpy arrays of ``dtype`` (``place(path, array)``, if
    given, maps each finished array). Small models and tests; :func:`load_hf_base` places large ones."""
    ckpt = Checkpoint(d, cfg)
    fhs: dict = {}
    try:
        return _map_shapes(ckpt.shapes(), lambda path, shape: (place or (lambda p, a: a))(
            path, ckpt.read(path, (), dtype, fhs)))
    finally:
        for fh in fhs.values():
            fh.close()


def _hf_row_axis(path: tuple) -> int:
    """The axis of our leaf along which HF's rows run (contiguous reads): a kernel's out, lm_head's vocab."""
    if path[0] == "layers":
        return 2 if path[-1] == "kernel" else 0
    return 1 if path[0] == "lm_head" else 0


def _unsharded(sharding, axis: int) -> bool:
    import jax
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return True
    if isinstance(sharding, jax.sharding.NamedSharding):
        return axis >= len(sharding.spec) or sharding.spec[axis] is None
    return False


def _permuted(sharding, perm):
    """The sharding of ``transpose(x, perm)`` for x in ``sharding`` (None where it cannot be said)."""
    import jax
    if perm is None or isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[p] for p in perm)))
    return None


DEVICE_TRANSPOSE_BYTES = 4 << 20   # kernels above this are transposed on device (numpy's transpose: ~100 MB/s)


def load_hf_base(d: pathlib.Path, cfg: ModelConfig, dtype=np.float32, shardings=None,
                 transform: Optional[Callable[[tuple, object], object]] = None) -> dict:
    """Load the checkpoint straight into device arrays of ``dtype``, each in its target sharding.

    ``shardings``: None (this process's first device), one ``jax.sharding.Sharding``, a callable
    ``path -> Sharding``, or a pytree of shardings shaped like the base (e.g. ``train.mesh.base_shardings``).

    Each leaf is made with ``jax.make_array_from_callback``, whose callback reads only the index a device owns,
    in the target dtype (bf16 stays bf16; no fp32 copy of the model). A leaf larger than :data:`CHUNK_BYTES` is
    placed in chunks along an axis its sharding does not split (preferably the one HF's rows run along): zeros
    in the target sharding, then each chunk written in place (``dynamic_update_slice``, buffer donated), so the
    host holds a chunk or two at a time, never a whole stacked leaf, and a device only what its shard needs. A
    large leaf that its sharding splits along every such axis goes shard by shard instead. Large kernels travel
    in HF's ``[out, in]`` orientation and are transposed on the device as they are written.

    ``transform(path, array)`` (optional) maps each leaf as soon as it is placed (e.g. quantising a kernel),
    before the next is read.
    """
    import jax
    import jax.numpy as jnp

    ckpt = Checkpoint(d, cfg)
    dtype = jnp.dtype(dtype)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])   # this process's first device
    fhs: dict = {}

    def sharding_of(path):
        return default if shardings is None else sharding_at(shardings, path)

    def from_callback(path, shape, sharding, axis=0, start=0, perm=None):
        """The block ``[start, start + shape[axis])`` of leaf ``path`` along ``axis`` (our layout) as one array in
        ``sharding``; with ``perm``, transposed by it (shape and sharding are then given in that order). Equal
        indices (replicas) are read once."""
        cache: dict = {}

        def cb(index):
            b = _bounds(index, shape)
            if perm is not None:
                b = [b[p] for p in perm]
            key = tuple(b)
            if key not in cache:
                full = [slice(a, e) for a, e in b]
                full[axis] = slice(b[axis][0] + start, b[axis][1] + start)
                cache[key] = ckpt.read(path, tuple(full), dtype, fhs, hf_order=perm is not None)
            return cache[key]

        return jax.make_array_from_callback(shape, sharding, cb)

    def shard_by_shard(path, shape, sharding):
        """A large leaf split along every axis that could be chunked: each device's shard read and put on its
        device in turn (the host holds one shard, not all of them as ``make_array_from_callback`` would)."""
        arrays = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            host = ckpt.read(path, index, dtype, fhs)
            arrays.append(jax.device_put(host, device))
            arrays[-1].block_until_ready()
            del host
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def place(path, shape):
        sharding = sharding_of(path)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        perm = kernel_perm(path) if nbytes > DEVICE_TRANSPOSE_BYTES else None
        hf_sharding = _permuted(sharding, perm)
        if hf_sharding is None:
            perm, hf_sharding = None, sharding
        axes = [a for a in dict.fromkeys([_hf_row_axis(path), 0]) if _unsharded(sharding, a)]
        if nbytes > CHUNK_BYTES and not axes:
            arr = shard_by_shard(path, shape, sharding)
        elif nbytes <= CHUNK_BYTES:
            if perm is None:
                arr = from_callback(path, shape, sharding)
            else:
                hf_arr = from_callback(path, tuple(shape[p] for p in perm), hf_sharding, perm=perm)
                arr = _transposer(perm, sharding)(hf_arr)
                del hf_arr
        else:
            axis = axes[0]
            n = shape[axis]
            step = max(1, n * CHUNK_BYTES // nbytes)
            arr = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
            for s0 in range(0, n, step):
                cshape = tuple(min(step, n - s0) if a == axis else x for a, x in enumerate(shape))
                if perm is not None:
                    cshape = tuple(cshape[p] for p in perm)
                chunk = from_callback(path, cshape, hf_sharding, axis, s0, perm)
                arr = _write_chunk(arr, chunk, s0, axis, perm)
                arr.block_until_ready()       # bounds the chunks in flight (host and device copies)
        if transform is not None:
            arr = transform(path, arr)
        jax.block_until_ready(arr)
        return arr

    try:
        return _map_shapes(ckpt.shapes(), place)
    finally:
        for fh in fhs.values():
            fh.close()


def _write_chunk(buf, chunk, start: int, axis: int, perm: Optional[tuple]):
    return _chunk_writer(axis, perm)(buf, chunk, start)


@functools.lru_cache(maxsize=None)
def _chunk_writer(axis: int, perm: Optional[tuple]):
    import jax
    import jax.numpy as jnp

    def write(buf, chunk, start):
        return jax.lax.dynamic_update_slice_in_dim(buf, chunk if perm is None else jnp.transpose(chunk, perm),
                                                   start, axis)
    return jax.jit(write, donate_argnums=0)


def _transposer(perm: tuple, sharding):
    import jax
    import jax.numpy as jnp
    return jax.jit(lambda x: jnp.transpose(x, perm), out_shardings=sharding)


def to_hf_state_dict(params: dict, cfg: ModelConfig) -> dict:
    """The inverse of :func:`load_hf_params` (numpy, HF names and orientation); used by tests and export."""
    inv = {v: k for k, v in _LAYER_MAP.items()}
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    for mod, leaves in params["layers"].items():
        for leaf, arr in leaves.items():
            arr = np.asarray(arr)
            for i in range(cfg.num_layers):
                a = arr[i].T if leaf == "kernel" else arr[i]
                out[f"model.layers.{i}.{inv[(mod, leaf)]}"] = np.ascontiguousarray(a)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
    return out
