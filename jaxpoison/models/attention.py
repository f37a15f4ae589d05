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
  pads, which is where the old backward lost most of its time (profile in docs/benchmarks.md).

:func:`self_attention` picks the implementation by backend (``ModelConfig.attention``): this blocked path on
CPU, ``jax.nn.dot_product_attention`` (cuDNN) on GPU, the Pallas splash kernel on TPU. :func:`cached_attention`
is the KV-cache form for generation and shared-prefix scoring; it reads only the filled slots.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from .config import ATTENTION_IMPLEMENTATIONS

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


# ---- implementations chosen by backend ------------------------------------------------------------------------
# ``ModelConfig.attention`` names how a sequence attends to itself (training, scoring, prefill without cache):
#   blocked           causal_attention above: the CPU path (flash-style backward, no T^2 tensor kept)
#   xla | cudnn       jax.nn.dot_product_attention with that implementation (cuDNN flash attention on GPU)
#   splash            the Pallas splash-attention kernel (Mosaic, TPU only: lowers for TPU targets)
#   splash_interpret  the same kernel in Pallas interpret mode (runs anywhere; slow; for tests on CPU)
#   auto              splash on TPU, cudnn on GPU for bf16/fp16 compute (xla for fp32, which cuDNN lacks),
#                     blocked elsewhere
IMPLEMENTATIONS = ATTENTION_IMPLEMENTATIONS


def resolve_attention(impl: str = "auto", platform: str | None = None, dtype=None) -> str:
    """The implementation ``impl`` stands for on ``platform`` (default: jax's default backend) with compute
    ``dtype``. Ahead-of-time compiles for another platform (the planner's TPU topologies on a CPU host) pass
    that platform, since the default backend is then the host's."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    platform = (platform or jax.default_backend()).lower()
    if platform == "tpu":
        return "splash"
    if platform in ("gpu", "cuda"):
        half = dtype is not None and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half else "xla"
    return "blocked"


def kernel_manifest(impl: str = "auto", dtype=None, platform: str | None = None) -> dict:
    """What a run's manifest records about its kernels: the attention setting, what it resolved to on this
    backend with this compute dtype, and the backend (the KV-cache decode path is the same everywhere)."""
    platform = platform or jax.default_backend()
    return {"attention": resolve_attention(impl, platform, dtype), "attention_setting": impl, "backend": platform,
            "decode_attention": "blocked_filled_slots"}


def self_attention(q: Array, k: Array, v: Array, mask: Array, impl: str = "auto", rules=None) -> Array:
    """:func:`causal_attention`'s contract (q [B, T, H, hd], k/v [B, T, K, hd], ``mask`` [B, T, T] causal and
    padding -> [B, T, H*hd]) through the implementation ``impl`` names (:func:`resolve_attention`). Outputs
    agree on every query that has a real key; fully masked padding queries may differ (nothing reads them).
    ``rules`` (:class:`jaxpoison.models.sharding.Rules`) place the splash kernel on the current mesh."""
    impl = resolve_attention(impl, dtype=q.dtype)
    if impl == "blocked":
        return causal_attention(q, k, v, mask)
    if impl in ("xla", "cudnn"):
        # cuDNN's flash attention with a bias (our mask) trains only on even lengths
        return _dot_product_attention(q, k, v, mask, impl, multiple=2 if impl == "cudnn" else 1)
    return splash_attention(q, k, v, mask, rules=rules, interpret=impl == "splash_interpret")


def _dot_product_attention(q, k, v, mask, impl: str, multiple: int = 1):
    """``jax.nn.dot_product_attention`` (causal, ``mask`` as its boolean mask) with the sequence padded to a
    ``multiple`` (padded queries see no key: their rows are dropped)."""
    B, T, H, hd = q.shape
    pad = -T % multiple
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        mask = jnp.pad(mask, ((0, 0), (0, pad), (0, pad)))
    q, k, v = checkpoint_name(q, "q"), checkpoint_name(k, "k"), checkpoint_name(v, "v")
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True, implementation=impl)
    return checkpoint_name(out, "attn_out")[:, :T].reshape(B, T, H * hd)


def _splash_block(n: int) -> int:
    return next(b for b in (512, 256, 128) if n % b == 0)


def splash_attention(q: Array, k: Array, v: Array, mask: Array, *, rules=None, interpret: bool = False) -> Array:
    """Causal self-attention through the Pallas TPU splash kernel (``jax.experimental.pallas.ops.tpu``).

    The kernel takes a static mask (causal) plus per-token segment ids; padding becomes segment 0 and real
    tokens segment 1, read off the diagonal of ``mask`` (a token attends to itself iff it is real), so a real
    query sees exactly the real keys before it. Padding queries see the padding before them (never an empty
    row, which the kernel requires). The sequence is padded to a multiple of 128 (the kernel's lane width) and
    q is pre-scaled by ``1/sqrt(hd)`` (the kernel does not scale). Mosaic kernels are not partitioned by
    GSPMD, so under a mesh the kernel runs in ``shard_map`` with the batch over the axes ``rules`` give
    ``act_batch`` and the heads over ``model`` when it divides the kv heads (GQA groups stay whole); inside
    ``vmap(..., spmd_axis_name="variant")`` jax adds the variant axis itself.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    from jax.sharding import PartitionSpec as P

    B, T, H, hd = q.shape
    K = k.shape[2]
    real = jnp.diagonal(mask, axis1=1, axis2=2).astype(jnp.int32)                # [B, T]
    Tp = -(-T // 128) * 128
    qt = (q * (1.0 / np.sqrt(hd)).astype(q.dtype)).transpose(0, 2, 1, 3)          # [B, H, T, hd]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                       # [B, K, T, hd]
    if Tp != T:
        pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
        qt, kt, vt = jnp.pad(qt, pad), jnp.pad(kt, pad), jnp.pad(vt, pad)
        real = jnp.pad(real, ((0, 0), (0, Tp - T)))
    qt, kt, vt = checkpoint_name(qt, "q"), checkpoint_name(kt, "k"), checkpoint_name(vt, "v")

    batch_spec, head_axis = None, None
    if rules is not None:
        batch_spec = rules.spec(("act_batch",), (B,))
        batch_spec = batch_spec[0] if len(batch_spec) else None
        sizes = dict(rules.sizes)
        if sizes.get("model", 1) > 1 and K % sizes["model"] == 0:
            head_axis = "model"
    n_head_shards = dict(rules.sizes).get("model", 1) if head_axis else 1
    blk = _splash_block(Tp)
    bs = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
                       block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((Tp, Tp))] * (H // n_head_shards)),
                                block_sizes=bs, head_shards=1, q_seq_shards=1,
                                residual_checkpoint_name="attn_out", interpret=interpret)

    def run(qt, kt, vt, real):
        return jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sk.SegmentIds(s, s)))(qt, kt, vt, real)

    # under any mesh of more than one device the kernel must sit in shard_map, even with nothing of its own
    # sharded (a variant-only mesh: batch and heads replicated): GSPMD cannot partition a Mosaic call, and
    # vmap(spmd_axis_name='variant') outside adds the variant axis to these specs only through shard_map
    if rules is not None and any(n > 1 for _, n in rules.sizes):
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("the splash attention kernel under sharding rules runs in shard_map over the current "
                             "mesh: trace the program inside `with jax.set_mesh(mesh):`")
        qkv = P(batch_spec, head_axis)
        run = jax.shard_map(run, mesh=mesh, in_specs=(qkv, qkv, qkv, P(batch_spec)), out_specs=qkv,
                            check_vma=False)
    out = run(qt, kt, vt, real)[:, :, :T]                                          # [B, H, T, hd]
    return out.transpose(0, 2, 1, 3).reshape(B, T, H * hd)


