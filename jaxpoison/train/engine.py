"""The study program: many LoRA variants of one frozen base, fine-tuned together.

Everything a variant is — its training rows, its seed, its learning rate — is data, so one pure function
``step(state, s)`` serves them all and ``jax.vmap`` runs them side by side with the base unbatched. A variant's
batch at global step ``s`` is a pure function of (its key, ``s``): epoch ``e = s // updates_per_epoch`` draws a
permutation of the variant's rows from ``fold_in(key, e)``. So an interrupted run resumed at step ``s`` sees
exactly the batches it would have seen, and a variant trained alone sees exactly what it sees in company.

Gradients are taken w.r.t. the adapter only: the base enters as an undifferentiated argument. A variant whose
loss or gradient goes non-finite is frozen (its state stops changing) and flagged; the others go on.
Variants with fewer rows finish earlier and then idle (no update, no optimiser step).

With ``LoraConfig.layers_from`` (first LoRA layer ``k > 0``) the loss runs layers ``[0, k)`` in a scan of their
own without LoRA and without a backward pass, then layers ``[k, L)`` with the adapter (``hidden_lora_from``):
the gradient costs ``L - k`` layer backward passes instead of ``L``. The adapter keeps its ``[L, ...]`` layout;
its rows below ``k`` start at zero and get a zero gradient, so they stay exactly zero.

The host drives fixed-length segments of ``K`` steps (``lax.scan`` inside one jitted call), dispatching the next
segment before reading the previous one's metrics, so it never waits on the device per step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpoison.models.config import ModelConfig
from jaxpoison.models.decoder import Decoder, hidden_lora_from
from jaxpoison.models.heads import gather_positions, select_positions, token_logprobs
from jaxpoison.models.lm import parse_dtype

from .config import TrainConfig
from .lora import LoraConfig, init_lora


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the compiled program depends on besides array shapes."""
    cfg: ModelConfig
    tcfg: TrainConfig
    lcfg: LoraConfig
    data_axis: Optional[str] = None     # mesh axis that splits each variant's batch (set by the trainer)

    def __post_init__(self):
        self.lcfg.first_layer(self.cfg.num_layers)      # LoraConfig.layers_from must fit the model

    @property
    def lora_from(self) -> int:
        """First layer that carries LoRA (``LoraConfig.layers_from`` resolved against the model)."""
        return self.lcfg.first_layer(self.cfg.num_layers)


def make_data(tokens, loss_mask, attn_mask, rows, n_rows, variant_ids, seeds, lr_scale=None) -> dict:
    """The device-side study data: the tokenized pool [R, T] and the per-variant arrays [V, ...]."""
    V = len(n_rows)
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "loss_mask": jnp.asarray(loss_mask, jnp.float32),
        "attn_mask": jnp.asarray(attn_mask, bool),
        "rows": jnp.asarray(rows, jnp.int32),
        "n_rows": jnp.asarray(n_rows, jnp.int32),
        "variant_id": jnp.asarray(variant_ids, jnp.int32),
        "seed": jnp.asarray(seeds, jnp.int32),
        "lr_scale": jnp.asarray(np.ones(V) if lr_scale is None else lr_scale, jnp.float32),
    }


POOL_KEYS = ("tokens", "loss_mask", "attn_mask", "trunk")     # "trunk" only with TrainConfig.trunk_cache


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


def variant_key(root: jax.Array, seed, variant_id) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(root, seed), variant_id)


def init_state(root: jax.Array, data: dict, st: Static) -> dict:
    """Per-variant adapters (drawn from the variant's seed, so variants of one seed start alike) + optimiser."""
    tx = make_optimizer(st.tcfg)

    def one(seed):
        lora = init_lora(jax.random.fold_in(jax.random.fold_in(root, seed), 0x7fffffff), st.cfg, st.lcfg, jnp.float32)
        return {"lora": lora, "opt": tx.init(lora), "frozen": jnp.array(False), "updates": jnp.int32(0)}

    return jax.vmap(one)(data["seed"])


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


def loss_terms(lora, base, tokens, loss_mask, attn_mask, key, st: Static, trunk=None):
    """(weighted sum of -log p over loss tokens, normaliser) of one micro-batch; ``trunk``: the rows' cached
    states at layer ``lora_from`` (``TrainConfig.trunk_cache``)."""
    cfg, tcfg, lcfg = st.cfg, st.tcfg, st.lcfg
    dt = parse_dtype(tcfg.dtype)
    if st.lora_from > 0:
        # LoRA on the top layers only: the lower layers run once, without LoRA and without a backward pass
        hidden = hidden_lora_from(base, cfg, tokens, attn_mask, lora=lora, lora_from=st.lora_from, dtype=dt,
                                  lora_scale=lcfg.scale, lora_dropout=lcfg.dropout, remat=tcfg.remat,
                                  deterministic=lcfg.dropout == 0, dropout_key=key, trunk=trunk)
    else:
        model = Decoder(cfg, dt, lcfg.scale, lcfg.dropout, tcfg.remat)
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


