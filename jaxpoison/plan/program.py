"""The study's training segment as an abstract program: compiled for a target's devices from shapes alone.

Base weights, the token pool and the per-variant state are ``jax.ShapeDtypeStruct`` trees built from the model's
config (``jax.eval_shape`` of the real initialisers), so nothing is allocated and no weights are read. The
function compiled is the study's own segment (:func:`jaxpoison.train.engine.compile_segment`) for ONE chunk of
variants: variants beyond a chunk wait in host memory and run as successive calls of the same program, so a
chunk's program is what has to fit on the device. XLA's memory analysis of that compile, or XLA's own
out-of-memory error, is the verdict.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.models.lm import parse_dtype
from jaxpoison.train.mesh import MeshConfig

from .shapes import StudyShape


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Per-chip bytes of one compile (XLA's memory analysis), or the error that refused it."""
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    peak: int = 0
    flops_xla: float = 0.0      # cost_analysis (a scan body counted once)
    seconds: float = 0.0
    error: str = ""             # XLA's out-of-memory message when the program does not fit

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def needed_temporaries(self) -> int:
        """The temporaries XLA's out-of-memory message names ('HLO temporaries (40.85G) exceeds ...'), 0 if none."""
        import re
        m = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", self.error)
        if not m:
            return 0
        return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " "))

    @property
    def total(self) -> int:
        """The larger of XLA's peak (its heap simulation) and arguments + unaliased outputs + temporaries. The
        two agree on most programs; where they do not (XLA:TPU reported a peak 9x its temporaries for a small
        blocked-attention step) the larger one is the safe figure."""
        return max(self.peak, self.arguments + self.outputs - self.aliased + self.temporaries)


def mesh_config(shape: StudyShape, n_devices: int, chunk: int, hbm_bytes: int = 0) -> MeshConfig:
    """The resolved mesh of one chunk on ``n_devices`` chips: the study config's ``mesh`` section (``auto`` axes
    resolved as :func:`jaxpoison.train.mesh.resolve` does on real devices: variants first, ``fsdp`` when the
    base takes more than half a chip, then ``data``)."""
    from jaxpoison.train import mesh
    from .model import base_bytes
    mc = shape.mesh if isinstance(shape.mesh, MeshConfig) else MeshConfig()
    if getattr(mc, "fsdp", 1) == mesh.AUTO and hbm_bytes:
        need = base_bytes(shape.cfg, shape.dtype, shape.quant) / (mesh.FIT_FRACTION * hbm_bytes)
        fixed = int(np.prod([getattr(mc, a) for a in mesh.AXES if getattr(mc, a) != mesh.AUTO] or [1]))
        left = max(n_devices // fixed, 1)
        f = 1
        if need > 1:
            f = next((d for d in range(math.ceil(need), left + 1) if left % d == 0), left)
        mc = dataclasses.replace(mc, fsdp=f)
    devices = [_Fake(i) for i in range(n_devices)]
    return mesh.resolve(mc, n_variants=chunk, batch_size=shape.tcfg.batch_size, devices=devices)


class _Fake:
    """A stand-in device for :func:`jaxpoison.train.mesh.resolve` (it counts devices and reads the platform)."""
    platform = "tpu"

    def __init__(self, i):
        self.id = i

    def memory_stats(self):
        return None


def _mesh_str(mc: MeshConfig) -> str:
    return mc.describe()


def abstract_base(cfg, dtype, quant: str = "") -> dict:
    """ShapeDtypeStructs of the base parameters in ``dtype`` (the layout of :mod:`jaxpoison.models.config`),
    with the layers' kernels quantised (:func:`jaxpoison.models.quant.quantize_base`) when ``quant`` is set."""
    from jaxpoison.models.decoder import init_params
    tree = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    dt = parse_dtype(dtype)
    tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dt), tree)
    if quant and quant != "none":
        from jaxpoison.models.quant import quantize_base
        tree = jax.eval_shape(lambda b: quantize_base(b, quant), tree)
    return tree


