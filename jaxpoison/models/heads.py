"""Output heads: logits only where they are needed.

The lm_head is the largest matmul of a small model and ``[B, T, vocab]`` the largest tensor of a step, so:

* ``token_logprobs`` walks the sequence in chunks and never holds more than ``[B, chunk, vocab]`` logits.
  Its gradient is a ``custom_vjp``: the forward pass of each chunk already has the softmax in hand, so it
  stores ``d log p(target) / d hidden = W[target] - p @ W^T`` (``[B, T, D]``, the size of the hidden states)
  and the backward pass is one multiply. Nothing is recomputed and no logits are kept for the backward pass.
  (The base head is never differentiated; with a LoRA adapter on lm_head a checkpointed scan is used.)
* ``select_positions`` gathers the few positions a completion-only loss or an option score needs, so the
  head runs on ``[B, P]`` positions instead of ``[B, T]``.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from .config import ModelConfig

# Vocabulary columns per lm_head matmul in token_logprobs (measured best on the 2-core CPU: 1536).
VOCAB_BLOCK = 1536


def head_kernel(params: dict, cfg: ModelConfig) -> jax.Array:
    """The [D, V] output projection (the transposed embedding when tied)."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def head_rows(params: dict, cfg: ModelConfig) -> jax.Array:
    """The same projection as [V, D] rows (cheap gathers of one token's output vector)."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"]
    return params["lm_head"]["kernel"].T


def logits(params: dict, cfg: ModelConfig, hidden: jax.Array, lora: Optional[dict] = None,
           lora_scale: float = 1.0) -> jax.Array:
    w = head_kernel(params, cfg).astype(hidden.dtype)
    out = jnp.einsum("...d,dv->...v", hidden, w)
    if lora is not None and "lm_head" in lora:
        a, b = lora["lm_head"]["a"], lora["lm_head"]["b"]
        out = out + lora_scale * jnp.einsum("...r,rv->...v", hidden @ a.astype(hidden.dtype), b.astype(hidden.dtype))
    return out.astype(jnp.float32)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] -> [T/chunk, B, chunk, ...] (T padded up to a multiple of chunk)."""
    B, T = x.shape[:2]
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x: jax.Array, T: int) -> jax.Array:
    n, B, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * c, *x.shape[3:])[:, :T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _logprobs_base(hidden, w_rows, targets, chunk):
    lp, _ = _logprobs_fwd_impl(hidden, w_rows, targets, chunk, want_grad=False)
    return lp


def vocab_blocks(vocab: int, target: int = VOCAB_BLOCK) -> tuple[int, int]:
    """(number of blocks, block width) splitting ``vocab`` into near-equal blocks of about ``target`` columns."""
    n = max(1, round(vocab / target))
    width = -(-vocab // n)
    return n, -(-width // 8) * 8


def _logprobs_fwd_impl(hidden, w_rows, targets, chunk, want_grad):
    """Rows in chunks of ``chunk`` positions (outer scan), the vocabulary in blocks (inner scan, online
    log-sum-exp as in flash attention): no chunk ever holds more than ``[B, chunk, block]`` logits, which stay in
    cache between the matmul and the two reductions, and each matmul has the shape the CPU's BLAS is fastest at.
    With ``want_grad`` the softmax-weighted rows ``p @ W`` are accumulated the same way, rescaled as the running
    max moves."""
    B, T, D = hidden.shape
    V = w_rows.shape[0]
    w = w_rows.astype(hidden.dtype)
    n_blk, width = vocab_blocks(V)
    pad = n_blk * width - V
    w_blocks = (jnp.pad(w, ((0, pad), (0, 0))) if pad else w).reshape(n_blk, width, D)
    # padded columns get -inf logits, so they add nothing to the sum (and nothing to p @ W)
    col_bias = jnp.where(jnp.arange(n_blk * width) < V, 0.0, -jnp.inf).reshape(n_blk, width) if pad else None

    def chunk_body(_, xs):
        h, t = xs
        h2 = h.reshape(-1, D)
        M = h2.shape[0]

        def vocab_body(carry, blk):
            m, s, acc = carry
            z = jnp.einsum("md,vd->mv", h2, blk[0]).astype(jnp.float32)
            if col_bias is not None:
                z = z + blk[1]
            m_new = jnp.maximum(m, z.max(-1))
            e = jnp.exp(z - m_new[:, None])
            rescale = jnp.exp(m - m_new)
            s = s * rescale + e.sum(-1)
            if want_grad:
                acc = acc * rescale[:, None].astype(acc.dtype) + jnp.einsum("mv,vd->md", e.astype(h.dtype), blk[0])
            return (m_new, s, acc), None

        init = (jnp.full((M,), -jnp.inf, jnp.float32), jnp.zeros((M,), jnp.float32),
                jnp.zeros((M, D) if want_grad else (), h.dtype))
        blocks = (w_blocks,) if col_bias is None else (w_blocks, col_bias)
        (m, s, acc), _ = jax.lax.scan(vocab_body, init, blocks)
        w_t = jnp.take(w, t, axis=0)                                       # [B, c, D]: the target rows
        zt = jnp.einsum("bcd,bcd->bc", h, w_t).astype(jnp.float32)
        lp = zt - (m + jnp.log(s)).reshape(zt.shape)
        if not want_grad:
            return None, (lp, jnp.zeros((), h.dtype))
        dh = w_t - (acc / s[:, None].astype(acc.dtype)).reshape(h.shape)
        return None, (lp, dh)

    _, (lp, dh) = jax.lax.scan(chunk_body, None, (_chunks(hidden, chunk), _chunks(targets, chunk)))
    return _unchunk(lp, T), (_unchunk(dh, T) if want_grad else None)


def _logprobs_fwd(hidden, w_rows, targets, chunk):
    lp, dh = _logprobs_fwd_impl(hidden, w_rows, targets, chunk, want_grad=True)
    return lp, (dh, w_rows, targets)


def _logprobs_bwd(chunk, res, g):
    dh, w_rows, targets = res
    return (g[..., None].astype(dh.dtype) * dh, jnp.zeros_like(w_rows),
            jnp.zeros(targets.shape, jax.dtypes.float0))


_logprobs_base.defvjp(_logprobs_fwd, _logprobs_bwd)


def token_logprobs(params: dict, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, *, chunk: int = 128,
                   lora: Optional[dict] = None, lora_scale: float = 1.0) -> jax.Array:
    """log p(targets[b, t] | hidden[b, t]) for every position, shape [B, T], fp32, chunked over T.

    The gradient flows to ``hidden`` (and to an lm_head LoRA if given), never to the base head.
    """
    chunk = max(1, min(chunk, hidden.shape[1]))
    if lora is None or "lm_head" not in lora:
        return _logprobs_base(hidden, jax.lax.stop_gradient(head_rows(params, cfg)), targets, chunk)

    T = hidden.shape[1]

    @jax.checkpoint
    def one(h, t):
        z = logits(params, cfg, h, lora, lora_scale)
        return jnp.take_along_axis(z, t[..., None], -1)[..., 0] - jax.nn.logsumexp(z, -1)

    _, lp = jax.lax.scan(lambda c, xs: (c, one(*xs)), None, (_chunks(hidden, chunk), _chunks(targets, chunk)))
    return _unchunk(lp, T)


PACK = 32      # packed positions come in rows of this many (the head's matmuls then take all of them at once)


def packed_budget(counts, limit: int) -> int:
    """The static size :func:`masked_logprob_sums` packs to: the largest of ``counts`` (set positions per
    call, over every call that shares the program) rounded up to a multiple of :data:`PACK`, at most ``limit``
    rounded the same way."""
    top = max([int(c) for c in counts] + [1])
    return min(-(-top // PACK) * PACK, -(-int(limit) // PACK) * PACK)


def masked_logprob_sums(params: dict, cfg: ModelConfig, hidden: jax.Array, targets: jax.Array, mask: jax.Array,
                        budget: int, *, chunk: int = 128, lora: Optional[dict] = None,
                        lora_scale: float = 1.0) -> jax.Array:
    """Per row, the summed log p(targets[r, t] | hidden[r, t]) over the positions where ``mask`` is set -> [R].

    hidden [R, N, D], targets/mask [R, N]. The head (a matmul over the whole vocabulary per position) runs only
    on the set positions, packed across rows into ``budget`` slots (static; a multiple of :data:`PACK`, sized
    by :func:`packed_budget` from the data): with right-padded rows of uneven length most of a ``[R, N]`` grid
    is padding the head would otherwise pay for. Set positions beyond ``budget`` would be dropped, so the
    caller sizes it to hold all of them."""
    R, N, D = hidden.shape
    if budget % PACK:
        raise ValueError(f"budget must be a multiple of {PACK}, got {budget}")
    pad = max(budget - R * N, 0)                               # a budget over the grid's size: empty slots
    flat = jnp.pad(mask.reshape(R * N).astype(bool), (0, pad))
    idx = jnp.argsort(~flat, stable=True)[:budget]           # the set positions first, in order
    ok = flat[idx]
    idx = jnp.minimum(idx, R * N - 1)
    h = hidden.reshape(R * N, D)[idx].reshape(budget // PACK, PACK, D)
    t = targets.reshape(R * N)[idx].reshape(budget // PACK, PACK)
    lp = token_logprobs(params, cfg, h, t, chunk=max(chunk, PACK), lora=lora, lora_scale=lora_scale)
    return jax.ops.segment_sum(jnp.where(ok, lp.reshape(budget), 0.0), idx // N, num_segments=R)


def select_positions(mask: jax.Array, budget: int) -> tuple[jax.Array, jax.Array]:
    """Indices of the first ``budget`` positions where ``mask`` is set, per row, and their validity.

    Returns (idx [B, budget] int32, valid [B, budget] bool). Rows with fewer set positions are padded with
    position 0 marked invalid; rows with more are cut (the caller sizes ``budget`` from the data).
    """
    B, T = mask.shape
    m = mask > 0
    order = jnp.argsort(~m, axis=-1, stable=True)[:, :budget].astype(jnp.int32)
    valid = jnp.take_along_axis(m, order, axis=-1)
    return jnp.where(valid, order, 0), valid


def gather_positions(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, T, ...], idx [B, P] -> [B, P, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
