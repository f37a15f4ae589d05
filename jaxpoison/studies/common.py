"""What the studies share: the run folder checked against the config, the study mesh and the base model loaded
into it, the loss budget and the phase keys.

A re-run of the same command into the same folder resumes, so the folder's ``config.json`` must match the
config (fields in ``ignore``, free text and the device mesh, may differ); ``--restart`` (``resume=False``) deletes the listed
``stale`` outputs first and keeps everything else.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
from typing import Sequence

import numpy as np

from jaxpoison.configs import StudyConfigError
# the base loaded into a mesh (in train/: the post-hoc evaluators of eval/ load the same way)
from jaxpoison.train.base_load import base_abstract, load_base, place_from_host  # noqa: F401


# top-level fields added after runs were made, with the value such a run had: an old folder resumes unchanged
ADDED_FIELDS = {"quant": "none"}


def prepare(out_dir, study: str, cfg_json: dict, resume: bool, stale: Sequence[str],
            ignore: Sequence[str] = ("name", "note", "mesh", "train.tensorboard")) -> pathlib.Path:
    """Create ``out_dir``, refuse a different config there (when resuming), drop ``stale`` outputs (when not),
    and write ``config.json`` = ``{"study": study, "config": cfg_json}``. ``ignore`` names top-level fields or
    ``section.field`` ones (``train.tensorboard``: a logging switch, which changes no result)."""
    from jaxpoison import distributed
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_folder(out)        # a multi-host job: every host must see this one folder
    cf = out / "config.json"
    if cf.exists() and resume:
        old = {**ADDED_FIELDS, **json.loads(cf.read_text()).get("config", {})}
        diff = [k for k in cfg_json if k not in ignore and _without(old.get(k), k, ignore) !=
                _without(cfg_json[k], k, ignore)]
        if diff:
            raise StudyConfigError(f"{out} holds a run with a different config ({', '.join(diff)}); use another "
                                   f"--out folder, or --restart to discard it")
    if distributed.is_writer():                 # one writer (process 0); the others wait until it is done
        if not resume:
            for name in stale:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        cf.write_text(json.dumps({"study": study, "config": cfg_json}, indent=1))
    distributed.barrier("run-folder-prepared")
    return out


def writer_only(name: str, fn, timeout_s: float = 24 * 3600):
    """``fn()`` on process 0 alone, for a phase whose only product is files in the run folder (calls to an API
    model, answers generated with the base on one process's devices): the other processes wait for it (up to
    ``timeout_s``) and then read its files; if it fails there, they stop with its error. Returns ``fn()``'s
    value on process 0, None elsewhere; one process: just ``fn()``."""
    from jaxpoison import distributed
    if distributed.process_count() == 1:
        return fn()
    out, err = None, ""
    if distributed.is_writer():
        try:
            out = fn()
        except Exception as e:      # tell the others before stopping
            err = f"{type(e).__name__}: {e}"
            distributed.allgather_str(f"writer-only/{name}", err, timeout_s)
            raise
    done = distributed.allgather_str(f"writer-only/{name}", err, timeout_s)[0]
    if done:
        raise distributed.DistributedError(f"process 0 failed in the {name!r} phase, so this process stops too: "
                                           f"{done}")
    return out


def _without(section, name: str, ignore: Sequence[str]):
    """A config section less its ``name.field`` entries of ``ignore``."""
    drop = {i.split(".", 1)[1] for i in ignore if i.startswith(name + ".")}
    return {f: v for f, v in section.items() if f not in drop} if drop and isinstance(section, dict) else section


def process_local(lm):
    """``lm`` with its params on this process's own devices, for the phases a multi-host job runs per process
    (each scores its block of the variants, generates, or runs a writer-only phase alone): a leaf stored over
    ``fsdp`` of the global mesh is gathered across processes and stays split over this process's devices (its
    dim over a local ``fsdp`` axis of them, where that divides it), the rest replicated on them. One process, or
    a base already on this process's devices: ``lm`` itself."""
    import dataclasses
    import jax
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from jaxpoison.train.mesh import AXES
    leaves = jax.tree.leaves(lm.params)
    if jax.process_count() == 1 or all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in leaves):
        return lm
    n_proc, mine = jax.process_count(), jax.process_index()
    grid = [[d for d in jax.devices() if d.process_index == p] for p in range(n_proc)]
    L = len(grid[mine])
    auto = (AxisType.Auto,) * (1 + len(AXES))
    every = Mesh(np.asarray(grid, dtype=object).reshape(n_proc, 1, 1, L, 1), ("process",) + AXES, axis_types=auto)
    here = Mesh(np.asarray(grid[mine], dtype=object).reshape(1, 1, L, 1), AXES, axis_types=auto[1:])

    def spec(x):
        old = tuple(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else ()
        old += (None,) * (x.ndim - len(old))
        dim = next((d for d, a in enumerate(old) if a is not None and "fsdp" in (a if isinstance(a, tuple) else (a,))
                    and x.shape[d] % L == 0), None)
        return P(*("fsdp" if d == dim else None for d in range(x.ndim)))

    def local(x):
        sp = spec(x)
        y = jax.jit(lambda a: a, out_shardings=NamedSharding(every, sp))(x)     # all-gather across processes
        return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(here, sp),
                                                        [s.data for s in y.addressable_shards])

    params = jax.tree.map(lambda x: local(x) if isinstance(x, jax.Array) and not x.is_fully_addressable else x,
                          lm.params)
    return dataclasses.replace(lm, params=params)


