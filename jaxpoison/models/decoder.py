"""The decoder: Llama / Qwen2 / Qwen3 in Flax, used functionally.

``Decoder(cfg).apply({"params": base}, tokens, ...)`` returns the final-norm hidden states, never logits:
the lm_head is the largest matmul and the largest tensor, so callers compute logits only where a loss or a
score needs them (see :mod:`jaxpoison.models.heads`).

LoRA is an *argument*, not a parameter collection: ``lora`` is a pytree ``{module: {"a": [L, in, r],
"b": [L, r, out]}}`` scanned over layers together with the base weights. The base therefore stays an
undifferentiated input (``jax.grad`` w.r.t. ``lora`` only), and ``jax.vmap`` over adapters with the base
unbatched is just ``in_axes=(0, None)``. The update is ``x @ W + s * dropout(x) @ A @ B``, never merged.

Sharding is an argument too: with ``rules`` (:class:`jaxpoison.models.sharding.Rules`) every layer's hidden
states are constrained to the activation spec, and each layer's weights to their gathered spec inside the
scan, so a base stored over ``fsdp`` is all-gathered one layer at a time; without rules nothing changes.

A KV cache (``init_cache``) is carried through the layer scan and written in place with
``dynamic_update_slice`` at a shared slot index, so generation has fixed shapes and compiles once.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jax.ad_checkpoint import checkpoint_name

from .attention import attention, cached_attention, causal_attention, self_attention  # noqa: F401
from .config import ModelConfig
from .quant import is_quantized, kernel_value
from .sharding import Rules, constrain, layer_kernel_axes

Array = jax.Array

# Activations a training step keeps per layer for its backward pass (`checkpoint_name` tags here and in
# attention.py: q/k/v heads-major, the attention output and log-sum-exp, the residual after attention, the
# gate and up projections); everything else (norms, RoPE, SiLU, the LoRA rank-r products) is recomputed.
# Without a policy XLA kept about 20 [tokens, width] tensors per layer, and zero-filling, writing and reading
# those stacks took ~20 % of the step; profile in docs/benchmarks.md.
SAVED_ACTIVATIONS = ("q", "k", "v", "attn_out", "attn_lse", "x_mid", "gate", "up")
SAVE_POLICY = jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies, with Llama-3 scaling when configured (same rule as HF ``_compute_llama3_parameters``)."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = cfg.rope_scaling
    if rs is not None:
        low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
        wl = 2 * np.pi / inv
        scaled = np.where(wl > low_wl, inv / rs.factor, inv)
        smooth = (rs.original_max_position_embeddings / wl - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wl >= high_wl) & (wl <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin of shape [B, T, hd] for integer positions [B, T] (HF rotate-half convention)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, hd]; rotate the two halves of each head."""
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def _lora_fwd(x, a, b, scale):
    xf = x.reshape(-1, x.shape[-1])
    u = xf @ a
    return ((u @ b) * scale).reshape(*x.shape[:-1], b.shape[-1]), (xf, u, a, b)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def lora_delta(x: Array, a: Array, b: Array, scale: float) -> Array:
    """``scale * x @ a @ b`` (x [..., in], a [in, r], b [r, out]) with a hand-written backward.

    Autodiff's backward contracts the [tokens, out] cotangent against the saved [tokens, r] activations with
    the large operand transposed, and XLA:CPU materialises that transpose (fused into the producer of the
    cotangent: for q the RoPE and head-layout backward, a strided write of the whole [tokens, out] tensor).
    Here each contraction over tokens transposes only the rank-r side, and the scale multiplies [tokens, r].
    """
    return _lora_fwd(x, a, b, scale)[0]


