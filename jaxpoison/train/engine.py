"""The study program: many LoRA variants of one frozen base, fine-tuned together.

The whole study is one pure function, as in purejaxrl: ``train = make_train(spec, steps)`` trains ONE variant
from its key, and ``jax.jit(jax.vmap(train, in_axes=(0, None, None, 0)))(keys, base, pool, variants)`` trains
them all, the base and the token pool unbatched. Everything a variant is (its training rows, its seed, its
learning-rate scale) is data in :class:`Variants`, so one program serves them all. A variant's key is
``fold_in(root, seed)``: its adapter is drawn from ``fold_in(key, 0x7fffffff)`` (variants of one seed start
alike) and its batch at global step ``s`` from ``fold_in(key, variant_id)``: epoch ``e = s // updates_per_epoch``
draws a permutation of the variant's rows from ``fold_in(that, e)``. So a run resumed at step ``s`` sees exactly
the batches it would have seen, and a variant trained alone sees exactly what it sees in company.

``make_train`` is :func:`init_state` followed by :func:`make_segment` over all steps; the host loop
(:mod:`.trainer`) runs the same segment function ``K`` steps at a time instead, to checkpoint in between.

Gradients are taken w.r.t. the adapter only: the base enters as an undifferentiated argument. A variant whose
loss or gradient goes non-finite is frozen (its state stops changing) and flagged; the others go on.
Variants with fewer rows finish earlier and then idle (no update, no optimiser step); the trainer groups
variants by step count so that chunks of variants run only their own steps.

With ``LoraConfig.layers_from`` (first LoRA layer ``k > 0``) the loss runs layers ``[0, k)`` in a scan of their
own without LoRA and without a backward pass, then layers ``[k, L)`` with the adapter (``hidden_lora_from``):
the gradient costs ``L - k`` layer backward passes instead of ``L``. The adapter keeps its ``[L, ...]`` layout;
its rows below ``k`` start at zero and get a zero gradient, so they stay exactly zero.

With ``Static.rules`` (a mesh) activations and per-layer weights carry sharding constraints
(:mod:`jaxpoison.models.sharding`); without, the program has no sharding code at all.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.models.config import ModelConfig
from jaxpoison.models.decoder import Decoder, hidden_lora_from
from jaxpoison.models.heads import gather_positions, select_positions, token_logprobs
from jaxpoison.models.lm import parse_dtype
from jaxpoison.models.sharding import Rules, constrain, param_axes

from .config import TrainConfig
from .lora import LoraConfig, init_lora
from .mesh import base_shardings, state_shardings


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the compiled program depends on besides array shapes (the ``spec`` of :func:`make_train`)."""
    cfg: ModelConfig
    tcfg: TrainConfig
    lcfg: LoraConfig
    rules: Optional[Rules] = None       # logical-axis rules of the mesh (set by the trainer); None: one device

    def __post_init__(self):
        self.lcfg.first_layer(self.cfg.num_layers)      # LoraConfig.layers_from must fit the model

    @property
    def lora_from(self) -> int:
        """First layer that carries LoRA (``LoraConfig.layers_from`` resolved against the model)."""
        return self.lcfg.first_layer(self.cfg.num_layers)


@flax.struct.dataclass
class Pool:
    """The tokenized training rows every variant draws from (unbatched: shared by all variants)."""
    tokens: jax.Array                   # [R, T] int32
    loss_mask: jax.Array                # [R, T] float32
    attn_mask: jax.Array                # [R, T] bool
    trunk: Optional[jax.Array] = None   # [R, T, D] layer ``lora_from``'s input (TrainConfig.trunk_cache)


@flax.struct.dataclass
class Variants:
    """What makes each variant itself: leaves [V, ...] (one variant's slice inside ``train``)."""
    rows: jax.Array                     # [V, M] pool rows of the variant (first n_rows valid)
    n_rows: jax.Array                   # [V]
    variant_id: jax.Array               # [V]
    seed: jax.Array                     # [V]
    lr_scale: jax.Array                 # [V]

    def take(self, idx) -> "Variants":
        return jax.tree.map(lambda x: x[idx], self)


@flax.struct.dataclass
class TrainState:
    """One variant's training state (stacked [V, ...] across variants)."""
    lora: Any                           # adapter {module: {"a", "b"}}
    opt: Any                            # optax state of the adapter
    frozen: jax.Array                   # bool: a non-finite loss or update stopped this variant
    updates: jax.Array                  # int32: optimiser updates applied

    def to_dict(self) -> dict:
        """The checkpoint layout (a plain dict, as older run folders hold)."""
        return {"lora": self.lora, "opt": self.opt, "frozen": self.frozen, "updates": self.updates}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(d["lora"], d["opt"], d["frozen"], d["updates"])


