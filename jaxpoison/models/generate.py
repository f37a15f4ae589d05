"""Jitted, batched generation with a KV cache.

Prompts are left-padded to a bucketed length P; the cache holds P + max_new_tokens slots and every row writes
its n-th new token into slot P + n, so all shapes are fixed and one compile serves every prompt of a bucket.
Positions (for RoPE) count real tokens only, so left padding does not shift them. The loop is a
``lax.while_loop`` that ends when every row has produced an end-of-sequence token.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig
from .decoder import Decoder, init_cache
from .heads import logits as head_logits


def sample_token(key, logits, temperature: float, top_p: float):
    """Greedy when temperature == 0, else temperature + nucleus (top-p) sampling. logits [B, V] fp32."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / temperature
    if top_p < 1.0:
        sorted_z = jnp.sort(z, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_z, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        n_keep = jnp.sum(cum - jax.nn.softmax(sorted_z, axis=-1) < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_z, jnp.maximum(n_keep - 1, 0), axis=-1)
        z = jnp.where(z < cutoff, -jnp.inf, z)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_p", "eos_ids",
                                             "dtype", "lora_scale"))
def generate_tokens(params, prompt, prompt_mask, key, *, cfg: ModelConfig, max_new_tokens: int,
                    temperature: float = 0.0, top_p: float = 1.0, eos_ids: tuple = (), pad_id: int = 0,
                    dtype=jnp.float32, lora=None, lora_scale: float = 1.0):
    """prompt/prompt_mask [B, P] (left padded). Returns (new tokens [B, N] padded with pad_id, lengths [B])."""
    B, P = prompt.shape
    N = max_new_tokens
    model = Decoder(cfg, dtype, lora_scale)
    prompt_mask = prompt_mask.astype(bool)
    cache = init_cache(cfg, B, P + N, dtype)
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((B, N), bool)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
    hidden, cache = model.apply({"params": params}, prompt, prompt_mask, positions, lora, cache, 0, kv_mask)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def pick(key, h):
        return sample_token(key, head_logits(params, cfg, h, lora, lora_scale), temperature, top_p)

    key, sub = jax.random.split(key)
    first = pick(sub, hidden[:, -1])
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    n_real = prompt_mask.sum(-1)

    def cond(state):
        i, _, _, done, _, _ = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        i, tok_prev, out, done, cache, key = state
        slot = P + i - 1
        slots = jnp.arange(P + N)[None, :]
        kvm = kv_mask | ((slots >= P) & (slots <= slot))  # the prompt + every token generated so far
        pos = (n_real + i - 1)[:, None]
        h, cache = model.apply({"params": params}, tok_prev[:, None], jnp.ones((B, 1), bool), pos, lora, cache,
                               slot, kvm)
        key, sub = jax.random.split(key)
        tok = pick(sub, h[:, 0])
        tok = jnp.where(done, pad_id, tok)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, i))
        done = done | jnp.isin(tok, eos)
        return i + 1, tok, out, done, cache, key

    state = (jnp.int32(1), first, out, done, cache, key)
    _, _, out, done, _, _ = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(out, eos)
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, N)
    return out, first_eos


def bucket(n: int, step: int = 32) -> int:
    return max(step, -(-n // step) * step)


def encode_prompts(tokenizer, prompts: Sequence[str], chat: bool = False, system: Optional[str] = None) -> list:
    ids = []
    for p in prompts:
        if chat:
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        else:
            text = p
        ids.append(tokenizer.encode(text, add_special_tokens=not chat))
    return ids


def left_pad(seqs: list, pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    toks = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), bool)
    for i, s in enumerate(seqs):
        s = s[-length:]
        toks[i, length - len(s):] = s
        mask[i, length - len(s):] = True
    return toks, mask


def generate_text(lm, prompts: Sequence[str], *, chat: bool = False, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 8,
                  lora=None, lora_scale: float = 1.0, system: Optional[str] = None, progress: bool = False) -> list:
    """Generate a reply for each prompt (special tokens removed). Batches of ``batch_size``, same seed → same text."""
    ids = encode_prompts(lm.tokenizer, prompts, chat, system)
    P = bucket(max(len(s) for s in ids))
    replies = []
    key = jax.random.PRNGKey(seed)
    starts = range(0, len(ids), batch_size)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc="generate", unit="batch")
    for b0 in starts:
        chunk = ids[b0:b0 + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # fixed batch shape
        toks, mask = left_pad(chunk, lm.pad_id, P)
        out, lens = generate_tokens(lm.params, jnp.asarray(toks), jnp.asarray(mask), jax.random.fold_in(key, b0),
                                    cfg=lm.cfg, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, eos_ids=lm.eos_ids, pad_id=lm.pad_id, dtype=lm.dtype,
                                    lora=lora, lora_scale=lora_scale)
        out, lens = np.asarray(out), np.asarray(lens)
        for r in range(min(batch_size, len(ids) - b0)):
            replies.append(lm.tokenizer.decode(out[r, :lens[r]].tolist(), skip_special_tokens=True))
    return replies
