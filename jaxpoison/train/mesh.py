"""Device mesh and shardings of a study.

Axes (in this order): ``variant`` (the vmapped variant axis, through ``spmd_axis_name``: each device trains
its own variants, no collective crosses variants), ``data`` (each variant's batch), ``fsdp`` (the frozen base's
storage, gathered one layer at a time inside the layer scan; the batch splits over it too) and ``model``
(tensor parallelism of the base). Which tensor dimension goes over which axis is decided by the logical-axis
rules of :mod:`jaxpoison.models.sharding`; this module builds the mesh, the rules for it, and the shardings of
the study's inputs.

``MeshConfig`` fields are ints or ``'auto'``. :func:`resolve` turns ``auto`` into sizes: every local
accelerator is used, variants first (the study is embarrassingly parallel over them), then ``fsdp`` when the
base does not fit one chip's memory (``memory_stats()['bytes_limit']``; a backend that does not say is taken
as fitting), then ``data``. On CPU ``auto`` means one device: emulated CPU devices share the same cores and
memory, so splitting over them only adds collectives (give explicit sizes to test a mesh on CPU).

Axis types are given explicitly as Auto: jax 0.10 defaults ``make_mesh`` to Explicit axes, and this program
relies on GSPMD propagation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxpoison.models.sharding import DEFAULT_RULES, Rules, adapter_axes, param_axes

AXES = ("variant", "data", "fsdp", "model")
AUTO = "auto"
FIT_FRACTION = 0.5          # the base may take at most this share of a chip's memory before `auto` adds fsdp

Size = Union[int, str]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Devices per mesh axis (an int, or 'auto'); ``--set mesh.variant=8`` etc. on the command line."""
    variant: Size = AUTO
    data: Size = AUTO
    fsdp: Size = AUTO
    model: Size = AUTO

    def __post_init__(self):
        for name in AXES:
            v = getattr(self, name)
            if v != AUTO and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"mesh.{name} must be a positive int or 'auto', got {v!r}")

    @property
    def shape(self) -> tuple:
        if not self.resolved:
            raise ValueError(f"mesh {self} still has 'auto' axes: resolve() it first")
        return tuple(getattr(self, a) for a in AXES)

    @property
    def resolved(self) -> bool:
        return all(getattr(self, a) != AUTO for a in AXES)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def describe(self) -> str:
        return ", ".join(f"{a}={getattr(self, a)}" for a in AXES)


def device_bytes(device) -> Optional[int]:
    """The memory one device may use, when its backend says (``memory_stats()['bytes_limit']``)."""
    try:
        stats = device.memory_stats()
    except Exception:       # backends without memory stats
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _largest_divisor(n: int, of: int) -> int:
    """The largest d dividing ``n`` that also divides ``of``."""
    return math.gcd(n, of) if of > 0 else 1


