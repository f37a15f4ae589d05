"""Where a study can run: TPU topologies (compiled for ahead of time) and GPUs (an analytic memory model).

A TPU target is a topology name as ``jax.experimental.topologies`` spells it (``v5e:2x4``, ``v4:2x2x1``,
``v5p:2x2x1``, ``v6e:2x2``) or a Cloud-style alias (``v5e-8``; for v4 and v5p the number counts TensorCores, two
per chip, so ``v4-8`` is four chips, as Cloud TPU names them). libtpu compiles for such a topology on a machine
with no TPU at all (MaxText's ``train_compile.py`` does the same): the chips are abstract devices, and XLA's
memory analysis, or its out-of-memory error, is the one a real slice would give.

Per-chip figures (public spec sheets of Cloud TPU and NVIDIA): HBM, and peak dense bf16 FLOP/s, which with a
stated MFU turns FLOPs into time. XLA:TPU keeps a little HBM for itself (v5e: "available HBM 15.75G" of 16 GiB).
GPUs: JAX preallocates ``XLA_PYTHON_CLIENT_MEM_FRACTION`` (default 0.75) of memory; the planner counts 0.9 of
it usable and says so, so a run should set ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9``.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                 # v5e, h100-80gb ...
    platform: str             # tpu | gpu
    hbm_bytes: int
    peak_flops: float         # dense bf16 FLOP/s per chip
    chip_config: str = "default"    # libtpu chip config: v4 and v5p chips are one 'megacore' device
    usable: float = 1.0       # share of hbm_bytes a program may use (GPU: the preallocated fraction)


TPU_CHIPS = {
    "v4": Chip("v4", "tpu", 32 * GiB, 275e12, "megacore"),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, usable=15.75 / 16),    # XLA: "available HBM 15.75G"
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, "megacore"),
    "v6e": Chip("v6e", "tpu", 32 * GiB, 918e12),
}
GPU_CHIPS = {
    "a100-80gb": Chip("a100-80gb", "gpu", 80 * GiB, 312e12, usable=0.9),
    "h100-80gb": Chip("h100-80gb", "gpu", 80 * GiB, 989e12, usable=0.9),
    "h200": Chip("h200", "gpu", 141 * 10**9, 989e12, usable=0.9),
}
_CORES_PER_CHIP = {"v4": 2, "v5p": 2}          # Cloud names v4-N / v5p-N count TensorCores
# chips -> the slice shape Cloud TPU gives for that many chips
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8"}


@dataclasses.dataclass(frozen=True)
class Target:
    """One machine the planner sizes a study for: ``chips`` of one ``chip`` kind."""
    name: str                 # as the user wrote it
    chip: Chip
    chips: int
    topology: str = ""        # TPU: the jax topology name (v5e:2x4); GPU: ''

    @property
    def platform(self) -> str:
        return self.chip.platform

    @property
    def usable_bytes(self) -> int:
        return int(self.chip.hbm_bytes * self.chip.usable)


def tpu_target(name: str) -> Target:
    """``v5e:2x4`` or ``v5e-8`` -> a Target; errors list what is known."""
    s = name.strip().lower()
    m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", s)
    if m:
        kind, n = m.group(1), int(m.group(2))
        if kind not in TPU_CHIPS:
            raise ValueError(f"unknown TPU kind {kind!r} in {name!r}: known are {', '.join(TPU_CHIPS)}")
        cores = _CORES_PER_CHIP.get(kind, 1)
        if n % cores:
            raise ValueError(f"{name!r}: {kind}-N counts TensorCores ({cores} per chip), so N must be even")
        chips = n // cores
        shapes = _SHAPES_3D if kind in ("v4", "v5p") else _SHAPES_2D
        if chips not in shapes:
            raise ValueError(f"{name!r}: no standard {kind} slice of {chips} chips; give the topology itself, "
                             f"e.g. {kind}:{next(iter(shapes.values()))}")
        s = f"{kind}:{shapes[chips]}"
    m = re.fullmatch(r"(v\d+[a-z]?):(\d+(?:x\d+){1,2})", s)
    if not m or m.group(1) not in TPU_CHIPS:
        raise ValueError(f"unknown TPU topology {name!r}: give one as jax names it (v5e:2x2, v5e:2x4, v4:2x2x1, "
                         f"v5p:2x2x1, v6e:2x2) or an alias like v5e-8 / v4-8; chips known: {', '.join(TPU_CHIPS)}")
    dims = [int(x) for x in m.group(2).split("x")]
    chips = 1
    for d in dims:
        chips *= d
    return Target(name, TPU_CHIPS[m.group(1)], chips, s)


def gpu_target(name: str, count: int = 1) -> Target:
    s = name.strip().lower()
    if s not in GPU_CHIPS:
        raise ValueError(f"unknown GPU {name!r}: known are {', '.join(GPU_CHIPS)}")
    if count < 1:
        raise ValueError(f"--gpus must be >= 1, got {count}")
    return Target(name, GPU_CHIPS[s], count)


def abstract_devices(t: Target):
    """The abstract TPU devices of a topology (libtpu, no TPU needed)."""
    import os
    from jax.experimental import topologies
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")     # plans may run side by side (libtpu's lockfile)
    dims = [int(x) for x in t.topology.split(":")[1].split("x")]
    dims = (dims + [1])[:3]
    host = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=t.topology,
                                            chip_config_name=t.chip.chip_config, chips_per_host_bounds=host).devices
    except Exception as e:   # libtpu missing, or a topology libtpu refuses
        raise RuntimeError(f"cannot build the TPU topology {t.topology!r} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]}); ahead-of-time compilation needs libtpu "
                           f"(`pip install \"jax[tpu]==0.10.2\"`)") from None


def parse_target(topology: Optional[str], device: Optional[str], gpus: int = 1) -> Target:
    if topology and device:
        raise ValueError("give --topology (a TPU slice) or --device (a GPU), not both")
    if device:
        return gpu_target(device, gpus)
    return tpu_target(topology or "v5e-8")