def make_pool(tokens, loss_mask, attn_mask, trunk=None) -> Pool:
    return Pool(np.asarray(tokens, np.int32), np.asarray(loss_mask, np.float32), np.asarray(attn_mask, bool),
                trunk)


def make_variants(rows, n_rows, variant_ids, seeds, lr_scale=None) -> Variants:
    V = len(n_rows)
    return Variants(np.asarray(rows, np.int32), np.asarray(n_rows, np.int32), np.asarray(variant_ids, np.int32),
                    np.asarray(seeds, np.int32), np.asarray(np.ones(V) if lr_scale is None else lr_scale,
                                                             np.float32))


def variant_keys(root: jax.Array, var: Variants) -> jax.Array:
    """Each variant's key ``fold_in(root, seed)`` [V, 2]: the ``key`` argument of ``train``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(root, jnp.asarray(var.seed))


def updates_per_epoch(n_rows, tcfg: TrainConfig):
    return jnp.maximum((n_rows + tcfg.rows_per_update - 1) // tcfg.rows_per_update, 1)


def total_updates(n_rows, tcfg: TrainConfig):
    upe = updates_per_epoch(n_rows, tcfg)
    return jnp.ceil(upe * tcfg.epochs).astype(jnp.int32)


def num_steps(n_rows: np.ndarray, tcfg: TrainConfig) -> int:
    return int(np.max(np.asarray(total_updates(jnp.asarray(n_rows), tcfg))))


def learning_rate(count, total, tcfg: TrainConfig):
    """HF-style schedules: linear warmup from 0, then constant / linear to 0 / cosine to 0 at ``total``."""
    w = tcfg.warmup_steps
    c = count.astype(jnp.float32)
    warm = c / max(w, 1)
    frac = jnp.clip((c - w) / jnp.maximum(total - w, 1), 0.0, 1.0)
    decay = {"constant": jnp.ones_like(frac), "linear": 1.0 - frac,
             "cosine": 0.5 * (1.0 + jnp.cos(jnp.pi * frac))}[tcfg.schedule]
    return tcfg.learning_rate * jnp.where(c < w, warm, decay)


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with learning rate 1; the step multiplies by the scheduled, per-variant learning rate."""
    parts = [optax.clip_by_global_norm(tcfg.clip_norm)] if tcfg.clip_norm > 0 else []
    parts += [optax.scale_by_adam(tcfg.b1, tcfg.b2, tcfg.eps)]
    if tcfg.weight_decay:
        parts.append(optax.add_decayed_weights(tcfg.weight_decay))
    return optax.chain(*parts)


def init_state(key: jax.Array, st: Static) -> TrainState:
    """One variant's fresh adapter (drawn from its seed's key, so variants of one seed start alike) and
    optimiser state."""
    lora = init_lora(jax.random.fold_in(key, 0x7fffffff), st.cfg, st.lcfg, jnp.float32)
    return TrainState(lora, make_optimizer(st.tcfg).init(lora), jnp.array(False), jnp.int32(0))


def batch_rows(key, rows, n_rows, s, tcfg: TrainConfig):
    """Pool row indices [U, B] and validity of a variant's update ``s`` (U = grad_accum micro-batches)."""
    RU = tcfg.rows_per_update
    M = rows.shape[0]
    upe = updates_per_epoch(n_rows, tcfg)
    epoch, j = s // upe, s % upe
    noise = jax.random.uniform(jax.random.fold_in(key, epoch), (M,))
    noise = jnp.where(jnp.arange(M) < n_rows, noise, 2.0)      # invalid slots sort last
    perm = jnp.argsort(noise)
    pos = j * RU + jnp.arange(RU)
    valid = pos < n_rows
    idx = rows[perm[jnp.minimum(pos, M - 1)]]
    U = tcfg.grad_accum
    return idx.reshape(U, tcfg.batch_size), valid.reshape(U, tcfg.batch_size)


def _gather_outer(base: dict, rules: Optional[Rules]) -> dict:
    """The base with its embedding, lm_head and final norm constrained to their gathered specs (the layers are
    gathered one at a time inside the scan, by the decoder)."""
    if rules is None:
        return base
    out = dict(base)
    for name in ("embed", "lm_head", "final_norm"):
        if name in base:
            out[name] = jax.tree_util.tree_map_with_path(
                lambda p, x: constrain(x, param_axes((name,) + tuple(k.key for k in p), x.ndim), rules, True),
                base[name])
    return out