def variant_step(state, s, base, pool, var, root, st: Static):
    """One optimiser update of one variant (vmapped over variants by the caller)."""
    tcfg = st.tcfg
    key = variant_key(root, var["seed"], var["variant_id"])
    total = total_updates(var["n_rows"], tcfg)
    active = (s < total) & ~state["frozen"]
    idx, valid = batch_rows(key, var["rows"], var["n_rows"], s, tcfg)

    def micro(carry, xs):
        g_acc, l_acc, n_acc = carry
        i, ok, u = xs
        toks = pool["tokens"][i]
        lm = pool["loss_mask"][i] * ok[:, None]
        am = pool["attn_mask"][i]
        if st.data_axis:
            toks, lm, am = (jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(st.data_axis))
                            for x in (toks, lm, am))
        dkey = jax.random.fold_in(jax.random.fold_in(key, s), u)
        trunk = pool["trunk"][i] if "trunk" in pool else None
        (l, n), g = jax.value_and_grad(loss_terms, has_aux=True)(state["lora"], base, toks, lm, am, dkey, st, trunk)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), None

    zeros = jax.tree.map(jnp.zeros_like, state["lora"])
    U = tcfg.grad_accum
    (g, lsum, n), _ = jax.lax.scan(micro, (zeros, 0.0, 0.0), (idx, valid, jnp.arange(U)))
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda x: x / denom, g)
    loss = lsum / denom
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    lr = learning_rate(state["updates"], total, tcfg) * var["lr_scale"]
    upd, opt = make_optimizer(tcfg).update(grads, state["opt"], state["lora"])
    lora = jax.tree.map(lambda p, u: p - lr * u, state["lora"], upd)
    finite = finite & jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(lora)]))
    apply = active & finite & (n > 0)
    pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    new_state = {
        "lora": pick(lora, state["lora"]),
        "opt": pick(opt, state["opt"]),
        "frozen": state["frozen"] | (active & ~finite),
        "updates": state["updates"] + apply.astype(jnp.int32),
    }
    ntok = jnp.where(active, (pool["attn_mask"][idx] & valid[..., None]).sum() * 1.0, 0.0)
    metrics = {"loss": jnp.where(active, loss, jnp.nan), "grad_norm": jnp.where(active, gnorm, jnp.nan),
               "lr": jnp.where(apply, lr, 0.0), "tokens": ntok, "applied": apply, "frozen": new_state["frozen"]}
    return new_state, metrics


def _segment(state, s0, base, data, root, *, st: Static, length: int, spmd_axis: Optional[str]):
    """``length`` steps from global step ``s0`` for all variants. Returns (state, metrics [length, V])."""
    pool = {k: data[k] for k in POOL_KEYS if k in data}
    var = {k: v for k, v in data.items() if k not in POOL_KEYS}
    step_v = jax.vmap(functools.partial(variant_step, st=st), in_axes=(0, None, None, None, 0, None),
                      spmd_axis_name=spmd_axis)

    def run(state, var):
        def body(state, s):
            return step_v(state, s, base, pool, var, root)
        return jax.lax.scan(body, state, s0 + jnp.arange(length))

    chunk = st.tcfg.variant_chunk
    V = data["n_rows"].shape[0]
    if not chunk or chunk >= V:
        return run(state, var)
    if V % chunk:
        raise ValueError(f"variant_chunk={chunk} must divide the number of variants {V}")
    split = lambda x: x.reshape((V // chunk, chunk) + x.shape[1:])
    state_c, var_c = jax.tree.map(split, state), jax.tree.map(split, var)
    state_c, metrics = jax.lax.map(lambda a: run(*a), (state_c, var_c))
    merge = lambda x: x.reshape((V,) + x.shape[2:])
    metrics = jax.tree.map(lambda m: jnp.moveaxis(m, 0, 1).reshape(m.shape[1], V), metrics)
    return jax.tree.map(merge, state_c), metrics


def compile_segment(st: Static, length: int, mesh=None, spmd_axis: Optional[str] = None,
                    shardings: Optional[Any] = None):
    """The jitted segment function; ``shardings`` = (state, base, data) shardings when a mesh is used."""
    fn = functools.partial(_segment, st=st, length=length, spmd_axis=spmd_axis)
    if shardings is None:
        return jax.jit(fn, donate_argnums=(0,))
    s_state, s_base, s_data = shardings
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(fn, donate_argnums=(0,), in_shardings=(s_state, rep, s_base, s_data, rep),
                   out_shardings=(s_state, jax.sharding.NamedSharding(
                       mesh, jax.sharding.PartitionSpec(None, spmd_axis))))