def _lora_bwd(scale, res, g):
    xf, u, a, b = res
    gf = g.reshape(-1, g.shape[-1])
    db = jnp.einsum("mo,mr->or", gf, u).T * scale                   # [r, out]
    dv = jnp.einsum("mo,ro->mr", gf, b) * scale                     # [tokens, r]
    da = jnp.einsum("mi,mr->ir", xf, dv)                            # [in, r]
    dx = jnp.einsum("mr,ir->mi", dv, a).reshape(*g.shape[:-1], a.shape[0])
    return dx, da, db


lora_delta.defvjp(_lora_fwd, _lora_bwd)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return x32.astype(self.dtype) * scale.astype(self.dtype)


def _kernel_param(mod: nn.Module, fan_in: int, features: int):
    """A Linear's kernel: the float [in, out] parameter, or the :class:`jaxpoison.models.quant.QuantKernel` of a
    quantised base (read as a variable: ``self.param`` would check its leaves against the initialiser's shape)."""
    if mod.has_variable("params", "kernel") and is_quantized(k := mod.get_variable("params", "kernel")):
        return k
    return mod.param("kernel", nn.initializers.normal(0.02), (fan_in, features), jnp.float32)


class Linear(nn.Module):
    """``x @ kernel (+ bias)`` plus an optional LoRA update ``s * dropout(x) @ a @ b``; a quantised kernel
    (:mod:`jaxpoison.models.quant`) is dequantised to ``dtype`` where it is used, inside the layer scan."""
    features: int
    use_bias: bool = False
    dtype: Any = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    rules: Optional[Rules] = None
    axes: tuple = ()                # logical names of the kernel [in, out] (sharding.layer_kernel_axes)

    @nn.compact
    def __call__(self, x, lora: Optional[dict] = None, deterministic: bool = True):
        kernel = _kernel_param(self, x.shape[-1], self.features)
        if self.axes:       # this layer's weight (a quantised one still packed), gathered over fsdp
            kernel = constrain(kernel, self.axes, self.rules, gathered=True)
        y = jnp.einsum("...i,io->...o", x, kernel_value(kernel, self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(self.dtype)
        if lora is not None:
            xl = x
            if self.lora_dropout > 0 and not deterministic:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - self.lora_dropout, x.shape)
                xl = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(x.dtype)
            y = y + lora_delta(xl, lora["a"].astype(self.dtype), lora["b"].astype(self.dtype), self.lora_scale)
        return y


class Block(nn.Module):
    """One pre-norm decoder layer. Carry: (hidden, cache); per-layer inputs: (lora slice, layer index)."""
    cfg: ModelConfig
    dtype: Any = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    rules: Optional[Rules] = None

    @nn.compact
    def __call__(self, carry, lora, layer, cos, sin, mask, slot, deterministic):
        x, cache = carry
        cfg = self.cfg
        lora = lora or {}
        B, T, _ = x.shape
        H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        rules = self.rules
        x = constrain(x, ("act_batch", "act_length", "act_embed"), rules)

        def lin(name, feats, inp, bias=False):
            axes = layer_kernel_axes(name) if rules is not None else ()
            return Linear(feats, bias, self.dtype, self.lora_scale, self.lora_dropout, rules, axes, name=name)(
                inp, lora.get(name), deterministic)

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="attn_norm")(x)
        q = lin("q", H * hd, h, cfg.qkv_bias).reshape(B, T, H, hd)
        k = lin("k", K * hd, h, cfg.qkv_bias).reshape(B, T, K, hd)
        v = lin("v", K * hd, h, cfg.qkv_bias).reshape(B, T, K, hd)
        if cfg.qk_norm:
            q = RMSNorm(cfg.rms_norm_eps, self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.rms_norm_eps, self.dtype, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            ck = jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), (layer, 0, slot, 0, 0))
            cv = jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), (layer, 0, slot, 0, 0))
            cache = {"k": ck, "v": cv}
            attn = cached_attention(q, ck, cv, layer, mask, slot + T)     # reads the filled slots only
        else:
            attn = self_attention(q, k, v, mask, cfg.attention, self.rules)
        x = checkpoint_name(x + lin("o", cfg.hidden_size, attn), "x_mid")

        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="mlp_norm")(x)
        g = checkpoint_name(lin("gate", cfg.intermediate_size, h), "gate")
        u = checkpoint_name(lin("up", cfg.intermediate_size, h), "up")
        mid = constrain(nn.silu(g) * u, ("act_batch", "act_length", "act_mlp"), rules)
        x = x + lin("down", cfg.hidden_size, mid)
        return (x, cache), None