def abstract_inputs(C: int, R: int, T: int, M: int) -> tuple:
    """ShapeDtypeStructs of the engine's (keys [C], Pool, Variants [C]) for a chunk of C variants."""
    from jaxpoison.train.engine import Pool, Variants
    S = jax.ShapeDtypeStruct
    keys = S((C, 2), jnp.uint32)
    pool = Pool(S((R, T), jnp.int32), S((R, T), jnp.float32), S((R, T), jnp.bool_))
    var = Variants(S((C, M), jnp.int32), S((C,), jnp.int32), S((C,), jnp.int32), S((C,), jnp.int32),
                   S((C,), jnp.float32))
    return keys, pool, var


@dataclasses.dataclass
class Program:
    """A jitted function with its abstract arguments and the mesh it was built on."""
    fn: Any
    args: tuple
    mesh: Any
    mesh_config: Optional[MeshConfig]
    kwargs: dict = dataclasses.field(default_factory=dict)     # static arguments of a jitted function


def train_program(shape: StudyShape, devices, chunk: int, length: int = 1, hbm_bytes: int = 0) -> Program:
    """The study's train segment of ``length`` steps for one chunk of ``chunk`` variants on ``devices``, with
    the trainer's own builder (:func:`jaxpoison.train.engine.segment_program`) and shardings."""
    from jaxpoison.train import engine
    from jaxpoison.train.mesh import make_mesh, mesh_rules
    devices = list(devices)
    mc = mesh_config(shape, len(devices), chunk, hbm_bytes)
    tcfg = dataclasses.replace(shape.tcfg, variant_chunk=0)      # the chunk IS the program's variant axis
    mesh = make_mesh(mc, devices)
    cfg = for_platform(shape.cfg, devices[0].platform, tcfg.dtype)
    st = engine.Static(cfg, tcfg, shape.lcfg, mesh_rules(mesh))
    base = abstract_base(shape.cfg, shape.dtype, shape.quant)
    keys, pool, var = abstract_inputs(chunk, shape.pool_rows, shape.seq_len, shape.max_rows)
    state = jax.eval_shape(engine.vmap_variants(functools.partial(engine.init_state, st=st), st, 0), keys)
    fn = engine.segment_program(st, length, mesh, base)
    args = (state, jax.ShapeDtypeStruct((), jnp.int32), keys, base, pool, var)
    return Program(fn, args, mesh, mc)


def for_platform(cfg, platform: str, dtype):
    """``cfg`` with its ``attention='auto'`` resolved for the target platform, not this host's backend (the
    compile is for TPU chips while jax's default backend here is the CPU)."""
    if getattr(cfg, "attention", None) != "auto":
        return cfg
    from jaxpoison.models.attention import resolve_attention
    return dataclasses.replace(cfg, attention=resolve_attention("auto", platform=platform, dtype=parse_dtype(dtype)))


def is_oom(e: Exception) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "exceeds available" in s or "Ran out of memory" in s


@contextlib.contextmanager
def no_persistent_cache():
    """Compile with jax's persistent compilation cache off, then give it back as it was.

    An executable for abstract chips can be neither loaded back from the cache (no client to load it into) nor
    safely serialised into it. Turning ``jax_enable_compilation_cache`` off is not enough: jax decides once per
    process whether the cache is used (``compilation_cache.is_cache_used``), so after any earlier compile (the
    fit check inside ``run``, a test session) the flag alone changes nothing. Resetting jax's cache state on the
    way in and out makes it decide again."""
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def compile_program(p: Program) -> Compiled:
    """Lower and compile (outside jax's persistent cache); XLA's out-of-memory verdict becomes ``Compiled.error``."""
    t = time.time()
    try:
        with no_persistent_cache(), (jax.set_mesh(p.mesh) if p.mesh is not None else contextlib.nullcontext()):
            lowered = p.fn.lower(*p.args, **p.kwargs)
            c = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only XLA's out-of-memory is a verdict, the rest is re-raised
        if not is_oom(e):
            raise
        msg = next((l for l in str(e).splitlines() if "exceeds" in l or "RESOURCE_EXHAUSTED" in l), str(e))
        return Compiled(seconds=time.time() - t, error=msg.strip()[:400])
    ma = c.memory_analysis()
    ca = c.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return Compiled(int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes),
                    int(ma.temp_size_in_bytes), int(getattr(ma, "peak_memory_in_bytes", 0) or 0),
                    float((ca or {}).get("flops", 0.0)), time.time() - t)
