"""Free-text answers of many fine-tuned variants in one program: generation vmapped over stacked adapters.

A study's adapters come back stacked, ``{module: {"a": [V, L, in, r], "b": [V, L, r, out]}}``. Here the whole
jitted, KV-cached generation loop of :func:`jaxpoison.models.generate.generate_tokens` is ``jax.vmap``-ed over
that leading axis with the base weights, prompts and key unbatched (``in_axes`` 0 for the adapter only), so V
variants answer the same prompts in one compiled call: every decode step multiplies the base weights once for
all V x B rows instead of V times. Finished rows write padding until every row of every variant is done, so
a variant's tokens equal what it generates alone (test).

Every variant draws its samples from the same key (common random numbers): with temperature sampling two
variants differ only where their adapters change the distribution, which makes per-note comparisons between
variants paired. ``variant_chunk`` bounds memory (the KV cache is V x B x (P + N) per layer).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.models.config import ModelConfig
from jaxpoison.models.generate import bucket, encode_prompts, generate_tokens, left_pad


def num_variants(lora) -> int:
    return int(jax.tree.leaves(lora)[0].shape[0])


BASE = -1      # a variant index that means the base: a row of zeros (x @ a @ 0 adds exactly 0)


def take_variants(lora, idx) -> dict:
    """The adapters of the variants ``idx`` (a list of indices), still stacked; index ``BASE`` (-1) gives a zero
    row, the base model. Host arrays give host arrays (only these rows move to a device later), device arrays
    device ones."""
    idx = np.asarray(idx, np.int64).reshape(-1)
    V = num_variants(lora)
    if idx.size and (idx.min() < BASE or idx.max() >= V):
        raise ValueError(f"variant indices must lie in [-1, {V}) (-1 = the base), got {idx.tolist()}")
    base = idx == BASE
    if idx.size == V and (idx == np.arange(V)).all():
        return lora                                   # all of them, in order: no copy
    take = np.maximum(idx, 0)

    def one(x):
        if isinstance(x, np.ndarray):
            rows = x[take]
            rows[base] = 0
            return rows
        rows = x[jnp.asarray(take.astype(np.int32))]
        if base.any():
            rows = jnp.where(jnp.asarray(~base).reshape((-1,) + (1,) * (rows.ndim - 1)), rows, 0)
        return rows

    return jax.tree.map(one, lora)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p", "eos_ids", "dtype",
                                             "lora_scale"))
def generate_tokens_variants(lora, params, prompt, prompt_mask, key, *, cfg: ModelConfig, max_new_tokens: int,
                             temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple = (), pad_id: int = 0,
                             dtype=jnp.float32, lora_scale: float = 1.0):
    """Stacked ``lora`` [V, ...], prompts [B, P] (left padded) -> (tokens [V, B, N], lengths [V, B])."""
    def one(adapter):
        return generate_tokens(params, prompt, prompt_mask, key, cfg=cfg, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, eos_ids=eos_ids, pad_id=pad_id, dtype=dtype,
                               lora=adapter, lora_scale=lora_scale)

    return jax.vmap(one)(lora)


def generate_text_variants(lm, prompts: Sequence[str], lora, *, lora_scale: float = 1.0, chat: bool = False,
                           system: Optional[str] = None, max_new_tokens: int = 64, temperature: float = 0.0,
                           top_p: float = 1.0, seed: int = 0, batch_size: int = 8, variant_chunk: int = 0,
                           prompt_len: int = 0, progress: bool = False, desc: str = "generate",
                           variants: Optional[Sequence[int]] = None) -> list:
    """Replies of every variant to every prompt: ``out[v][i]`` (special tokens removed).

    ``variants``: which adapters of the stack answer, as indices (``BASE`` = -1: the base model, a zero adapter
    row), ``out[j]`` then holds the replies of ``variants[j]``; default every one in order. Each call gathers
    its ``variant_chunk`` rows from ``lora`` as it needs them (:func:`take_variants`), so neither a subset nor
    the base is stacked in front of the adapters beforehand.

    ``lm`` is anything with ``cfg``, ``params``, ``tokenizer``, ``eos_ids``, ``pad_id``, ``dtype`` (an
    :class:`jaxpoison.models.lm.LM`). Prompts go in batches of ``batch_size`` (the last one padded with copies),
    left-padded to one bucketed length, so one compile serves the whole call; batch ``b`` samples with
    ``fold_in(PRNGKey(seed), b0)``, as :func:`jaxpoison.models.generate.generate_text` does, so a variant's
    replies equal ``generate_text(..., lora=that variant)``. ``prompt_len`` pads prompts to at least that length
    (so calls with different prompts can share one compiled program).
    """
    sel = list(range(num_variants(lora))) if variants is None else [int(v) for v in variants]
    if not prompts or not sel:
        return [[] for _ in sel]
    V = len(sel)
    chunk = variant_chunk if 0 < variant_chunk < V else V
    ids = encode_prompts(lm.tokenizer, prompts, chat, system)
    P = max(bucket(max(len(s) for s in ids)), prompt_len)
    key = jax.random.PRNGKey(seed)
    out = [[] for _ in range(V)]
    # variant chunks outer: each chunk's adapters are gathered (and sent to the devices) once for all batches
    jobs = [(v0, b0) for v0 in range(0, V, chunk) for b0 in range(0, len(ids), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc=desc, unit="batch")
    held = (None, None)
    for v0, b0 in jobs:
        part = ids[b0:b0 + batch_size]
        part = part + [part[-1]] * (batch_size - len(part))
        toks, mask = left_pad(part, lm.pad_id, P)
        vidx = list(range(v0, min(v0 + chunk, V)))
        vidx = vidx + [vidx[-1]] * (chunk - len(vidx))          # fixed variant count per call
        if held[0] != v0:
            held = (v0, take_variants(lora, [sel[j] for j in vidx]))
        toks_v, lens_v = generate_tokens_variants(
            held[1], lm.params, jnp.asarray(toks), jnp.asarray(mask), jax.random.fold_in(key, b0),
            cfg=lm.cfg, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_ids=lm.eos_ids,
            pad_id=lm.pad_id, dtype=lm.dtype, lora_scale=lora_scale)
        toks_v, lens_v = np.asarray(toks_v), np.asarray(lens_v)
        seen = set()
        for j, v in enumerate(vidx):
            if v in seen:
                continue
            seen.add(v)
            for r in range(min(batch_size, len(ids) - b0)):
                out[v].append(lm.tokenizer.decode(toks_v[j, r, :lens_v[j, r]].tolist(), skip_special_tokens=True))
    return out