def _embed(cfg: ModelConfig, dtype, name: Optional[str] = "embed") -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.hidden_size, name=name, dtype=dtype, param_dtype=jnp.float32,
                    embedding_init=nn.initializers.normal(0.02))


def layer_inputs(cfg: ModelConfig, tokens, attn_mask=None, positions=None, cache=None, slot=0, kv_mask=None):
    """(cos, sin, mask) that every layer receives: RoPE tables of the positions (default: real tokens counted
    with the cumsum of ``attn_mask``, so left padding does not shift them) and the attention mask [B, T, S]."""
    B, T = tokens.shape
    if attn_mask is None:
        attn_mask = jnp.ones((B, T), bool)
    attn_mask = attn_mask.astype(bool)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(attn_mask, axis=-1) - 1, 0)
    cos, sin = rope_tables(cfg, positions)
    if cache is None:
        q_slot = jnp.arange(T)
        mask = (q_slot[None, :, None] >= q_slot[None, None, :]) & attn_mask[:, None, :]
    else:
        S = cache["k"].shape[2]
        q_slot = slot + jnp.arange(T)
        key_slot = jnp.arange(S)
        mask = (key_slot[None, None, :] <= q_slot[None, :, None]) & kv_mask.astype(bool)[:, None, :]
    return cos, sin, mask