def resolve_mesh(cfg, base_override=None):
    """The study's mesh, resolved before any weight loads, so that the base can be read straight into its shards:
    ``cfg.mesh`` with its 'auto' axes sized as the trainer sizes them (:func:`jaxpoison.train.trainer.study_mesh`),
    from the model's config alone, the variant count the config implies (:func:`jaxpoison.plan.shapes.study_shape`:
    the grid's cells x seeds) and ``train.variant_chunk``. Returns (MeshConfig, the variant count it assumed);
    (None, None) when the model's config cannot be read without its weights. A multi-host job resolves it over
    every process's devices (the trainer's mesh), so each process loads only its own shards."""
    from jaxpoison.plan.program import abstract_base
    from jaxpoison.plan.shapes import study_shape
    from jaxpoison.train.trainer import study_mesh, variant_chunks
    try:
        shape = study_shape(cfg, *((base_override[0], "base_override") if base_override else ()))
    except FileNotFoundError:
        return None, None
    chunks = variant_chunks(np.ones(shape.variants, np.int64), cfg.train)     # chunk sizes depend on V alone
    return study_mesh(cfg.mesh, chunks, cfg.train, abstract_base(shape.cfg, cfg.dtype, cfg.quant)), shape.variants


def train_mesh(cfg, loaded_mesh, n_assumed, n_variants: int):
    """The mesh to train on: the one the base was loaded into when the data have the variant count it assumed
    (the base is then already in place), else the config's own (the trainer resolves it and moves the base)."""
    return loaded_mesh if loaded_mesh is not None and n_assumed == n_variants else cfg.mesh


def digest(*parts) -> str:
    """A short stable hash of JSON-able parts: the key a resumed phase compares against its saved output."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_pool(pool, rows, n_rows, tcfg, mesh, base) -> None:
    """Encode and count a lazy pool (:meth:`jaxpoison.data.pool.Pool.prepare`) before its statistics are read.
    One process: every row. A multi-host job: each process encodes only the rows of its own variant shards
    (and counts the rows it owns: :func:`jaxpoison.train.trainer.process_pool_rows`, with ``tcfg``/``mesh``/``base``
    as :func:`jaxpoison.train.trainer.train_study` gets them), after all processes agree on the pool's inputs."""
    from jaxpoison import distributed
    if distributed.process_count() == 1:
        pool.prepare()
        return
    from jaxpoison.train.trainer import process_pool_rows
    distributed.agree("pool inputs", {"pool rows, settings and tokenizer": pool.inputs_digest()})
    need, owned = process_pool_rows(rows, n_rows, len(pool), tcfg, mesh, base)
    pool.prepare(need, owned, gather=lambda text: distributed.allgather_str("pool counts", text))


def longest_completion_budget(pool) -> int:
    """A loss budget that holds every row's loss positions: the pool's longest completion, rounded up to 8."""
    return -(-int(pool.stats["loss_tokens"]["max"]) // 8) * 8


def check_shared_fields(cfg, name: str) -> None:
    """The checks every study config shares: ``study`` names this study (``name``) and ``quant`` is a known
    kind. Raises :class:`StudyConfigError` naming the field and what to use."""
    if cfg.study != name:
        raise StudyConfigError(f"study: this is the {name!r} study, got {cfg.study!r}")
    from jaxpoison.models.quant import QUANT_KINDS
    if cfg.quant not in QUANT_KINDS:
        raise StudyConfigError(f"quant: one of {QUANT_KINDS} (nf4: QLoRA's 4-bit NormalFloat; nf4-dq: with "
                               f"double-quantised scales; int8: per output channel), got {cfg.quant!r}")
