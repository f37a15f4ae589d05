"""Device mesh and shardings of a study.

Axes: ``variant`` (the vmapped variant axis, through ``spmd_axis_name``), ``data`` (each variant's batch) and
``model`` (the base weights, for bases too large for one device). Axis types are given explicitly as Auto:
jax 0.10 defaults ``make_mesh`` to Explicit axes, and this program relies on GSPMD propagation.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("variant", "data", "model")
# kernels whose output dim is split over `model` (column parallel) vs their input dim (row parallel)
_COLUMN = ("q", "k", "v", "gate", "up")
_ROW = ("o", "down")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    variant: int = 1
    data: int = 1
    model: int = 1

    @property
    def shape(self) -> tuple:
        return (self.variant, self.data, self.model)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def make_mesh(mc: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if mc.size > len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, mc.shape))} needs {mc.size} devices, only {len(devices)} present "
                         "(on CPU, emulate more with XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    arr = np.asarray(devices[:mc.size]).reshape(mc.shape)
    return jax.sharding.Mesh(arr, AXES, axis_types=(AxisType.Auto,) * 3)


def base_spec(path: tuple, ndim: int, mc: MeshConfig) -> P:
    if mc.model == 1:
        return P()
    if path[0] == "layers" and path[-1] == "kernel":
        if path[1] in _COLUMN:
            return P(None, None, "model")
        if path[1] in _ROW:
            return P(None, "model", None)
    if path[0] == "layers" and path[-1] == "bias" and path[1] in _COLUMN:
        return P(None, "model")
    return P()


def study_shardings(mesh, mc: MeshConfig, state, base, data, pool_keys):
    """(state, base, data) shardings: per-variant leaves split over `variant`, the pool replicated."""
    v = NamedSharding(mesh, P("variant"))
    rep = NamedSharding(mesh, P())
    s_state = jax.tree.map(lambda x: v if getattr(x, "ndim", 0) >= 1 else rep, state)
    s_base = jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, base_spec(tuple(k.key for k in p), x.ndim, mc)), base)
    s_data = {k: (rep if k in pool_keys else v) for k in data}
    return s_state, s_base, s_data
