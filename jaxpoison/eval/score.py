"""Option scoring: log p(option text | prompt) for every variant, question and option in one jitted program.

A multiple-choice question is answered by the option whose *text* the model finds most likely after the
question (letters hide what a small model knows: see the reference notes). Every variant of a study is scored
at once: the stacked adapters ``{module: {"a": [V, L, in, r], ...}}`` are vmapped with the base unbatched
(``in_axes=(0, None, ...)``), so one compiled program serves the whole study, and ``lora=None`` scores the base
model alone (zero-shot) through the same code.

Shapes are fixed: questions go in batches of ``batch_questions`` (the last batch padded with copies), the
sequence is cut to the longest real row of the data, and the lm_head runs only where a score needs it.

Two equivalent paths (the tests check both against :func:`jaxpoison.models.lm.sequence_logprobs`):

* ``shared_prefix`` (default when the data allow it): the C options of a question share their prefix, so the
  prefix runs once into a KV cache and only the C continuations run after it. The head sees the continuation
  positions only. With a 30-token statement and 8-token options this is about half the work; for a long
  question prompt (the ``mcq`` format) about a third.
* ``plain``: every (question, option) row runs in full; the head runs on the first ``budget`` continuation
  positions per row (:func:`jaxpoison.models.heads.select_positions`), the budget read from the data.

Over a mesh (``mesh=``, a :class:`jax.sharding.Mesh` with a ``variant`` axis of n > 1 devices): each chunk of
adapters is padded to a multiple of n (the pad rows' scores are dropped) and placed split over ``variant``, the
batches replicated, the base as it lies; XLA partitions the vmapped variant axis, so each device scores its own
variants (the shared trunk and the base row, one pass each against a chunk's, run replicated on every device).

Calibration: the same continuations after a neutral prefix (``McEval.uncond_*``) give each option's prior;
``calibrated = sum - uncond`` removes a model's (or an adapter's) preference for an option text regardless of
the question. Neutral rows repeat across questions (the ICD-10-CM options are 14 chapter names), so only the
distinct rows are scored.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxpoison.models.config import ModelConfig
from jaxpoison.models.decoder import Decoder, final_norm, init_cache, layer_inputs, lower_layers, run_layers
from jaxpoison.models.heads import (gather_positions, masked_logprob_sums, packed_budget, select_positions,
                                    token_logprobs)

METHODS = ("sum", "mean", "calibrated")


@dataclasses.dataclass
class OptionScores:
    """Scores of V variants (V = 1 for the base alone) on Q questions with C options."""
    sum: np.ndarray                       # float32[V, Q, C]: summed log p of the option's continuation tokens
    n_tokens: np.ndarray                  # int32[Q, C]: continuation tokens scored
    uncond: Optional[np.ndarray] = None   # float32[V, Q, C]: the same continuation after the neutral prefix

    @property
    def mean(self) -> np.ndarray:
        return self.sum / np.maximum(self.n_tokens, 1)

    @property
    def calibrated(self) -> np.ndarray:
        if self.uncond is None:
            raise ValueError("no unconditional scores: score with calibrate=True to use method='calibrated'")
        return self.sum - self.uncond

    def method(self, how: str) -> np.ndarray:
        if how not in METHODS:
            raise ValueError(f"unknown scoring method {how!r}: use one of {', '.join(METHODS)}")
        return getattr(self, how)

    def take(self, q_index) -> "OptionScores":
        """The scores of a subset of questions."""
        q = np.asarray(q_index)
        return OptionScores(self.sum[:, q], self.n_tokens[q], None if self.uncond is None else self.uncond[:, q])


def choice_metrics(scores: np.ndarray, answer: np.ndarray, decoy: Optional[np.ndarray] = None) -> dict:
    """Picks and rates from scores [V, Q, C]: ``pick`` [V, Q], ``correct`` [V, Q] (bool), ``accuracy`` [V],
    ``decoy_rate`` [V] (share of questions with a decoy whose pick is the decoy; NaN where none has one).
    Ties go to the first option."""
    scores = np.asarray(scores)
    pick = np.argmax(scores, axis=-1)
    correct = pick == np.asarray(answer)[None]
    out = {"pick": pick, "correct": correct, "accuracy": correct.mean(-1) if correct.shape[-1] else
           np.full(correct.shape[0], np.nan)}
    if decoy is not None:
        d = np.asarray(decoy)
        has = d >= 0
        out["decoy_rate"] = ((pick == d[None]) & has[None]).sum(-1) / has.sum() if has.any() else \
            np.full(scores.shape[0], np.nan)
    return out


# ---- the jitted programs -------------------------------------------------------------------------------------
def _over_variants(fn, lora, *args, base_row: bool = False):
    """``fn`` per variant -> [V, ...]; ``base_row``: the base (adapter term off) first -> [1 + V, ...], on the
    same ``args`` (the shared trunk runs once for the base and the chunk)."""
    if lora is None:
        return fn(None, *args)[None]
    out = jax.vmap(fn, in_axes=(0,) + (None,) * len(args))(lora, *args)
    return jnp.concatenate([fn(None, *args)[None], out]) if base_row else out


def shared_layers(lora, num_layers: int, variants=None) -> int:
    """How many bottom layers no adapter touches: layer ``i`` counts when, for every variant and module, the
    adapter's A or B rows of that layer are all zero (its update ``x @ A @ B`` is then exactly 0). Adapters
    trained with ``lora.layers_from = k`` have exactly zero rows below ``k``, and so have their shrunk copies, so
    the scorer runs those layers once for all variants. Capped at ``num_layers - 1``. ``variants``: only these
    rows of the stack count."""
    if lora is None:
        return 0
    free = np.ones((num_layers,), bool)
    for m, ab in lora.items():
        if m == "lm_head":
            continue
        # host adapters are reduced on the host, device ones where they lie (only [V, L] booleans move)
        xp = lambda x: np if isinstance(x, np.ndarray) else jnp
        zero = [np.asarray(xp(ab[n]).all(ab[n] == 0, axis=tuple(range(2, ab[n].ndim)))) for n in ("a", "b")]
        either = zero[0] | zero[1]                                                              # [V, L]
        free = free & np.all(either if variants is None else either[np.asarray(variants, np.int64)], axis=0)
    k = num_layers if free.all() else int(np.argmin(free))
    return min(k, num_layers - 1)


def _hidden(lora, base, trunk, k, cos, sin, mask, cfg, dtype, lora_scale, cache=None, slot=0):
    """Final-norm hidden states from the shared trunk (layer k's input) through the adapter's layers k..L."""
    x, cache = run_layers(base, cfg, trunk, k, cfg.num_layers, cos, sin, mask, lora=lora, cache=cache, slot=slot,
                          dtype=dtype, lora_scale=lora_scale)
    return final_norm(base, cfg, x, dtype), cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "lora_scale", "budget", "chunk", "shared", "base_row"))
def score_rows(lora, base, tokens, cont_mask, attn_mask, *, cfg: ModelConfig, dtype=jnp.float32,
               lora_scale: float = 1.0, budget: int = 0, chunk: int = 128, shared: int = 0, base_row: bool = False):
    """Summed log p of the ``cont_mask`` tokens of each row [B, T] -> [V, B] (V = 1 when ``lora`` is None).

    The head runs on the first ``budget`` continuation positions of each row (all positions when 0). With
    ``shared = k > 0`` layers ``[0, k)`` run once for all variants (see :func:`shared_layers`). ``base_row``:
    row 0 of the result is the base (adapter term off), on the same trunk -> [1 + V, B].
    """
    def tail(lora, hidden):
        h, t, w = hidden[:, :-1], tokens[:, 1:], (cont_mask[:, 1:] > 0) & attn_mask[:, 1:]
        if budget and budget < t.shape[1]:
            idx, ok = select_positions(w, budget)
            h, t, w = gather_positions(h, idx), gather_positions(t, idx), gather_positions(w, idx) & ok
        lp = token_logprobs(base, cfg, h, t, chunk=chunk, lora=lora, lora_scale=lora_scale)
        return jnp.where(w, lp, 0.0).sum(-1)

    if shared:
        cos, sin, mask = layer_inputs(cfg, tokens, attn_mask)
        trunk, _ = lower_layers(base, cfg, tokens, shared, cos, sin, mask, dtype=dtype)
        return _over_variants(lambda l, x: tail(l, _hidden(l, base, x, shared, cos, sin, mask, cfg, dtype,
                                                           lora_scale)[0]), lora, trunk, base_row=base_row)

    def one(lora):
        hidden, _ = Decoder(cfg, dtype, lora_scale).apply({"params": base}, tokens, attn_mask, lora=lora)
        return tail(lora, hidden)

    return _over_variants(one, lora, base_row=base_row)


@functools.partial(jax.jit, static_argnames=("cfg", "dtype", "lora_scale", "chunk", "shared", "base_row", "budget"))
def score_shared_prefix(lora, base, prefix, prefix_mask, cont, cont_mask, *, cfg: ModelConfig, dtype=jnp.float32,
                        lora_scale: float = 1.0, chunk: int = 128, shared: int = 0, base_row: bool = False,
                        budget: int = 0):
    """Summed log p of each option's continuation after its question's prefix -> [V, B, C].

    prefix/prefix_mask [B, P] (right-padded, at least one real token); cont/cont_mask [B, C, N] (right-padded).
    The prefix runs once into a KV cache; the C continuations of each question attend to it. With ``shared =
    k > 0`` layers ``[0, k)`` (prefix, cache and continuations) run once for all variants. ``base_row``: row 0
    is the base (adapter term off), on the same trunk -> [1 + V, B, C]. ``budget`` > 0: the head runs only on
    the real continuation tokens, packed into that many slots (:func:`jaxpoison.models.heads.packed_budget` of
    the batches' token counts); 0: on every padded slot.
    """
    B, P = prefix.shape
    C, N = cont.shape[1], cont.shape[2]
    L = cfg.num_layers
    pm = prefix_mask.astype(bool)
    kv = jnp.concatenate([pm, jnp.zeros((B, N), bool)], axis=1)
    pos = jnp.maximum(jnp.cumsum(pm, -1) - 1, 0)
    n_pre = pm.sum(-1)
    rep = lambda x: jnp.repeat(x, C, axis=0)
    rep_cache = lambda c: jax.tree.map(lambda x: jnp.repeat(x, C, axis=1), c)
    cm = cont_mask.reshape(B * C, N).astype(bool)
    ct = cont.reshape(B * C, N)
    kv_c = jnp.concatenate([rep(pm), cm], axis=1)
    pos_c = rep(n_pre)[:, None] + jnp.arange(N)[None]

    def tail(lora, h_pre, h_cont):
        h_last = jnp.take_along_axis(h_pre, (n_pre - 1)[:, None, None], axis=1)      # [B, 1, D]
        h = jnp.concatenate([rep(h_last), h_cont[:, :-1]], axis=1)                  # h[:, j] predicts ct[:, j]
        if budget:
            return masked_logprob_sums(base, cfg, h, ct, cm, budget, chunk=chunk, lora=lora,
                                       lora_scale=lora_scale).reshape(B, C)
        lp = token_logprobs(base, cfg, h, ct, chunk=chunk, lora=lora, lora_scale=lora_scale)
        return jnp.where(cm, lp, 0.0).sum(-1).reshape(B, C)

    if shared:
        k = shared
        cache = init_cache(cfg, B, P + N, dtype, layers=k)
        in_pre = layer_inputs(cfg, prefix, pm, pos, cache, 0, kv)
        in_cont = layer_inputs(cfg, ct, cm, pos_c, rep_cache(cache), P, kv_c)
        x_pre, cache = lower_layers(base, cfg, prefix, k, *in_pre, cache=cache, slot=0, dtype=dtype)
        x_cont, _ = lower_layers(base, cfg, ct, k, *in_cont, cache=rep_cache(cache), slot=P, dtype=dtype)

        def top(lora, x_pre, x_cont):
            top_cache = init_cache(cfg, B, P + N, dtype, layers=L - k)
            h_pre, top_cache = _hidden(lora, base, x_pre, k, *in_pre, cfg, dtype, lora_scale, top_cache, 0)
            h_cont, _ = _hidden(lora, base, x_cont, k, *in_cont, cfg, dtype, lora_scale, rep_cache(top_cache), P)
            return tail(lora, h_pre, h_cont)

        return _over_variants(top, lora, x_pre, x_cont, base_row=base_row)

    def one(lora):
        model = Decoder(cfg, dtype, lora_scale)
        h_pre, cache = model.apply({"params": base}, prefix, pm, pos, lora, init_cache(cfg, B, P + N, dtype), 0, kv)
        h_cont, _ = model.apply({"params": base}, ct, cm, pos_c, lora, rep_cache(cache), P, kv_c)
        return tail(lora, h_pre, h_cont)

    return _over_variants(one, lora, base_row=base_row)


# ---- host side -------------------------------------------------------------------------------------------------
def _round_up(n: int, step: int = 8) -> int:
    return max(step, -(-n // step) * step)


def _trim(tokens, cont, attn):
    """Cut the right padding shared by every row (rows are right-padded), to a multiple of 8."""
    T = _round_up(int(attn.reshape(-1, attn.shape[-1]).sum(-1).max()))
    return tokens[..., :T], cont[..., :T], attn[..., :T]


def split_shared_prefix(tokens, cont_mask, attn_mask) -> Optional[tuple]:
    """(prefix [Q, P], prefix_mask, cont [Q, C, N], cont_mask [Q, C, N]) when every option of a question has
    the same prefix tokens and its continuation runs to the end of the row; else None (use the plain path)."""
    Q, C, T = tokens.shape
    cm, am = cont_mask > 0, attn_mask.astype(bool)
    start = np.argmax(cm, axis=-1)
    n_cont = cm.sum(-1)
    lens = am.sum(-1)
    if (n_cont == 0).any() or (start == 0).any() or (start != start[:, :1]).any() or (start + n_cont != lens).any():
        return None
    s = start[:, 0]
    pos = np.arange(T)
    pre = pos[None, :] < s[:, None]
    if not all((tokens[:, c][pre] == tokens[:, 0][pre]).all() for c in range(1, C)):
        return None
    P, N = int(s.max()), int(n_cont.max())          # exact: every padded slot costs a full forward position
    prefix = np.zeros((Q, P), np.int32)
    pmask = np.zeros((Q, P), bool)
    cont = np.zeros((Q, C, N), np.int32)
    cmask = np.zeros((Q, C, N), bool)
    for q in range(Q):
        prefix[q, :s[q]] = tokens[q, 0, :s[q]]
        pmask[q, :s[q]] = True
        for c in range(C):
            cont[q, c, :n_cont[q, c]] = tokens[q, c, s[q]:lens[q, c]]
            cmask[q, c, :n_cont[q, c]] = True
    return prefix, pmask, cont, cmask


def _jobs(passes: list, n: int, size: int, progress, desc: str):
    """(pass index, batch start) pairs, passes outer: each adapter chunk goes to the devices once and serves every
    batch of rows before the next one is taken."""
    jobs = [(p, b0) for p in range(len(passes)) for b0 in range(0, n, size)]
    if progress:
        from tqdm.auto import tqdm
        jobs = tqdm(jobs, desc=desc, unit="batch", leave=False)
    return jobs


def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    """Pad axis 0 to length n with copies of the first row (fixed shapes; the copies are dropped)."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.repeat(x[:1], n - x.shape[0], axis=0)], axis=0)


def _passes(lora, variant_chunk: int, with_base: bool, variants=None, multiple: int = 1) -> list:
    """What one scoring pass each sees, in the order of the result's rows: the variant indices of the stacked
    adapters (``variants``, default all in order), ``variant_chunk`` models per call (the last ones rounded up to
    a multiple of ``multiple``: the devices of a ``variant`` mesh axis). With ``with_base`` the base (the
    adapter term switched off) takes one adapter's place in the first call (``base_row``: on the shared trunk
    of that call, no extra program, and no call holds more than ``variant_chunk`` models), or has a call of its
    own (``None``) when that leaves no room. Indices, not arrays: :func:`_chunk` takes one chunk out of the
    caller's arrays (sharded device arrays, pinned host or numpy ones) when its pass comes, so no copy of every
    adapter (and no zero adapter in front of them) is ever built."""
    if lora is None:
        return [None]
    sel = np.arange(int(jax.tree.leaves(lora)[0].shape[0])) if variants is None else \
        np.asarray(variants, np.int64).reshape(-1)
    if not len(sel):
        return [None] if with_base else []
    cap = variant_chunk if variant_chunk > 0 else len(sel) + int(with_base)      # models per call
    head = []
    if with_base:           # the base takes one adapter's place in the first call, which is never bigger
        first = (cap - 1) // multiple * multiple
        head = [sel[:first]] if first > 0 else [None]
        sel = sel[max(first, 0):]
    step = -(-max(min(cap, len(sel)), 1) // multiple) * multiple
    return head + [sel[v0:v0 + step] for v0 in range(0, len(sel), step)]


def _chunk(lora, idx):
    """The adapters of one pass: None for the base, the whole stack as it is, a slice of it (contiguous
    indices), or the gathered rows."""
    if idx is None:
        return None
    V = int(jax.tree.leaves(lora)[0].shape[0])
    if len(idx) == V and (idx == np.arange(V)).all():
        return lora
    if (np.diff(idx) == 1).all():
        return jax.tree.map(lambda x: x[int(idx[0]):int(idx[-1]) + 1], lora)
    from jaxpoison.eval.generate_variants import take_variants
    return take_variants(lora, idx)


def variant_devices(mesh) -> int:
    """The size of ``mesh``'s ``variant`` axis (1 without a mesh)."""
    if mesh is None:
        return 1
    if "variant" not in mesh.shape:
        raise ValueError(f"the scoring mesh has no 'variant' axis (its axes: {', '.join(mesh.axis_names)}): build "
                         "it with jaxpoison.train.mesh.make_mesh, or pass mesh=None")
    return int(mesh.shape["variant"])


def params_mesh(tree) -> Optional[jax.sharding.Mesh]:
    """The mesh every array of ``tree`` lies on (a study's base, loaded into its mesh), or None when they do not
    all lie on one mesh (host arrays, a single device)."""
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(tree)]
    if not shardings or not all(isinstance(s, NamedSharding) for s in shardings):
        return None
    mesh = shardings[0].mesh
    return mesh if all(s.mesh == mesh for s in shardings) else None


def _on_mesh(tree, mesh):
    """``tree`` with each leaf that does not already lie on ``mesh``'s devices (in its order) replicated there."""
    devices = tuple(mesh.devices.flat)
    rep = NamedSharding(mesh, PartitionSpec())

    def one(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and tuple(s.mesh.devices.flat) == devices:
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(one, tree)


def _place_chunk(lora, idx, mesh):
    """The adapters of one pass on ``mesh``: rows ``idx`` padded to a multiple of the ``variant`` axis with copies
    of the first (their scores are dropped), every leaf split over ``variant`` (and over ``model`` the way the
    trainer stores adapters: :func:`jaxpoison.train.mesh.state_shardings`). Host arrays put only each device's
    rows on it; device arrays are sliced (or gathered) where they lie and moved."""
    if idx is None:
        return None
    from jaxpoison.train.mesh import state_shardings
    n = variant_devices(mesh)
    full = np.concatenate([idx, np.repeat(idx[:1], -len(idx) % n)]).astype(np.int64)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(full),) + tuple(x.shape[1:]), x.dtype), lora)
    V = int(jax.tree.leaves(lora)[0].shape[0])
    whole = len(full) == V and (full == np.arange(V)).all()
    run = bool((np.diff(full) == 1).all())

    def one(x, sharding):
        if isinstance(x, jax.Array):
            rows = x if whole else x[int(full[0]):int(full[-1]) + 1] if run else x[jnp.asarray(full, jnp.int32)]
            return jax.device_put(rows, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback((len(full),) + host.shape[1:], sharding,
                                            lambda index: host[full[index[0]]][(slice(None),) + tuple(index[1:])])

    return jax.tree.map(one, lora, state_shardings(mesh, shapes))


def _batch_arrays(arrays, mesh) -> list:
    """One batch's host arrays on the devices: replicated over ``mesh`` when given."""
    if mesh is None:
        return [jnp.asarray(x) for x in arrays]
    rep = NamedSharding(mesh, PartitionSpec())
    return [jax.device_put(x, rep) for x in arrays]


def _run_passes(program, lora, batches: list, n_rows: int, *, variant_chunk, with_base, progress, desc, shared,
                variants=None, mesh=None, **kw) -> np.ndarray:
    """``program(lora_chunk, base, *batch_args, shared=..., base_row=...)`` over every (pass, batch) -> [rows of
    all passes, n_rows]. With ``with_base`` the first pass's program puts the base in front of its chunk
    (``base_row``), on the trunk it runs once for both. ``mesh`` (a ``variant`` axis of n > 1 devices): each
    chunk is split over it, padded to a multiple of n; the pad rows are dropped here."""
    n_dev = variant_devices(mesh)
    passes = _passes(lora, variant_chunk, with_base, variants, n_dev)
    out = [[] for _ in passes]
    current = (None, None)
    for p, b0 in _jobs(passes, n_rows, batches[0][1] if batches else 1, progress, desc):
        if current[0] != p:                                 # one chunk at a time on the devices
            current = (p, _place_chunk(lora, passes[p], mesh) if n_dev > 1 else _chunk(lora, passes[p]))
        args, size = batches[b0 // batches[0][1]]
        n = min(size, n_rows - b0)
        base_row = bool(with_base and p == 0 and passes[p] is not None)
        got = program(current[1], *args, shared=0 if passes[p] is None else shared, base_row=base_row, **kw)
        keep = 1 if passes[p] is None else int(base_row) + len(passes[p])
        out[p].append(np.asarray(got)[:keep, :n])
    return np.concatenate([np.concatenate(o, axis=1) for o in out], axis=0)


def _score_plain(base, cfg, tokens, cont, attn, lora, *, rows_per_batch, dtype, lora_scale, chunk, variant_chunk,
                 progress, desc, shared=0, with_base=False, variants=None, mesh=None):
    """[N, T] rows -> [V, N] summed continuation log-probs ([1 + V, N] with the base first when ``with_base``)."""
    tokens, cont, attn = _trim(tokens, cont, attn)
    budget = int(np.max((cont[:, 1:] > 0).sum(-1)))
    N = tokens.shape[0]
    batches = [(_batch_arrays([_pad_to(x[b0:b0 + rows_per_batch], rows_per_batch) for x in (tokens, cont, attn)],
                              mesh), rows_per_batch) for b0 in range(0, N, rows_per_batch)]
    program = lambda l, *a, shared, base_row: score_rows(l, base, *a, cfg=cfg, dtype=dtype, lora_scale=lora_scale,
                                                         budget=budget, chunk=chunk, shared=shared,
                                                         base_row=base_row)
    return _run_passes(program, lora, batches, N, variant_chunk=variant_chunk, with_base=with_base,
                       progress=progress, desc=desc, shared=shared, variants=variants, mesh=mesh)


def _score_prefix(base, cfg, split, lora, *, batch_questions, dtype, lora_scale, chunk, variant_chunk, progress,
                  desc, shared=0, with_base=False, variants=None, mesh=None):
    prefix, pmask, cont, cmask = split
    Q = prefix.shape[0]
    batches = [(_batch_arrays([_pad_to(x[b0:b0 + batch_questions], batch_questions)
                               for x in (prefix, pmask, cont, cmask)], mesh),
                batch_questions) for b0 in range(0, Q, batch_questions)]
    # the head on the real continuation tokens only: one static slot count for every batch (one program)
    budget = packed_budget([cmask[b0:b0 + batch_questions].sum() for b0 in range(0, Q, batch_questions)],
                           batch_questions * cmask.shape[1] * cmask.shape[2])
    program = lambda l, *a, shared, base_row: score_shared_prefix(l, base, *a, cfg=cfg, dtype=dtype,
                                                                  lora_scale=lora_scale, chunk=chunk, shared=shared,
                                                                  base_row=base_row, budget=budget)
    return _run_passes(program, lora, batches, Q, variant_chunk=variant_chunk, with_base=with_base,
                       progress=progress, desc=desc, shared=shared, variants=variants, mesh=mesh)


def score_options(base, cfg: ModelConfig, mc, lora=None, *, lora_scale: float = 1.0, dtype=jnp.float32,
                  batch_questions: int = 8, calibrate: bool = True, path: str = "auto", variant_chunk: int = 0,
                  chunk: int = 128, progress: bool = False, desc: str = "score",
                  share_trunk: bool = True, with_base: bool = False, variants=None,
                  over_processes: bool = False, mesh=None) -> OptionScores:
    """Score every option of every question of ``mc`` (a :class:`jaxpoison.data.pool.McEval`) for every variant.

    ``lora``: stacked adapters with a leading variant axis, or None for the base alone (V = 1). They are read
    where they lie (device arrays, sharded or not, or host arrays), one ``variant_chunk`` slice at a time.
    ``with_base``: the result has 1 + V rows, row 0 the base (zero-shot) scored once with the adapter term
    switched off (inside the first chunk's program, on the trunk it shares with that chunk), rows 1.. the
    adapters: a study's base and variants without a zero adapter stacked in front (which would copy every adapter).
    ``variants``: score only these rows of the stack, in this order (each chunk gathered when its turn comes).
    ``path``: 'auto' (shared prefix when the data allow), 'shared_prefix' or 'plain'.
    ``variant_chunk``: score at most this many variants per call (memory); 0 = all at once. With a mesh it is
    rounded up to a multiple of the mesh's ``variant`` axis.
    ``share_trunk``: run the bottom layers no adapter touches (:func:`shared_layers`; adapters trained with
    ``lora.layers_from``) once for all variants instead of once per variant. Same scores; off = the plain way.
    ``over_processes``: in a multi-host job (all processes call together, each with the whole stack on the host
    and the base on its own devices), each process scores one contiguous block of the variants (the block its
    devices trained on a ``variant`` mesh axis; process 0 also the base) and every process gets the whole result
    (:func:`gather_blocks`); one process: the plain call.
    ``mesh``: a :class:`jax.sharding.Mesh` with a ``variant`` axis (:func:`jaxpoison.train.mesh.make_mesh`; the
    one a study's base lies on: :func:`params_mesh`). When that axis has n > 1 devices, each chunk is padded to a
    multiple of n and split over it, the batches replicated, the base used as it lies (replicated onto the mesh
    only if it lies elsewhere): each device scores its own variants. Same rows in the same order as without.
    Not used by the multi-process path (each process scores its block on its own devices).
    """
    if over_processes and jax.process_count() > 1:
        return _score_over_processes(base, cfg, mc, lora, lora_scale=lora_scale, dtype=dtype,
                                     batch_questions=batch_questions, calibrate=calibrate, path=path,
                                     variant_chunk=variant_chunk, chunk=chunk, progress=progress, desc=desc,
                                     share_trunk=share_trunk, with_base=with_base, variants=variants)
    if path not in ("auto", "shared_prefix", "plain"):
        raise ValueError(f"unknown scoring path {path!r}: use 'auto', 'shared_prefix' or 'plain'")
    if batch_questions < 1:
        raise ValueError(f"batch_questions must be >= 1, got {batch_questions}")
    if variant_devices(mesh) > 1:
        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            raise ValueError("the scoring mesh spans several processes: pass over_processes=True (each process "
                             "scores its block of the variants on its own devices) or a mesh of this process's "
                             "devices")
        base = _on_mesh(base, mesh)
    else:
        mesh = None                 # no variant axis to split: the one-device path, as the arrays lie
    Q, C, T = mc.tokens.shape
    kw = dict(dtype=dtype, lora_scale=lora_scale, chunk=chunk, variant_chunk=variant_chunk, progress=progress,
              shared=shared_layers(lora, cfg.num_layers, variants) if share_trunk else 0, with_base=with_base,
              variants=variants, mesh=mesh)
    split = None if path == "plain" else split_shared_prefix(mc.tokens, mc.cont_mask, mc.attn_mask)
    if path == "shared_prefix" and split is None:
        raise ValueError("the options of some question do not share a prefix (or a continuation does not end its "
                         "row): use path='plain'")
    if split is not None:
        s = _score_prefix(base, cfg, split, lora, batch_questions=batch_questions, desc=desc, **kw)
    else:
        flat = [x.reshape(Q * C, -1) for x in (mc.tokens, mc.cont_mask, mc.attn_mask)]
        s = _score_plain(base, cfg, *flat, lora, rows_per_batch=batch_questions * C, desc=desc, **kw).reshape(-1, Q, C)
    n_tok = (mc.cont_mask[..., 1:] > 0).sum(-1).astype(np.int32)
    uncond = None
    if calibrate:
        uncond = score_unique_rows(base, cfg, mc.uncond_tokens, mc.uncond_cont_mask, mc.uncond_attn_mask, lora,
                                   rows_per_batch=batch_questions * C, desc=desc + " (prior)", **kw)
    return OptionScores(s.astype(np.float32), n_tok, uncond)


def process_block(n: int, index: Optional[int] = None, count: Optional[int] = None) -> np.ndarray:
    """Positions ``[i * n / P, (i + 1) * n / P)`` of ``n`` items that process ``i`` of ``P`` takes (contiguous, in
    order, the first ``n % P`` processes one more): on a ``variant`` mesh axis over all devices, the variants its
    own devices held."""
    i = jax.process_index() if index is None else index
    P = jax.process_count() if count is None else count
    lo, hi = (i * n) // P, ((i + 1) * n) // P
    return np.arange(lo, hi)


def gather_blocks(block: np.ndarray, n: int) -> np.ndarray:
    """Every process's ``block`` [n_i, ...] (``n_i`` = len(process_block(n))), concatenated in process order on
    every process -> [n, ...] (all processes call together)."""
    from jax.experimental import multihost_utils
    P = jax.process_count()
    width = max(len(process_block(n, i, P)) for i in range(P))
    padded = np.zeros((width,) + block.shape[1:], block.dtype)
    padded[:len(block)] = block
    every = np.asarray(multihost_utils.process_allgather(padded, tiled=False))     # [P, width, ...]
    return np.concatenate([every[i, :len(process_block(n, i, P))] for i in range(P)], axis=0)


def _score_over_processes(base, cfg, mc, lora, *, with_base, variants, progress, desc, **kw) -> OptionScores:
    sel = None if lora is None else (np.arange(int(jax.tree.leaves(lora)[0].shape[0])) if variants is None
                                     else np.asarray(variants, np.int64).reshape(-1))
    rows = (1 if with_base or lora is None else 0) + (0 if sel is None else len(sel))
    mine = process_block(rows)          # this process's rows of the result: row 0 the base (when scored)
    first = 1 if with_base or lora is None else 0
    own = [int(sel[r - first]) for r in mine if r >= first] if sel is not None else []
    base_here = first == 1 and len(mine) and mine[0] == 0
    Q, C = mc.tokens.shape[:2]
    n_tok = (mc.cont_mask[..., 1:] > 0).sum(-1).astype(np.int32)
    if len(mine) == 0:
        got = OptionScores(np.zeros((0, Q, C), np.float32), n_tok,
                           np.zeros((0, Q, C), np.float32) if kw["calibrate"] else None)
    elif own:
        got = score_options(base, cfg, mc, lora, with_base=bool(base_here), variants=own,
                            progress=progress, desc=f"{desc} (process {jax.process_index()})", **kw)
    else:       # only the base on this process
        got = score_options(base, cfg, mc, None, progress=progress, desc=f"{desc} (process {jax.process_index()})",
                            **kw)
    s = gather_blocks(got.sum, rows)
    uncond = None if got.uncond is None else gather_blocks(got.uncond, rows)
    return OptionScores(s, n_tok, uncond)


def score_unique_rows(base, cfg: ModelConfig, tokens, cont_mask, attn_mask, lora=None, *, rows_per_batch: int = 32,
                      **kw) -> np.ndarray:
    """Like the plain path on rows [..., T] -> [V, ...], scoring each distinct row once."""
    lead = tokens.shape[:-1]
    T = tokens.shape[-1]
    flat = [x.reshape(-1, T) for x in (tokens, cont_mask, attn_mask)]
    key = np.concatenate([np.where(flat[2], flat[0], -1), (flat[1] > 0).astype(np.int32)], axis=1)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    uniq = [x[first] for x in flat]
    s = _score_plain(base, cfg, *uniq, lora, rows_per_batch=min(rows_per_batch, len(first)), **kw)
    return s[:, inverse.reshape(-1)].reshape((s.shape[0],) + lead).astype(np.float32)
