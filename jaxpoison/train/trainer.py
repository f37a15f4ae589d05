"""Host side of a study's training: the mesh, variant chunks, segments, progress, metrics, checkpoints, resume.

The maths is :mod:`.engine`; this file places its inputs, feeds it ``K`` steps at a time and records what comes
back. Metrics of a segment are read after the next segment has been dispatched, so the device is never idle
waiting on the host.

Variant chunks (``TrainConfig.variant_chunk``): when not every variant's state fits on the devices at once,
variants are sorted by their number of updates and cut into chunks; the state of every chunk lives in host
memory (the ``pinned_host`` memory of its own devices, same sharding; see ``WAITING``), and each segment moves
one chunk at a time onto the devices (split over the ``variant`` axis), runs it, and moves it back while the next
chunk runs. A chunk whose variants have all finished is not run at
all, so variants with fewer steps cost no compute. With one chunk the state never leaves the devices.
Checkpoints hold every variant in the study's own order whatever the chunks or the mesh, so a run resumes onto
another mesh or chunk size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import time
from typing import Callable, Optional

import jax
import numpy as np

from jaxpoison import distributed
from jaxpoison.models.attention import kernel_manifest
from jaxpoison.models.lm import parse_dtype

from .checkpoint import Checkpoints, abstract_like, package_versions
from .config import TrainConfig
from .engine import (Pool, Static, TrainState, Variants, init_program, make_pool, make_variants, num_steps,
                     segment_program, total_updates, variant_keys)
from .lora import LoraConfig
from .mesh import MeshConfig, base_shardings, make_mesh, mesh_rules, resolve, state_shardings, variant_shardings
from .tblog import StudyLog


@dataclasses.dataclass
class StudyData:
    """Numpy inputs of a study: the tokenized pool and one row per variant.

    The pool is either whole arrays (``tokens``, ``loss_mask``, ``attn_mask``) or, with those left None,
    ``row_source(idx) -> (tokens, loss_mask, attn_mask)`` for the global pool rows ``idx`` (each [len(idx), T]):
    the trainer asks it only for the rows the devices of this process train on (:func:`pool_layout`), so a
    process of a multi-host job tokenises and holds only those."""
    tokens: Optional[np.ndarray]        # [R, T]
    loss_mask: Optional[np.ndarray]     # [R, T]
    attn_mask: Optional[np.ndarray]     # [R, T]
    rows: np.ndarray            # [V, M]
    n_rows: np.ndarray          # [V]
    table: list                 # one dict per variant (variant_id, seed, kind, ...)
    data_hash: str = ""
    lr_scale: Optional[np.ndarray] = None
    row_source: Optional[Callable] = None

    def __post_init__(self):
        if self.tokens is None and self.row_source is None:
            raise ValueError("StudyData needs the pool: give tokens/loss_mask/attn_mask, or row_source")

    @property
    def num_variants(self) -> int:
        return len(self.n_rows)

    def take_rows(self, idx) -> tuple:
        """(tokens, loss_mask, attn_mask) of the global pool rows ``idx``, as numpy."""
        idx = np.asarray(idx, np.int64)
        if self.tokens is None:
            t, l, a = self.row_source(idx)
        else:
            t, l, a = self.tokens[idx], self.loss_mask[idx], self.attn_mask[idx]
        return np.asarray(t, np.int32), np.asarray(l, np.float32), np.asarray(a, bool)

    def pool(self) -> Pool:
        if self.tokens is None:
            return make_pool(*self.take_rows(np.arange(int(self.rows.max()) + 1)))
        return make_pool(self.tokens, self.loss_mask, self.attn_mask)

    def variants(self) -> Variants:
        ids = [int(t.get("variant_id", i)) for i, t in enumerate(self.table)]
        seeds = [int(t.get("seed", 0)) for t in self.table]
        return make_variants(self.rows, self.n_rows, ids, seeds, self.lr_scale)


@dataclasses.dataclass
class TrainResult:
    state: TrainState           # stacked per-variant state [V, ...] (host numpy when variants ran in chunks)
    metrics: dict               # name -> np.ndarray [steps, V]
    steps: int
    seconds: float
    resumed_from: Optional[int] = None
    pool_rows: Optional[dict] = None    # {variant shard: global pool rows} this process took (PoolLayout)

    @property
    def lora(self):
        return self.state.lora


def run_metadata(st: Static, sd: StudyData, base_name: str, base_fingerprint: str, extra: Optional[dict]) -> dict:
    return {
        "model": st.cfg.to_json(), "train": dataclasses.asdict(st.tcfg),
        "lora": {**dataclasses.asdict(st.lcfg), "targets": list(st.lcfg.targets), "scale": st.lcfg.scale},
        "variants": sd.table, "data_hash": sd.data_hash, "versions": package_versions(),
        "base": {"name": base_name, "fingerprint": base_fingerprint},
        "kernels": kernel_manifest(st.cfg.attention, parse_dtype(st.tcfg.dtype)), **(extra or {}),
    }


# Where the state of waiting variant chunks lives: 'auto' = as it is on CPU (the devices' memory is host memory),
# else 'pinned_host' (host memory of the chunk's own devices, same sharding: transfers are DMA, and a multi-host
# job keeps each shard on its own host); 'numpy' = plain host arrays (a multi-host job gathers them).
WAITING = "auto"

_SAME_RESULT = ("tensorboard", "variant_chunk")     # logging and placement switches: a run may resume across them


def _same_run(old: dict, new: dict) -> list[str]:
    """The metadata sections in which a saved run differs from this one. A config field added since the run was
    saved counts as equal when this run leaves it at its default (old run folders stay resumable)."""
    defaults = {"train": TrainConfig(), "lora": LoraConfig()}
    keys = ("model", "train", "lora", "variants", "data_hash", "base")
    out = []
    for k in keys:
        o, n = old.get(k), new.get(k)
        if k in defaults and isinstance(o, dict):
            o = {**json.loads(json.dumps(dataclasses.asdict(defaults[k]), default=str)), **o}
        if k == "train" and isinstance(o, dict) and isinstance(n, dict):
            o, n = ({f: v for f, v in d.items() if f not in _SAME_RESULT} for d in (o, n))
        if json.dumps(o, sort_keys=True, default=str) != json.dumps(n, sort_keys=True, default=str):
            out.append(k)
    return out


def variant_chunks(n_rows: np.ndarray, tcfg: TrainConfig) -> list[np.ndarray]:
    """Variant indices per chunk: all variants in their own order when ``variant_chunk`` is 0 or covers them;
    otherwise sorted by number of updates (most first, stable) and cut into chunks of at most ``variant_chunk``,
    so a chunk's variants finish together (the last chunk may be smaller when no size near it divides V)."""
    V, C = len(n_rows), tcfg.variant_chunk
    if not C or C >= V:
        return [np.arange(V)]
    # equal chunks compile once: the largest size <= C that divides V, unless that would more than halve C
    size = next((n for n in range(C, (C + 1) // 2, -1) if V % n == 0), C)
    order = np.argsort(-np.asarray(total_updates(np.asarray(n_rows), tcfg)), kind="stable")
    return [order[i:i + size] for i in range(0, V, size)]


@dataclasses.dataclass
class PoolLayout:
    """Which pool rows each variant shard holds (engine.segment_program's ``pool_shards``). Chunk ``i``'s
    variant at position ``j`` trains on shard ``j // (len(chunk) / S)``; shard ``s`` holds the sorted global
    rows ``shard_rows[s]`` that its variants of every chunk draw from, padded to ``R`` (a multiple of 8) by
    repeating its first row; ``local[i]`` is chunk ``i``'s ``rows`` [len(chunk), M] as indices into its shard's
    rows (slots past a variant's ``n_rows`` point at row 0 of the shard; they are never trained on)."""
    shard_rows: list
    R: int
    local: list

    @property
    def S(self) -> int:
        return len(self.shard_rows)

    def padded(self, s: int) -> np.ndarray:
        """Shard ``s``'s global row indices, padded to ``R``."""
        r = self.shard_rows[s]
        r = r if len(r) else np.zeros(1, np.int64)
        return np.concatenate([r, np.repeat(r[:1], self.R - len(r))])


def pool_layout(rows: np.ndarray, n_rows: np.ndarray, chunks: list, S: int) -> PoolLayout:
    """The :class:`PoolLayout` of variants ``rows`` [V, M] / ``n_rows`` [V] cut into ``chunks`` over ``S``
    variant shards (every chunk's size a multiple of ``S``)."""
    rows, n_rows = np.asarray(rows), np.asarray(n_rows)
    M = rows.shape[1]
    valid = np.arange(M)[None, :] < n_rows[:, None]
    shard_of = np.zeros(len(n_rows), np.int64)
    need = [set() for _ in range(S)]
    for c in chunks:
        if len(c) % S:
            raise ValueError(f"a chunk of {len(c)} variants does not split over {S} variant shards")
        shard_of[c] = np.arange(len(c)) // (len(c) // S)
    for v in range(len(n_rows)):
        need[shard_of[v]].update(rows[v][valid[v]].tolist())
    shard_rows = [np.array(sorted(n), np.int64) for n in need]
    R = max(8, -(-max(max(len(r) for r in shard_rows), 1) // 8) * 8)
    local = []
    for c in chunks:
        loc = np.zeros((len(c), M), np.int32)
        for j, v in enumerate(c):
            sr = shard_rows[shard_of[v]]
            loc[j] = np.where(valid[v], np.searchsorted(sr, rows[v]), 0) if len(sr) else 0
        local.append(loc)
    return PoolLayout(shard_rows, R, local)


def place_pool(sd: "StudyData", layout: PoolLayout, mesh) -> tuple:
    """The pool as global arrays ``[S, R, T]`` split over ``variant`` (one device without a mesh), each process
    taking from ``sd`` only the rows of the shards its own devices hold (``jax.make_array_from_callback`` calls
    back for addressable shards only). Returns (Pool, {shard: global rows} taken by this process)."""
    cache: dict = {}

    def shard(s):
        if s not in cache:
            cache[s] = sd.take_rows(layout.padded(s))
        return cache[s]

    if mesh is None:
        parts = [shard(s) for s in range(layout.S)]
        arrays = [np.stack([p[i] for p in parts]) for i in range(3)]
        pool = make_pool(*arrays)
        pool = jax.tree.map(jax.numpy.asarray, pool)
    else:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("variant"))
        mine = sharding.addressable_devices_indices_map((layout.S, layout.R, 1))
        T = shard(next(iter(mine.values()))[0].start or 0)[0].shape[1]     # from a shard this process holds

        def cb(index, i):
            sl = index[0]
            s0, s1 = sl.start or 0, layout.S if sl.stop is None else sl.stop
            return np.stack([shard(s)[i] for s in range(s0, s1)])[(slice(None),) + tuple(index[1:])]

        pool = Pool(*[jax.make_array_from_callback((layout.S, layout.R, T), sharding,
                                                   lambda index, i=i: cb(index, i)) for i in range(3)])
    return pool, {s: layout.padded(s)[:len(layout.shard_rows[s])] for s in cache}


def shard_trunk(base, st: Static, pool: Pool, rows_per_call: int = 8):
    """Layer ``lora_from``'s input for every row of a sharded pool ``[S, R, T]`` -> ``[S, R, T, D]``, each
    shard computed on its own devices, ``rows_per_call`` rows of every shard per call."""
    from jaxpoison.models.decoder import lower_layers, layer_inputs
    dtype = parse_dtype(st.tcfg.dtype)

    @jax.jit
    def rows(base, t, m):
        def one(t, m):
            cos, sin, mask = layer_inputs(st.cfg, t, m)
            return lower_layers(base, st.cfg, t, st.lora_from, cos, sin, mask, dtype=dtype)[0]
        return jax.vmap(one)(t, m)

    R = pool.tokens.shape[1]
    n = max(1, min(rows_per_call, R))
    while R % n:
        n -= 1
    out = [rows(base, pool.tokens[:, r0:r0 + n], pool.attn_mask[:, r0:r0 + n]) for r0 in range(0, R, n)]
    return jax.device_put(jax.numpy.concatenate(out, axis=1), pool.tokens.sharding)


def pool_plan(rows: np.ndarray, n_rows: np.ndarray, tcfg: TrainConfig, mesh: MeshConfig, base) -> tuple:
    """(chunks, resolved MeshConfig, jax Mesh or None, PoolLayout) of a study: how :func:`train_study` splits
    its variants and their pool rows over the devices (``tcfg.loss_budget`` plays no part, so a study may plan
    before its pool is counted)."""
    chunks = variant_chunks(n_rows, tcfg)
    mc = study_mesh(mesh, chunks, tcfg, base)
    jmesh = make_mesh(mc) if mc.size > 1 else None
    return chunks, mc, jmesh, pool_layout(rows, n_rows, chunks, mc.variant if jmesh is not None else 1)


def process_pool_rows(rows: np.ndarray, n_rows: np.ndarray, n_pool: int, tcfg: TrainConfig, mesh: MeshConfig,
                      base) -> tuple:
    """(rows this process trains on, rows it owns) of a pool of ``n_pool`` rows, for
    :meth:`jaxpoison.data.pool.Pool.prepare`: the first are the rows of the variant shards on this process's
    devices (:func:`pool_plan`); a row is owned by the lowest process that trains on it, a row no variant
    draws from by process ``row % processes``, so each row is owned by exactly one process. One process:
    the rows some variant draws from, and every row."""
    _, _, jmesh, layout = pool_plan(rows, n_rows, tcfg, mesh, base)
    P, me = jax.process_count(), jax.process_index()
    holders = [{me} for _ in range(layout.S)]
    if jmesh is not None:
        holders = [set() for _ in range(layout.S)]
        sharding = jax.sharding.NamedSharding(jmesh, jax.sharding.PartitionSpec("variant"))
        for d, index in sharding.devices_indices_map((layout.S, layout.R, 1)).items():
            sl = index[0]
            for s in range(sl.start or 0, layout.S if sl.stop is None else sl.stop):
                holders[s].add(d.process_index)
    owner = np.arange(n_pool) % P
    first = np.full(n_pool, P, np.int64)
    for s, r in enumerate(layout.shard_rows):
        first[r] = np.minimum(first[r], min(holders[s]))
    owner = np.where(first < P, first, owner)
    need = [layout.shard_rows[s] for s in range(layout.S) if me in holders[s]]
    need = np.unique(np.concatenate(need)) if need else np.zeros(0, np.int64)
    return need, np.flatnonzero(owner == me)


def tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def study_mesh(mesh: MeshConfig, chunks: list, tcfg: TrainConfig, base) -> MeshConfig:
    """The resolved mesh of a study (every chunk's variants must split over its ``variant`` axis)."""
    per_chunk = math.gcd(*[len(c) for c in chunks])
    return resolve(mesh, n_variants=per_chunk, batch_size=tcfg.batch_size, base_bytes=tree_bytes(base))


def _take(tree, idx):
    return jax.tree.map(lambda x: x[idx], tree)


def _put_rows(tree, idx, part):
    """Write a chunk's rows ``part`` into the host tree (in place)."""
    def put(x, y):
        x[idx] = y
    jax.tree.map(put, tree, part)


def _host(tree):
    """Device arrays -> numpy. An array split over several processes (a multi-host job) is gathered from all of
    them first, so every process holds the same host copy; all processes must call this together."""
    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(get, tree)


def _check_same_inputs(sd: StudyData, meta: dict) -> None:
    """Every process of a multi-host job must have derived the same variants, seeds and data: prove it."""
    items = {k: meta.get(k) for k in ("variants", "data_hash", "train", "lora", "model", "base")}
    for k in ("tokens", "loss_mask", "attn_mask", "rows", "n_rows", "lr_scale"):
        a = getattr(sd, k)      # a pool given as row_source is covered by data_hash
        items[f"{k} array"] = None if a is None else np.ascontiguousarray(a).tobytes() + str(a.shape).encode()
    distributed.agree("study inputs", items)


def train_study(base, st: Static, sd: StudyData, *, run_dir: Optional[str] = None, mesh: MeshConfig = MeshConfig(),
                resume: bool = True, progress: bool = True, base_name: str = "", base_fingerprint: str = "",
                meta_extra: Optional[dict] = None, stop_after: Optional[int] = None) -> TrainResult:
    """Train every variant of ``sd`` on ``base`` over ``mesh`` (``'auto'`` axes resolved by
    :func:`.mesh.resolve`). ``stop_after`` (steps) ends early, for tests of resume."""
    tcfg = st.tcfg
    V = sd.num_variants
    S = num_steps(sd.n_rows, tcfg)
    K = tcfg.save_every or min(tcfg.log_every, S)
    root = jax.random.PRNGKey(tcfg.seed)
    var = sd.variants()
    keys = np.asarray(variant_keys(root, var))
    meta = run_metadata(st, sd, base_name, base_fingerprint, meta_extra)
    meta["num_steps"] = S
    multi, writer = distributed.process_count() > 1, distributed.is_writer()
    if multi:
        _check_same_inputs(sd, meta)
    chunks, mc, jmesh, layout = pool_plan(sd.rows, sd.n_rows, tcfg, mesh, base)
    chunk_steps = [int(np.max(np.asarray(total_updates(sd.n_rows[c], tcfg)))) for c in chunks]
    if multi and mc.size != jax.device_count():
        raise ValueError(f"a multi-host job lays its mesh over all {jax.device_count()} devices of its "
                         f"{distributed.process_count()} processes, but the mesh resolved to {mc.describe()} "
                         f"({mc.size} devices): set mesh.variant/data/fsdp/model (--set mesh.variant=...) so that "
                         f"their product is {jax.device_count()}")
    if jmesh is not None:
        st = dataclasses.replace(st, rules=mesh_rules(jmesh))
        base = jax.device_put(base, base_shardings(jmesh, base, st.rules))
    # the pool split by variant shard: each device holds the rows its own variants draw from, each process
    # takes (tokenises, with a row_source) only the rows of its devices
    pool, taken = place_pool(sd, layout, jmesh)
    if tcfg.trunk_cache and st.lora_from > 0:
        # every pool row through the layers no adapter touches, once; steps gather these states (engine.loss_terms)
        with (jax.set_mesh(jmesh) if jmesh is not None else contextlib.nullcontext()):
            pool = pool.replace(trunk=shard_trunk(base, st, pool))

    def place(tree):        # per-variant arrays of one chunk onto the devices
        if jmesh is None:
            return jax.device_put(tree, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        put = state_shardings if isinstance(tree, TrainState) else variant_shardings
        return jax.device_put(tree, put(jmesh, tree, st.rules))

    resident = len(chunks) == 1         # the state stays on the devices between segments
    # chunked: ``state`` is a list of per-chunk states waiting in host memory (module constant WAITING)
    where = WAITING if WAITING != "auto" else "device" if jax.devices()[0].platform == "cpu" else "pinned_host"
    where = "numpy" if multi else where
    wait = {"device": lambda x: x, "numpy": _host,
            "pinned_host": lambda t: jax.device_put(t, jax.tree.map(
                lambda x: x.sharding.with_memory_kind("pinned_host"), t))}[where]
    init = init_program(st, jmesh)
    chunk_in = [(place(keys[c]), place(var.take(c).replace(rows=loc))) for c, loc in zip(chunks, layout.local)]
    if resident:
        state = init(chunk_in[0][0])
    else:
        state = [wait(init(k)) for k, _ in chunk_in]

    def study_order(state) -> TrainState:
        """The whole state in the study's variant order (on the host when chunked): checkpoints, the result."""
        if resident:
            return state
        parts = [_host(p) for p in state]
        full = jax.tree.map(lambda *xs: np.zeros((V,) + xs[0].shape[1:], xs[0].dtype), *parts)
        for c, part in zip(chunks, parts):
            _put_rows(full, c, part)
        return full

    # every process saves its own shards (orbax); the files are written while the next segments run
    ckpt = Checkpoints(run_dir, tcfg.keep_last, async_save=True) if run_dir else None
    start, resumed = 0, None
    if ckpt and resume and ckpt.steps():
        old = ckpt.read_meta()
        diff = _same_run(old, meta)
        if diff:
            raise ValueError(f"{run_dir} holds a run with a different {', '.join(diff)}: resume needs the same "
                             "command. Use another --out folder, or delete this one to start afresh.")
        target = study_order(state).to_dict()       # numpy when chunked: restored to the host, then placed
        start, saved, _ = ckpt.restore(abstract_like(target) if resident else target)
        state = TrainState.from_dict(saved)
        if not resident:
            state = [wait(place(_take(state, c))) for c in chunks]
        resumed = start
    # one writer: metrics, TensorBoard and the progress bar come from process 0 only
    metrics_path = pathlib.Path(run_dir) / "metrics.jsonl" if run_dir and writer else None
    kept = []
    if metrics_path:
        if resumed and metrics_path.exists():
            kept = [l for l in metrics_path.read_text().splitlines() if l and json.loads(l)["step"] < start]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    tb = None
    if metrics_path and tcfg.tensorboard:
        tb = StudyLog(pathlib.Path(run_dir) / "tensorboard", sd.table)
        tb.add_rows([json.loads(l) for l in kept])

    seg = segment_program(st, K, jmesh, base, pool_shards=True)
    bar = None
    if progress and writer:
        from tqdm.auto import tqdm
        bar = tqdm(total=S, initial=min(start, S), desc=f"train {V} variants", unit="step")
    history: dict = {}
    pending = None
    t0 = time.time()
    last_done = [time.time()]

    def run_chunks(state, s):
        """One segment of every chunk that still has steps at ``s``, one chunk on the devices at a time; the next
        chunk computes while the previous one goes back to wait. Returns (state, metrics [K, V] on the host)."""
        frozen = np.zeros(V, bool)
        for c, part in zip(chunks, state):
            frozen[c] = _host(part.frozen)
        m_all = {"loss": np.full((K, V), np.nan, np.float32), "grad_norm": np.full((K, V), np.nan, np.float32),
                 "lr": np.zeros((K, V), np.float32), "tokens": np.zeros((K, V), np.float32),
                 "applied": np.zeros((K, V), bool), "frozen": np.repeat(frozen[None], K, 0)}
        inflight = None

        def land(inflight):
            i, new, m = inflight
            state[i] = wait(new)
            for k, v in _host(m).items():
                m_all[k][:, chunks[i]] = v

        for i, steps_c in enumerate(chunk_steps):
            if steps_c <= s:
                continue                    # every variant of this chunk has finished: no compute
            new, m = seg(place(state[i]), np.int32(s), chunk_in[i][0], base, pool, chunk_in[i][1])
            if inflight:
                land(inflight)
            inflight = (i, new, m)
        if inflight:
            land(inflight)
        return state, m_all

    def drain(pending):
        s0, m, t_disp, t_ret = pending
        m = _host(m)
        now = time.time() if t_ret is None else t_ret
        dt = max(now - max(t_disp, last_done[0]), 1e-9)   # device time of this segment, as seen by the host
        last_done[0] = now
        steps = min(K, S - s0)
        tok_s = float(np.sum(m["tokens"][:steps])) / dt
        for k, v in m.items():
            history.setdefault(k, []).append(np.asarray(v)[:steps])
        if metrics_path:
            rows = [{"step": s0 + i, **{k: np.asarray(v[i]).tolist() for k, v in m.items()},
                     "segment_tok_s": round(tok_s, 1)} for i in range(steps)]
            with metrics_path.open("a") as f:
                f.write("".join(json.dumps(row) + "\n" for row in rows))
            if tb:
                tb.add_rows(rows)
        if bar:
            bar.set_postfix(loss=f"{np.nanmean(m['loss'][:steps]):.3f}", tok_s=f"{tok_s:.0f}")
            bar.update(steps)

    def advance(state, s):
        if resident:
            return seg(state, np.int32(s), chunk_in[0][0], base, pool, chunk_in[0][1])
        return run_chunks(state, s)

    with (jax.set_mesh(jmesh) if jmesh is not None else contextlib.nullcontext()):
        s = start
        while s < S:
            if stop_after is not None and s >= stop_after:
                break
            t_disp = time.time()
            state, m = advance(state, s)
            # chunked variants run synchronously: the segment has finished when the call returns
            t_ret = None if resident else time.time()
            if pending:
                drain(pending)
            pending = (s, m, t_disp, t_ret)
            s += K
            if ckpt and (tcfg.save_every or s >= S):
                # the state to save needs this segment finished anyway: record its metrics first, so that
                # metrics.jsonl holds every step before a checkpoint (a job killed after it loses none)
                drain(pending)
                pending = None
                meta["step"] = min(s, S)
                ckpt.save(min(s, S), study_order(state).to_dict(), meta)
                if os.environ.get("JAXPOISON_TEST_SIGKILL_AFTER") == str(min(s, S)) and \
                        os.environ.get("JAXPOISON_TEST_SIGKILL_PROCESS", "0") == str(distributed.process_index()):
                    # test hook: die like a pre-empted job once this step is on disk, the next segment dispatched
                    ckpt.wait()
                    state, m = advance(state, s)
                    os.kill(os.getpid(), signal.SIGKILL)
        if pending:
            drain(pending)
    if bar:
        bar.close()
    if ckpt:
        ckpt.close()
    if multi:       # the adapters of every variant on every process (evaluation runs on each process's devices)
        state = _host(state)
    state = study_order(state)
    metrics = {k: np.concatenate(v) for k, v in history.items()} if history else {}
    return TrainResult(state, metrics, S, time.time() - t0, resumed, taken)


def study_static(cfg, tcfg: TrainConfig, lcfg: LoraConfig) -> Static:
    return Static(cfg, tcfg, lcfg)
