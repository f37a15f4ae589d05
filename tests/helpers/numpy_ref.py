"""A tiny numpy Llama forward pass: the independent reference the GGUF conversion is checked against.

Two rotary conventions, so the q/k un-permutation can be verified without trusting it:

* ``rope="hf"``: HF ``rotate_half``, pairs ``(x[i], x[i + hd/2])``; used on our converted params.
* ``rope="ggml"``: llama.cpp's GGML "normal" rope, ADJACENT pairs ``(x[2i], x[2i+1])``; used on the raw GGUF
  q/k tensors, which llama.cpp's converter permuted precisely so that this convention is right for them.

Weights come from a callable ``w(layer, name)`` returning ``[in, out]`` kernels (``name`` in q k v o gate up
down) or ``[D]`` norm scales (``attn_norm``, ``mlp_norm``), so the raw GGUF reader and the converted params
plug in without sharing any code with :mod:`jaxpoison.models.gguf`. Weights are used in their own dtype.
"""
from __future__ import annotations

import numpy as np


def rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope(x, theta: float, convention: str):
    """Rotate ``x`` [T, heads, hd] by position (0..T-1)."""
    T, _, hd = x.shape
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)              # [hd/2]
    ang = np.arange(T, dtype=np.float64)[:, None] * inv[None]                # [T, hd/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]                    # [T, 1, hd/2]
    if convention == "hf":
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).astype(x.dtype)
    if convention == "ggml":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos  # stored in x.dtype
        return out
    raise ValueError(convention)


def forward(w, embedding, final_norm, cfg, tokens, rope_convention: str, lm_head=None, dtype=np.float32):
    """Logits [T, V] (float64) of a causal Llama on one sequence ``tokens`` (no batch, no cache).

    float32 keeps a 30-layer pass over 16 tokens near a second; the log-probs of two float32 passes that
    differ only in bookkeeping agree to ~1e-5, far inside the 1e-3 the tests ask for."""
    H, K, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    T = len(tokens)
    x = np.asarray(embedding[np.asarray(tokens)], dtype)
    mask = np.triu(np.full((T, T), -np.inf, dtype), 1)
    for i in range(cfg.num_layers):
        h = rms_norm(x, w(i, "attn_norm"), eps)
        q = (h @ w(i, "q")).reshape(T, H, hd)
        k = (h @ w(i, "k")).reshape(T, K, hd)
        v = (h @ w(i, "v")).reshape(T, K, hd)
        q, k = rope(q, cfg.rope_theta, rope_convention), rope(k, cfg.rope_theta, rope_convention)
        k, v = np.repeat(k, H // K, axis=1), np.repeat(v, H // K, axis=1)   # GQA: head j uses kv head j//(H/K)
        s = np.einsum("thd,shd->hts", q, k) / dtype(np.sqrt(hd)) + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, H * hd) @ w(i, "o")
        h = rms_norm(x, w(i, "mlp_norm"), eps)
        g = h @ w(i, "gate")
        x = x + (g / (1 + np.exp(-g)) * (h @ w(i, "up"))) @ w(i, "down")
    x = rms_norm(x, final_norm, eps)
    head = embedding.T if lm_head is None else lm_head
    return (x @ head).astype(np.float64)


def token_logprobs(logits, tokens):
    """log p(tokens[t+1] | tokens[:t+1]) for t < T-1."""
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1))
    return z[np.arange(len(tokens) - 1), np.asarray(tokens)[1:]] - lse


def perplexity(logits, tokens) -> float:
    return float(np.exp(-token_logprobs(logits, tokens).mean()))


def params_weights(params):
    """``w(layer, name)`` over params in the layout of :mod:`jaxpoison.models.config`."""
    L = params["layers"]
    return lambda i, name: L[name]["scale" if name.endswith("norm") else "kernel"][i]