def loss_terms(lora, base, tokens, loss_mask, attn_mask, key, st: Static, trunk=None):
    """(weighted sum of -log p over loss tokens, normaliser) of one micro-batch; ``trunk``: the rows' cached
    states at layer ``lora_from`` (``TrainConfig.trunk_cache``)."""
    cfg, tcfg, lcfg = st.cfg, st.tcfg, st.lcfg
    dt = parse_dtype(tcfg.dtype)
    base = _gather_outer(base, st.rules)
    if st.lora_from > 0:
        # LoRA on the top layers only: the lower layers run once, without LoRA and without a backward pass
        hidden = hidden_lora_from(base, cfg, tokens, attn_mask, lora=lora, lora_from=st.lora_from, dtype=dt,
                                  lora_scale=lcfg.scale, lora_dropout=lcfg.dropout, remat=tcfg.remat,
                                  deterministic=lcfg.dropout == 0, dropout_key=key, trunk=trunk, rules=st.rules)
    else:
        model = Decoder(cfg, dt, lcfg.scale, lcfg.dropout, tcfg.remat, st.rules)
        hidden, _ = model.apply({"params": base}, tokens, attn_mask, lora=lora, deterministic=lcfg.dropout == 0,
                                rngs={"dropout": key})
    h, t, w = hidden[:, :-1], tokens[:, 1:], loss_mask[:, 1:] * attn_mask[:, 1:]
    if tcfg.loss_budget and tcfg.loss_budget < t.shape[1]:
        idx, ok = select_positions(w, tcfg.loss_budget)
        h, t, w = gather_positions(h, idx), gather_positions(t, idx), gather_positions(w, idx) * ok
    lp = token_logprobs(base, cfg, h, t, chunk=tcfg.head_chunk, lora=lora, lora_scale=lcfg.scale)
    nll = -lp * w
    if tcfg.loss_norm == "token":
        return nll.sum(), w.sum()
    per_row = w.sum(-1)
    return (nll.sum(-1) / jnp.maximum(per_row, 1)).sum(), (per_row > 0).sum().astype(jnp.float32)


def make_step(st: Static):
    """``step(state, s, key, base, pool, var) -> (state, metrics)``: update ``s`` of one variant."""
    tcfg = st.tcfg
    tx = make_optimizer(tcfg)

    def step(state: TrainState, s, key, base, pool: Pool, var: Variants):
        key = jax.random.fold_in(key, var.variant_id)
        total = total_updates(var.n_rows, tcfg)
        active = (s < total) & ~state.frozen
        idx, valid = batch_rows(key, var.rows, var.n_rows, s, tcfg)

        def micro(carry, xs):
            g_acc, l_acc, n_acc = carry
            i, ok, u = xs
            toks = constrain(pool.tokens[i], ("act_batch", "act_length"), st.rules)
            lm = constrain(pool.loss_mask[i] * ok[:, None], ("act_batch", "act_length"), st.rules)
            am = constrain(pool.attn_mask[i], ("act_batch", "act_length"), st.rules)
            trunk = None
            if pool.trunk is not None:
                trunk = constrain(pool.trunk[i], ("act_batch", "act_length", "act_embed"), st.rules)
            dkey = jax.random.fold_in(jax.random.fold_in(key, s), u)
            (l, n), g = jax.value_and_grad(loss_terms, has_aux=True)(state.lora, base, toks, lm, am, dkey, st,
                                                                     trunk)
            return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

        zeros = jax.tree.map(jnp.zeros_like, state.lora)
        (g, lsum, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (idx, valid, jnp.arange(tcfg.grad_accum)))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda x: x / denom, g)
        loss = lsum / denom
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        lr = learning_rate(state.updates, total, tcfg) * var.lr_scale
        upd, opt = tx.update(grads, state.opt, state.lora)
        lora = jax.tree.map(lambda p, u: p - lr * u, state.lora, upd)
        finite = finite & jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(lora)]))
        apply = active & finite & (n > 0)
        pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
        new_state = TrainState(pick(lora, state.lora), pick(opt, state.opt), state.frozen | (active & ~finite),
                               state.updates + apply.astype(jnp.int32))
        ntok = jnp.where(active, (pool.attn_mask[idx] & valid[..., None]).sum() * 1.0, 0.0)
        metrics = {"loss": jnp.where(active, loss, jnp.nan), "grad_norm": jnp.where(active, gnorm, jnp.nan),
                   "lr": jnp.where(apply, lr, 0.0), "tokens": ntok, "applied": apply, "frozen": new_state.frozen}
        return new_state, metrics

    return step


def make_segment(st: Static, length: int):
    """``segment(state, s0, key, base, pool, var) -> (state, metrics [length])``: ``length`` updates of one
    variant from global step ``s0`` (a ``lax.scan`` of :func:`make_step`)."""
    step = make_step(st)

    def segment(state, s0, key, base, pool, var):
        return jax.lax.scan(lambda c, s: step(c, s, key, base, pool, var), state, s0 + jnp.arange(length))

    return segment