# ---- attention over a KV cache ---------------------------------------------------------------------------------
def decode_block(S: int) -> int:
    """KV block of :func:`cached_attention` for a cache of S slots: about S/8, a power of two in [16, 256]."""
    b = 1 << max(0, (-(-S // 8) - 1).bit_length())
    return int(min(S, max(16, min(256, b))))


def cached_attention(q: Array, ck: Array, cv: Array, layer, mask: Array, filled, block: int | None = None) -> Array:
    """:func:`attention` of q [B, T, H, hd] over layer ``layer`` of a KV cache ck/cv [L, B, S, K, hd] with
    ``mask`` [B, T, S], reading only slots ``[0, filled)`` (``filled`` may be traced: generation's slot + T).

    The cache is read ``block`` slots at a time in a loop whose trip count is ``ceil(filled / block)``, with an
    online softmax (fp32 running max, sum and output), so a decode step costs the filled length, not the cache's. A
    last block that would run past S starts at ``S - block`` instead, and the slots it shares with the block before
    are masked out, as are slots past ``filled`` that the last block spans (their values are zeroed, so whatever an
    unfilled slot holds never reaches the output). Masked scores are ``finfo.min`` as in :func:`attention`, so every
    row stays finite; rows with a real key equal :func:`attention`'s.
    """
    B, T, H, hd = q.shape
    S, K = ck.shape[2], ck.shape[3]
    G = H // K
    block = decode_block(S) if block is None else min(block, S)
    f32, neg = jnp.float32, jnp.finfo(jnp.float32).min
    qg = q.reshape(B, T, K, G, hd)
    filled = jnp.asarray(filled, jnp.int32)
    n = (filled + block - 1) // block

    def body(j, carry):
        m, l, acc = carry
        start = jnp.minimum(j * block, S - block)
        at, size = (layer, 0, start, 0, 0), (1, B, block, K, hd)
        kb, vb = jax.lax.dynamic_slice(ck, at, size)[0], jax.lax.dynamic_slice(cv, at, size)[0]   # [B, block, K, hd]
        slots = start + jnp.arange(block)
        fresh = (slots >= j * block) & (slots < filled)            # slots of this block, not of the one before
        mb = jax.lax.dynamic_slice_in_dim(mask, start, block, 2) & fresh
        vb = jnp.where(fresh[None, :, None, None], vb, 0)           # unfilled slots may hold anything
        s = jnp.einsum("btkgd,bskd->bkgts", qg, kb.astype(q.dtype)).astype(f32) / np.sqrt(hd)
        s = jnp.where(mb[:, None, None], s, neg)
        m_new = jnp.maximum(m, s.max(-1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l = l * alpha + p.sum(-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(q.dtype), vb.astype(q.dtype)).astype(f32)
        acc = acc * alpha[..., None] + pv
        return m_new, l, acc

    init = (jnp.full((B, K, G, T), neg, f32), jnp.zeros((B, K, G, T), f32), jnp.zeros((B, K, G, T, hd), f32))
    m, l, acc = jax.lax.fori_loop(0, n, body, init)
    out = (acc / l[..., None]).astype(q.dtype)                                      # [B, K, G, T, hd]
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * hd)