def resolve(mc: MeshConfig, *, n_variants: int, batch_size: int, base_bytes: int = 0, devices=None) -> MeshConfig:
    """``mc`` with every 'auto' axis given a size (see the module docstring); explicit sizes are kept and
    checked against the device count, the variant count and the batch size, with errors that say what to set."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    fixed = {a: getattr(mc, a) for a in AXES if getattr(mc, a) != AUTO}
    used = int(np.prod(list(fixed.values()))) if fixed else 1
    if used > n or n % used:
        raise ValueError(f"mesh {mc.describe()} needs {used} devices, but {n} are present: the product of the mesh "
                         "sizes must divide the device count (on CPU, emulate more with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    auto_devices = n // used
    if devices[0].platform == "cpu":
        auto_devices = 1            # see the module docstring
    sizes = dict(fixed)
    left = auto_devices
    if "fsdp" not in sizes:
        sizes["fsdp"] = 1
        limit = device_bytes(devices[0])
        if limit and base_bytes > FIT_FRACTION * limit:
            need = math.ceil(base_bytes / (FIT_FRACTION * limit))
            f = next((d for d in range(need, left + 1) if left % d == 0), left)
            sizes["fsdp"], left = f, left // f
    if "variant" not in sizes:
        sizes["variant"] = _largest_divisor(left, n_variants)
        left //= sizes["variant"]
    if "data" not in sizes:
        sizes["data"] = _largest_divisor(left, batch_size)
        left //= sizes["data"]
    if "model" not in sizes:
        sizes["model"] = 1
    if left > 1 and mc.fsdp == AUTO:
        sizes["fsdp"] *= left       # what neither variants nor the batch can use stores the base
    out = MeshConfig(**sizes)
    check(out, n_variants=n_variants, batch_size=batch_size, n_devices=n)
    return out


def check(mc: MeshConfig, *, n_variants: int, batch_size: int, n_devices: Optional[int] = None) -> None:
    """Errors that name the mesh axis and what to set, for a mesh the study cannot use."""
    n_devices = len(jax.devices()) if n_devices is None else n_devices
    if mc.size > n_devices:
        raise ValueError(f"mesh {mc.describe()} needs {mc.size} devices, only {n_devices} present: lower the mesh "
                         "sizes (--set mesh.variant=...) (on CPU, emulate more with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    if n_variants % mc.variant:
        raise ValueError(f"{n_variants} variants (per chunk) do not split over a variant axis of {mc.variant}: set "
                         f"mesh.variant to a divisor of {n_variants}, or train.variant_chunk to a multiple of "
                         f"{mc.variant}")
    if batch_size % mc.data:
        raise ValueError(f"batch_size {batch_size} does not split over a data axis of {mc.data}: set mesh.data to "
                         f"a divisor of {batch_size}")


def make_mesh(mc: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """The jax mesh of a resolved ``mc`` over ``devices`` (default: the local ones; an abstract TPU topology's
    devices work too, for ahead-of-time compiles)."""
    devices = list(devices if devices is not None else jax.devices())
    if mc.size > len(devices):
        raise ValueError(f"mesh {mc.describe()} needs {mc.size} devices, only {len(devices)} present "
                         "(on CPU, emulate more with XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    arr = np.asarray(devices[:mc.size]).reshape(mc.shape)
    return jax.sharding.Mesh(arr, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_rules(mesh: jax.sharding.Mesh, pairs: tuple = DEFAULT_RULES) -> Rules:
    """The logical-axis rules for ``mesh`` (its axis sizes decide which splits divide which dims)."""
    return Rules(pairs, tuple((a, int(s)) for a, s in mesh.shape.items()))


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def base_shardings(mesh: jax.sharding.Mesh, abstract_base, rules: Optional[Rules] = None):
    """NamedSharding of every base leaf (arrays or ShapeDtypeStructs): stored over ``fsdp`` (and ``model``)
    by the rules; the sharded loader places arrays straight into these."""
    rules = rules or mesh_rules(mesh)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, rules.spec(param_axes(_path_names(p), x.ndim), x.shape)), abstract_base)


def variant_shardings(mesh: jax.sharding.Mesh, tree, rules: Optional[Rules] = None):
    """Per-variant leaves [V, ...] split over ``variant``; scalars replicated."""
    rules = rules or mesh_rules(mesh)
    rep = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: NamedSharding(mesh, rules.spec(("variant",), x.shape[:1])) if len(x.shape) >= 1 else rep, tree)


def state_shardings(mesh: jax.sharding.Mesh, abstract_state, rules: Optional[Rules] = None):
    """NamedSharding of every per-variant state leaf [V, ...]: the variant axis over ``variant``; LoRA leaves
    and their Adam moments (paths ending in ``module / a|b``) also over ``model`` where the base is tensor
    parallel (:func:`jaxpoison.models.sharding.adapter_axes`). The variant count is not looked at (chunks of
    any size that the ``variant`` axis divides share these shardings)."""
    rules = rules or mesh_rules(mesh)
    nv = dict(rules.sizes).get("variant", 1)

    def one(path, x):
        names = _path_names(path)
        if len(x.shape) == 0:
            return NamedSharding(mesh, P())
        rest = (None,) * (len(x.shape) - 1)
        if len(names) >= 2 and names[-1] in ("a", "b") and isinstance(names[-2], str):
            try:
                rest = adapter_axes(names[-2], names[-1], len(x.shape) - 1)
            except KeyError:
                pass
        return NamedSharding(mesh, rules.spec(("variant",) + rest, (nv,) + tuple(x.shape[1:])))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def replicated(mesh: jax.sharding.Mesh, tree):
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda _: rep, tree)