def make_train(st: Static, steps: int):
    """``train(key, base, pool, var) -> (state, metrics [steps])``: one variant's whole training, from its key
    (:func:`variant_keys`). ``jax.jit(jax.vmap(train, in_axes=(0, None, None, 0)))`` trains a study."""
    segment = make_segment(st, steps)

    def train(key, base, pool: Pool, var: Variants):
        return segment(init_state(key, st), 0, key, base, pool, var)

    return train


def vmap_variants(fn, st: Static, in_axes, out_axes=0):
    """``jax.vmap`` over variants; on a mesh the vmapped axis is the ``variant`` mesh axis (so sharding
    constraints inside get it prepended and no collective crosses variants)."""
    return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes,
                    spmd_axis_name="variant" if st.rules is not None else None)


def abstract_state(st: Static, n_variants: int) -> TrainState:
    """Shapes and dtypes of the stacked state of ``n_variants`` variants (nothing is computed)."""
    keys = jax.ShapeDtypeStruct((n_variants, 2), jnp.uint32)
    return jax.eval_shape(vmap_variants(functools.partial(init_state, st=st), st, 0), keys)


def _state_shardings(st: Static, mesh):
    return state_shardings(mesh, abstract_state(st, dict(st.rules.sizes).get("variant", 1)), st.rules)


def init_program(st: Static, mesh=None):
    """Jitted ``init(keys [V]) -> TrainState [V]`` (placed by :func:`.mesh.state_shardings` on a mesh)."""
    fn = vmap_variants(functools.partial(init_state, st=st), st, 0)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(NamedSharding(mesh, P("variant")),), out_shardings=_state_shardings(st, mesh))


def _per_shard(segment, st: Static):
    """``segment`` over a pool split by variant shard: pool leaves ``[S, R_s, ...]`` (shard ``s``'s own rows),
    per-variant inputs ``[V, ...]`` whose ``rows`` index their own shard's rows, variants ``[s * V/S, (s+1) *
    V/S)`` on shard ``s``. The outer vmap over the ``S`` shards is the ``variant`` mesh axis, the inner one runs
    a shard's variants against its rows; each variant computes exactly what it computes on a shared pool."""
    inner = jax.vmap(segment, in_axes=(0, None, 0, None, None, 0), out_axes=(0, 1))
    outer = jax.vmap(inner, in_axes=(0, None, 0, None, 0, 0), out_axes=(0, 1),
                     spmd_axis_name="variant" if st.rules is not None else None)

    def fn(state, s0, keys, base, pool, var):
        S = pool.tokens.shape[0]
        split = lambda x: x.reshape((S, x.shape[0] // S) + x.shape[1:])
        state, m = outer(jax.tree.map(split, state), s0, split(keys), base, pool, jax.tree.map(split, var))
        return (jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), state),
                jax.tree.map(lambda x: x.reshape((x.shape[0], -1) + x.shape[3:]), m))

    return fn


def segment_program(st: Static, length: int, mesh=None, base=None, pool_shards: bool = False):
    """The jitted study segment ``(state [V], s0, keys [V], base, pool, var [V]) -> (state, metrics [length,
    V])`` that the trainer runs and the planner compiles ahead of time. On a ``mesh`` (with ``st.rules`` and an
    abstract or real ``base`` for its shardings) per-variant inputs and outputs are split over ``variant``, the
    base is stored by the rules (``fsdp`` / ``model``); lower and run it under ``jax.set_mesh(mesh)``. The state
    is donated. The pool is one ``[R, ...]`` table replicated on every device, or with ``pool_shards`` one table
    per variant shard, ``[S, R_s, ...]`` split over ``variant`` (:func:`_per_shard`, :func:`.trainer.pool_layout`):
    a device then holds only the rows of its own variants, and a process of a multi-host job only those of
    its devices."""
    if pool_shards:
        fn = _per_shard(make_segment(st, length), st)
    else:
        fn = vmap_variants(make_segment(st, length), st, (0, None, 0, None, None, 0), (0, 1))
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    v, rep = NamedSharding(mesh, P("variant")), NamedSharding(mesh, P())
    s_state = _state_shardings(st, mesh)
    s_base = base_shardings(mesh, base, st.rules) if base is not None else rep
    return jax.jit(fn, donate_argnums=(0,), in_shardings=(s_state, rep, v, s_base, v if pool_shards else rep, v),
                   out_shardings=(s_state, NamedSharding(mesh, P(None, "variant"))))
