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


def take_variants(lora, idx) -> dict:
    """The adapters of the variants ``idx`` (a list of indices), still stacked."""
    idx = jnp.asarray(np.asarray(idx, np.int32))
    return jax.tree.map(lambda x: x[idx], lora)


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
                           prompt_len: int = 0, progress: bool = False, desc: str = "generate") -> list:
    """Replies of every variant to every prompt: ``out[v][i]`` (special tokens removed).

    ``lm`` is anything with ``cfg``, ``params``, ``tokenizer``, ``eos_ids``, ``pad_id``, ``dtype`` (an
    :class:`jaxpoison.models.lm.LM`). Prompts go in batches of ``batch_size`` (the last one padded with copies),
    left-padded to one bucketed length, so one compile serves the whole call; batch ``b`` samples with
    ``fold_in(PRNGKey(seed), b0)``, as :func:`jaxpoison.models.generate.generate_text` does, so a variant's
    replies equal ``generate_text(..., lora=that variant)``. ``prompt_len`` pads prompts to at least that length
    (so calls with different prompts can share one compiled program).
    """
    if not prompts:
        return [[] for _ in range(num_variants(lora))]
    V = num_variants(lora)
    chunk = variant_chunk if 0 < variant_chunk < V else V
    ids = encode_prompts(lm.tokenizer, prompts, chat, system)
    P = max(bucket(max(len(s) for s in ids)), prompt_len)
    key = jax.random.PRNGKey(seed)
    out = [[] for _ in range(V)]
    jobs = [(b0, v0) for b0 in range(0, len(ids), batch_size) for v0 in range(0, V, chunk)]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc=desc, unit="batch")
    for b0, v0 in jobs:
        part = ids[b0:b0 + batch_size]
        part = part + [part[-1]] * (batch_size - len(part))
        toks, mask = left_pad(part, lm.pad_id, P)
        vidx = list(range(v0, min(v0 + chunk, V)))
        vidx = vidx + [vidx[-1]] * (chunk - len(vidx))          # fixed variant count per call
        toks_v, lens_v = generate_tokens_variants(
            take_variants(lora, vidx), lm.params, jnp.asarray(toks), jnp.asarray(mask), jax.random.fold_in(key, b0),
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
