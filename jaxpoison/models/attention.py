"""Grouped-query attention: the plain form (any mask, KV cache) and the causal form for training and scoring.

:func:`causal_attention` is the one the decoder uses when a sequence attends to itself. It walks query
blocks (block ``[t0, t1)`` only looks at keys ``[0, t1)``, so the masked upper triangle is never computed)
and has its own backward pass (``jax.custom_vjp``), written the way flash attention's is:

* the forward saves q, k, v, the output and one log-sum-exp per query row, never the probabilities, so
  training memory per layer grows with ``T`` rather than ``T^2`` (at ``T = 2048`` the saved probabilities
  of one layer at batch 8 would be 0.6 GB);
* the backward recomputes each block's probabilities from the saved log-sum-exp, writes ``dq`` block by
  block (concatenated, never padded) and accumulates ``dk``/``dv`` into the key prefix in place. Autodiff
  of the blocked forward instead pads every block's ``dq``/``dk``/``dv`` to the full length and sums the
  pads, which is where the old backward lost most of its time (profile in BUILD_NOTES).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Grouped-query attention. q [B, T, H, hd], k/v [B, S, K, hd], mask [B, T, S] bool -> [B, T, H*hd]."""
    B, T, H, hd = q.shape
    K = k.shape[2]
    q, k, v = checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")   # kept for backward
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) / np.sqrt(hd)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H * hd)


def _blocks(T: int, block: int):
    return [(t0, min(T, t0 + block)) for t0 in range(0, T, block)]


def _scores(qb, kt, bias, t0, t1, G):
    """Scaled, biased scores of query block ``[t0, t1)`` against keys ``[0, t1)``: [B, K, n, G, t1] fp32."""
    B, K, nG, hd = qb.shape
    s = jnp.einsum("bkqd,bksd->bkqs", qb, kt[:, :, :t1]).astype(jnp.float32).reshape(B, K, nG // G, G, t1)
    return s * (1.0 / np.sqrt(hd)) + bias[:, :, t0:t1, :, :t1]


def _core_fwd_impl(qt, kt, vt, bias, block):
    """qt [B, K, T, G, hd], kt/vt [B, K, T, hd], bias [B, 1, T, 1, T] -> (out like qt, lse [B, K, T, G])."""
    B, K, T, G, hd = qt.shape
    outs, lses = [], []
    for t0, t1 in _blocks(T, block):
        n = t1 - t0
        qb = qt[:, :, t0:t1].reshape(B, K, n * G, hd)
        s = _scores(qb, kt, bias, t0, t1, G)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        l = jnp.sum(e, axis=-1, keepdims=True)
        p = (e / l).astype(qt.dtype).reshape(B, K, n * G, t1)
        outs.append(jnp.einsum("bkqs,bksd->bkqd", p, vt[:, :, :t1]).reshape(B, K, n, G, hd))
        lses.append((m + jnp.log(l))[..., 0])
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_core(qt, kt, vt, bias, block):
    return _core_fwd_impl(qt, kt, vt, bias, block)[0]


def _core_fwd(qt, kt, vt, bias, block):
    out, lse = _core_fwd_impl(qt, kt, vt, bias, block)
    out, lse = checkpoint_name(out, "attn_out"), checkpoint_name(lse, "attn_lse")
    return out, (qt, kt, vt, bias, out, lse)


def _core_bwd(block, res, dout):
    qt, kt, vt, bias, out, lse = res
    B, K, T, G, hd = qt.shape
    f32 = jnp.float32
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1)               # [B, K, T, G]
    dk = jnp.zeros(kt.shape, f32)
    dv = jnp.zeros(vt.shape, f32)
    dqs = []
    for t0, t1 in _blocks(T, block):
        n = t1 - t0
        qb = qt[:, :, t0:t1].reshape(B, K, n * G, hd)
        p = jnp.exp(_scores(qb, kt, bias, t0, t1, G) - lse[:, :, t0:t1, :, None])   # [B, K, n, G, t1]
        dob = dout[:, :, t0:t1].reshape(B, K, n * G, hd)
        pf = p.astype(qt.dtype).reshape(B, K, n * G, t1)
        dv = dv.at[:, :, :t1].add(jnp.einsum("bkqs,bkqd->bksd", pf, dob).astype(f32))
        dp = jnp.einsum("bkqd,bksd->bkqs", dob, vt[:, :, :t1]).astype(f32).reshape(B, K, n, G, t1)
        ds = (p * (dp - delta[:, :, t0:t1, :, None]) * (1.0 / np.sqrt(hd))).astype(qt.dtype)
        ds = ds.reshape(B, K, n * G, t1)
        dqs.append(jnp.einsum("bkqs,bksd->bkqd", ds, kt[:, :, :t1]).reshape(B, K, n, G, hd))
        dk = dk.at[:, :, :t1].add(jnp.einsum("bkqs,bkqd->bksd", ds, qb).astype(f32))
    dq = jnp.concatenate(dqs, axis=2).astype(qt.dtype)
    return dq, dk.astype(kt.dtype), dv.astype(vt.dtype), None


_causal_core.defvjp(_core_fwd, _core_bwd)


def causal_attention(q: Array, k: Array, v: Array, mask: Array, block: int = 64, max_blocks: int = 16) -> Array:
    """:func:`attention` of a sequence over itself (S = T, ``mask`` [B, T, T] causal and padding), faster on CPU
    and with a memory-lean backward (module docstring).

    q, k, v are transposed once to heads-major ``[B, K, T, (G,) hd]`` with the G query heads of a kv head folded
    into the rows, so each block is one batched matmul per kv head and the softmax runs along the contiguous
    last axis; the mask enters as an additive bias built once. Blocks are unrolled (at most ``max_blocks``;
    longer sequences get larger blocks). Results are the same as :func:`attention` on every query that has a
    real key (fully masked padding queries average over their block's keys instead of all keys).
    """
    B, T, H, hd = q.shape
    K = k.shape[2]
    G = H // K
    block = max(block, -(-T // max_blocks))
    if T <= block:
        return attention(q, k, v, mask)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, :, None, :]   # [B, 1, T, 1, S]
    qt = q.reshape(B, T, K, G, hd).transpose(0, 2, 1, 3, 4)                         # [B, K, T, G, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                       # [B, K, S, hd]
    # what the backward pass keeps (decoder.SAVE_POLICY): these heads-major copies, not q/k/v as well
    qt, kt, vt = checkpoint_name(qt, "q"), checkpoint_name(kt, "k"), checkpoint_name(vt, "v")
    out = _causal_core(qt, kt, vt, jax.lax.stop_gradient(bias), block)
    return out.transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)