class Decoder(nn.Module):
    """Embedding -> scanned blocks -> final norm. Returns (hidden [B, T, D], cache)."""
    cfg: ModelConfig
    dtype: Any = jnp.float32
    lora_scale: float = 1.0
    lora_dropout: float = 0.0
    remat: bool = False
    rules: Optional[Rules] = None

    @nn.compact
    def __call__(self, tokens, attn_mask=None, positions=None, lora=None, cache=None, slot=0,
                 kv_mask=None, deterministic: bool = True):
        """tokens/attn_mask/positions [B, T].

        Without a cache, keys are the T tokens themselves (mask: causal and ``attn_mask``). With a cache the T
        new tokens are written at slots ``slot .. slot+T-1`` and attend to every valid earlier slot:
        ``kv_mask`` [B, S] says which cache slots hold real tokens (the caller keeps it).
        """
        cfg = self.cfg
        x = _embed(cfg, self.dtype)(tokens).astype(self.dtype)
        cos, sin, mask = layer_inputs(cfg, tokens, attn_mask, positions, cache, slot, kv_mask)

        # the backward pass keeps only the SAVED activations per layer (full remat: none) and recomputes the rest
        block = nn.remat(Block, static_argnums=(8,), prevent_cse=False, policy=None if self.remat else SAVE_POLICY)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.dtype, self.lora_scale, self.lora_dropout, self.rules, name="layers")
        layer_lora = {k: v for k, v in (lora or {}).items() if k != "lm_head"} or None
        (x, cache), _ = layers((x, cache), layer_lora, jnp.arange(cfg.num_layers), cos, sin, mask, slot,
                               deterministic)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="final_norm")(x)
        if not cfg.tie_word_embeddings:
            # declared here so that init creates it; the heads module reads params["lm_head"]["kernel"]
            self.param("lm_head", lambda k: {"kernel": nn.initializers.normal(0.02)(
                k, (cfg.hidden_size, cfg.vocab_size), jnp.float32)})
        return x, cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32, layers: Optional[int] = None) -> dict:
    """Zero KV cache of ``layers`` layers (default: all of them)."""
    shape = (cfg.num_layers if layers is None else layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def init_params(cfg: ModelConfig, key: Array) -> dict:
    """Random base weights (tests, benchmarks of shape only)."""
    model = Decoder(cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    return model.init(key, tokens)["params"]


def embed_tokens(base: dict, cfg: ModelConfig, tokens, dtype=jnp.float32) -> Array:
    return _embed(cfg, dtype, name=None).apply({"params": base["embed"]}, tokens).astype(dtype)


def final_norm(base: dict, cfg: ModelConfig, x, dtype=jnp.float32) -> Array:
    return RMSNorm(cfg.rms_norm_eps, dtype).apply({"params": base["final_norm"]}, x)


def run_layers(base: dict, cfg: ModelConfig, x, lo: int, hi: int, cos, sin, mask, *, lora: Optional[dict] = None,
               cache: Optional[dict] = None, slot=0, dtype=jnp.float32, lora_scale: float = 1.0,
               lora_dropout: float = 0.0, deterministic: bool = True, dropout_key=None, policy=False,
               rules: Optional[Rules] = None):
    """Layers ``[lo, hi)`` of the decoder on hidden states x [B, T, D], functionally -> (x, cache).

    ``lora`` is a full-depth adapter tree (its rows ``lo:hi`` are used); ``cache`` holds ``hi - lo`` layers of
    its own (indexed from 0); (cos, sin, mask) come from :func:`layer_inputs`. ``policy`` other than False wraps
    each layer in ``jax.checkpoint`` with that save policy (None = recompute everything). LoRA dropout draws
    layer ``i``'s mask from ``fold_in(dropout_key, i)``. ``rules``: sharding constraints as in :class:`Decoder`.
    """
    block = Block(cfg, dtype, lora_scale, lora_dropout, rules)
    params = jax.tree.map(lambda w: w[lo:hi], base["layers"])
    lora_sl = {m: {n: w[lo:hi] for n, w in ab.items()} for m, ab in (lora or {}).items() if m != "lm_head"}
    det = deterministic or lora_dropout == 0

    def body(carry, xs):
        x, cache = carry
        p, lora_i, i = xs
        rngs = {} if det else {"dropout": jax.random.fold_in(dropout_key, lo + i)}
        (x, cache), _ = block.apply({"params": p}, (x, cache), lora_i or None, i, cos, sin, mask, slot, det,
                                    rngs=rngs)
        return (x, cache), None

    if policy is not False:
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    (x, cache), _ = jax.lax.scan(body, (x, cache), (params, lora_sl, jnp.arange(hi - lo)))
    return x, cache


def lower_layers(base: dict, cfg: ModelConfig, tokens, upto: int, cos, sin, mask, *, cache: Optional[dict] = None,
                 slot=0, dtype=jnp.float32, rules: Optional[Rules] = None):
    """Embedding, then layers ``[0, upto)`` without any adapter -> (layer ``upto``'s input, cache): the part of
    the decoder that every adapter trained with ``lora.layers_from = upto`` shares."""
    x = embed_tokens(base, cfg, tokens, dtype)
    if upto == 0:
        return x, cache
    return run_layers(base, cfg, x, 0, upto, cos, sin, mask, cache=cache, slot=slot, dtype=dtype, rules=rules)


def hidden_lora_from(base: dict, cfg: ModelConfig, tokens, attn_mask=None, positions=None, *, lora: dict,
                     lora_from: int, dtype=jnp.float32, lora_scale: float = 1.0, lora_dropout: float = 0.0,
                     remat: bool = False, deterministic: bool = True, dropout_key=None, trunk=None,
                     rules: Optional[Rules] = None) -> Array:
    """Final-norm hidden states [B, T, D] of ``Decoder(...).apply`` (no cache) when the adapter acts only on
    layers ``>= lora_from``: the cheap path for training LoRA on the top layers. ``trunk`` [B, T, D]: layer
    ``lora_from``'s input already computed (:func:`pool_trunk`), so the lower layers do not run at all.

    Layers ``[0, lora_from)`` run in a scan of their own without LoRA and under ``stop_gradient``, so
    ``jax.grad`` w.r.t. ``lora`` has nothing to differentiate there and the backward pass ends at layer
    ``lora_from`` (a scan of ``L - lora_from`` iterations instead of ``L``). Layers ``[lora_from, L)`` run with
    ``lora[m][lora_from:]``; the rows of ``lora`` below ``lora_from`` are ignored (so their gradient is exactly
    zero), which equals the plain :class:`Decoder` when those rows are zero (``init_lora`` makes them so).
    The base tree is the usual one (``base["layers"]`` stacked [L, ...]); positions, RoPE and masks are those of
    :func:`layer_inputs`. LoRA dropout draws layer ``i``'s mask from ``fold_in(dropout_key, i)`` (distinct per
    layer; not the same masks as the ``nn.scan`` of :class:`Decoder`). ``remat`` recomputes the top layers in
    the backward pass. ``rules``: sharding constraints as in :class:`Decoder`.
    """
    L = cfg.num_layers
    k = int(lora_from)
    if not 0 <= k < L:
        raise ValueError(f"lora_from={lora_from} is out of range for a model with {L} layers: use 0..{L - 1}")
    if not deterministic and lora_dropout > 0 and dropout_key is None:
        raise ValueError("LoRA dropout with deterministic=False needs a dropout_key")
    cos, sin, mask = layer_inputs(cfg, tokens, attn_mask, positions)
    if trunk is not None:
        x = jax.lax.stop_gradient(trunk.astype(dtype))
    else:
        x, _ = lower_layers(base, cfg, tokens, k, cos, sin, mask, dtype=dtype, rules=rules)
        if k > 0:
            x = jax.lax.stop_gradient(x)
    x, _ = run_layers(base, cfg, x, k, L, cos, sin, mask, lora=lora, dtype=dtype, lora_scale=lora_scale,
                      lora_dropout=lora_dropout, deterministic=deterministic, dropout_key=dropout_key,
                      policy=None if remat else SAVE_POLICY, rules=rules)
    return final_norm(base, cfg, x, dtype)


def pool_trunk(base: dict, cfg: ModelConfig, tokens, attn_mask, upto: int, dtype=jnp.float32,
               rows_per_call: int = 8) -> Array:
    """Layer ``upto``'s input for every row of a token pool [R, T] -> [R, T, D] (positions and masks as in
    :func:`layer_inputs`), ``rows_per_call`` rows per jitted call. A row's states do not depend on the rows
    batched with it, so a training step can gather them instead of running layers ``[0, upto)`` again."""
    tokens, attn_mask = np.asarray(tokens), np.asarray(attn_mask)
    R = tokens.shape[0]
    n = max(1, min(rows_per_call, R))
    out = []
    for r0 in range(0, R, n):
        t, m = tokens[r0:r0 + n], attn_mask[r0:r0 + n]
        pad = n - t.shape[0]
        if pad:
            t, m = np.concatenate([t, np.repeat(t[:1], pad, 0)]), np.concatenate([m, np.repeat(m[:1], pad, 0)])
        out.append(_trunk_rows(base, jnp.asarray(t), jnp.asarray(m), cfg=cfg, upto=upto, dtype=dtype)[:n - pad])
    return jnp.concatenate(out, axis=0)


@partial(jax.jit, static_argnames=("cfg", "upto", "dtype"))
def _trunk_rows(base, tokens, attn_mask, *, cfg: ModelConfig, upto: int, dtype):
    cos, sin, mask = layer_inputs(cfg, tokens, attn_mask)
    return lower_layers(base, cfg, tokens, upto, cos, sin, mask, dtype=dtype)[0]
