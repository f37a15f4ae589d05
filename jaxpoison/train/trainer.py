"""Host side of a study's training: segments, progress, metrics JSONL, checkpoints, resume.

The compiled program is :mod:`.engine`; this file only feeds it and records what comes back. Metrics of a
segment are read after the next segment has been dispatched, so the device is never idle waiting on the host.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import time
from typing import Any, Optional

import jax
import numpy as np

from jaxpoison.models.decoder import pool_trunk
from jaxpoison.models.lm import parse_dtype

from .checkpoint import Checkpoints, abstract_like, package_versions
from .config import TrainConfig
from .engine import POOL_KEYS, Static, compile_segment, init_state, make_data, num_steps
from .lora import LoraConfig
from .mesh import MeshConfig, make_mesh, study_shardings
from .tblog import StudyLog


@dataclasses.dataclass
class StudyData:
    """Numpy inputs of a study: the tokenized pool and one row per variant."""
    tokens: np.ndarray          # [R, T]
    loss_mask: np.ndarray       # [R, T]
    attn_mask: np.ndarray       # [R, T]
    rows: np.ndarray            # [V, M]
    n_rows: np.ndarray          # [V]
    table: list                 # one dict per variant (variant_id, seed, kind, ...)
    data_hash: str = ""
    lr_scale: Optional[np.ndarray] = None

    @property
    def num_variants(self) -> int:
        return len(self.n_rows)

    def device_data(self) -> dict:
        ids = [int(t.get("variant_id", i)) for i, t in enumerate(self.table)]
        seeds = [int(t.get("seed", 0)) for t in self.table]
        return make_data(self.tokens, self.loss_mask, self.attn_mask, self.rows, self.n_rows, ids, seeds,
                         self.lr_scale)


@dataclasses.dataclass
class TrainResult:
    state: Any                  # stacked per-variant state (lora, opt, frozen, updates)
    metrics: dict               # name -> np.ndarray [steps, V]
    steps: int
    seconds: float
    resumed_from: Optional[int] = None

    @property
    def lora(self):
        return self.state["lora"]


def run_metadata(st: Static, sd: StudyData, base_name: str, base_fingerprint: str, extra: Optional[dict]) -> dict:
    return {
        "model": st.cfg.to_json(), "train": dataclasses.asdict(st.tcfg),
        "lora": {**dataclasses.asdict(st.lcfg), "targets": list(st.lcfg.targets), "scale": st.lcfg.scale},
        "variants": sd.table, "data_hash": sd.data_hash, "versions": package_versions(),
        "base": {"name": base_name, "fingerprint": base_fingerprint}, **(extra or {}),
    }


_LOGGING_ONLY = ("tensorboard",)


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
        if k == "train" and isinstance(o, dict) and isinstance(n, dict):   # logging switches do not change a run
            o, n = ({f: v for f, v in d.items() if f not in _LOGGING_ONLY} for d in (o, n))
        if json.dumps(o, sort_keys=True, default=str) != json.dumps(n, sort_keys=True, default=str):
            out.append(k)
    return out


def train_study(base, st: Static, sd: StudyData, *, run_dir: Optional[str] = None, mesh: MeshConfig = MeshConfig(),
                resume: bool = True, progress: bool = True, base_name: str = "", base_fingerprint: str = "",
                meta_extra: Optional[dict] = None, stop_after: Optional[int] = None) -> TrainResult:
    """Train every variant of ``sd`` on ``base``. ``stop_after`` (steps) ends early, for tests of resume."""
    tcfg = st.tcfg
    S = num_steps(sd.n_rows, tcfg)
    K = tcfg.save_every or min(tcfg.log_every, S)
    root = jax.random.PRNGKey(tcfg.seed)
    data = sd.device_data()
    if tcfg.trunk_cache and st.lora_from > 0:
        # every pool row through the layers no adapter touches, once; steps gather these states (engine.loss_terms)
        data["trunk"] = pool_trunk(base, st.cfg, sd.tokens, sd.attn_mask, st.lora_from, parse_dtype(tcfg.dtype))
    meta = run_metadata(st, sd, base_name, base_fingerprint, meta_extra)
    meta["num_steps"] = S

    use_mesh = mesh.size > 1
    if use_mesh and mesh.data > 1:
        if tcfg.batch_size % mesh.data:
            raise ValueError(f"batch_size {tcfg.batch_size} does not split over a data axis of {mesh.data}")
        st = dataclasses.replace(st, data_axis="data")
    jmesh = make_mesh(mesh) if use_mesh else None
    state = jax.jit(init_state, static_argnums=2)(root, data, st)
    shard = None
    if use_mesh:
        if sd.num_variants % mesh.variant:
            raise ValueError(f"{sd.num_variants} variants do not split over a variant axis of {mesh.variant}")
        shard = study_shardings(jmesh, mesh, state, base, data, POOL_KEYS)
        state = jax.device_put(state, shard[0])
        base = jax.device_put(base, shard[1])
        data = jax.device_put(data, shard[2])

    ckpt = Checkpoints(run_dir, tcfg.keep_last) if run_dir else None
    start, resumed = 0, None
    if ckpt and resume and ckpt.steps():
        old = ckpt.read_meta()
        diff = _same_run(old, meta)
        if diff:
            raise ValueError(f"{run_dir} holds a run with a different {', '.join(diff)}: resume needs the same "
                             "command. Use another --out folder, or delete this one to start afresh.")
        start, state, _ = ckpt.restore(abstract_like(state))
        resumed = start
    metrics_path = pathlib.Path(run_dir) / "metrics.jsonl" if run_dir else None
    if metrics_path:
        kept = []
        if resumed and metrics_path.exists():
            kept = [l for l in metrics_path.read_text().splitlines() if l and json.loads(l)["step"] < start]
        metrics_path.write_text("".join(l + "\n" for l in kept))
    tb = None
    if run_dir and tcfg.tensorboard:
        tb = StudyLog(pathlib.Path(run_dir) / "tensorboard", sd.table)
        tb.add_rows([json.loads(l) for l in kept])

    seg = compile_segment(st, K, jmesh, "variant" if use_mesh else None, shard)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=S, initial=min(start, S), desc=f"train {sd.num_variants} variants", unit="step")
    history: dict = {}
    pending = None
    t0 = time.time()

    last_done = [time.time()]

    def drain(pending):
        s0, m, t_disp = pending
        m = jax.device_get(m)
        now = time.time()
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

    ctx = jax.set_mesh(jmesh) if use_mesh else _null()
    with ctx:
        s = start
        while s < S:
            if stop_after is not None and s >= stop_after:
                break
            state, m = seg(state, np.int32(s), base, data, root)
            if pending:
                drain(pending)
            pending = (s, m, time.time())
            s += K
            if ckpt and (tcfg.save_every or s >= S):
                meta["step"] = min(s, S)
                ckpt.save(min(s, S), state, meta)
                if os.environ.get("JAXPOISON_TEST_SIGKILL_AFTER") == str(min(s, S)):
                    # test hook: die like a pre-empted job, with the next segment already dispatched
                    state, m = seg(state, np.int32(s), base, data, root)
                    os.kill(os.getpid(), signal.SIGKILL)
        if pending:
            drain(pending)
    if bar:
        bar.close()
    if ckpt:
        ckpt.close()
    metrics = {k: np.concatenate(v) for k, v in history.items()} if history else {}
    return TrainResult(state, metrics, S, time.time() - t0, resumed)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def study_static(cfg, tcfg: TrainConfig, lcfg: LoraConfig) -> Static:
    return Static(cfg, tcfg, lcfg)
