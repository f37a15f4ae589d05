"""Logical axis names and the rules that map them to mesh axes (the MaxText ``logical_axis_rules`` style).

Code names what a dimension *is* (``batch``, ``embed``, ``mlp``, ``heads``, ``vocab``, ``layers``); a
:class:`Rules` record says which mesh axes split each name. The model never mentions a mesh: it calls
:func:`constrain` on activations and on the per-layer slice of each weight, and that is a no-op when no rules
are given, so the single-device program is exactly the unsharded one.

Weights and activations use different names for the same width: a weight's ``embed`` dimension is split over
``fsdp`` (storage: no device holds the whole base), an activation's ``act_embed`` is not. Inside the layer scan
a layer's weights are constrained to their *gathered* spec (the weight's spec with ``fsdp`` removed), so XLA
all-gathers one layer at a time over ``fsdp`` and keeps the ``model`` split (tensor parallelism: column-parallel
q/k/v/gate/up, row-parallel o/down, as Megatron does).

A mesh axis is dropped from a dimension it does not divide (a vocabulary of 97 is not split over 2 devices),
so a rule is a preference, never an error; GSPMD keeps the maths the same whatever the placement.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"

# (logical name, mesh axis | tuple of mesh axes | None). The first rule naming a logical axis wins.
DEFAULT_RULES = (
    # activations
    ("act_batch", ("data", "fsdp")),    # each variant's batch: over data, and over fsdp (ZeRO-3 style)
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_kv_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    # weights of the frozen base
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("vocab", "model"),
    ("norm", None),
    # per-variant state (the vmapped axis)
    ("variant", "variant"),
)

# logical names of a base leaf, by module (layer dims first). Column-parallel modules split their output over
# `model`, row-parallel ones their input; every weight's hidden-size dim is stored over `fsdp`.
_LAYER_KERNELS = {
    "q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical-to-mesh rules plus the mesh's axis sizes (hashable: a static argument of jitted programs)."""
    pairs: tuple = DEFAULT_RULES
    sizes: tuple = ()                    # ((mesh axis, size), ...)

    def _axes(self, name: Optional[str]) -> tuple:
        if name is None:
            return ()
        for logical, mesh_axes in self.pairs:
            if logical == name:
                if mesh_axes is None:
                    return ()
                return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        raise ValueError(f"logical axis {name!r} has no rule; rules name {', '.join(p[0] for p in self.pairs)}")

    def spec(self, names: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None,
             drop: Sequence[str] = ()) -> P:
        """The PartitionSpec of a tensor whose dims carry ``names``. With ``shape``, a mesh axis that does not
        divide its dim (what is left of it) is skipped; axes of size 1, axes in ``drop``, and axes already
        used by an earlier dim are skipped too."""
        size = dict(self.sizes)
        used, out = set(drop), []
        for d, name in enumerate(names):
            kept, n = [], 1
            for ax in self._axes(name):
                s = size.get(ax, 1)
                if ax in used or s == 1:
                    continue
                if shape is not None and shape[d] % (n * s):
                    continue
                kept.append(ax)
                used.add(ax)
                n *= s
            out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def gathered(self, names: Sequence[Optional[str]], shape: Optional[Sequence[int]] = None) -> P:
        """A weight as a layer uses it: its spec without the ``fsdp`` split (tensor parallelism stays)."""
        return self.spec(names, shape, drop=(FSDP,))


def constrain(x, names: Sequence[Optional[str]], rules: Optional[Rules], gathered: bool = False):
    """``with_sharding_constraint`` of x to the spec of ``names`` under ``rules`` (the current mesh, from
    ``jax.set_mesh``); x unchanged when ``rules`` is None. Inside ``vmap(..., spmd_axis_name=...)`` the vmapped
    axis is added by jax. ``x`` may be a pytree (a quantised kernel): each leaf gets ``names`` cut or padded
    to its own ndim."""
    if rules is None:
        return x
    to_spec = rules.gathered if gathered else rules.spec

    def one(leaf):
        n = (tuple(names) + (None,) * leaf.ndim)[:leaf.ndim]
        return jax.lax.with_sharding_constraint(leaf, to_spec(n, leaf.shape))

    return jax.tree.map(one, x)


def layer_kernel_axes(module: str) -> tuple:
    """Logical names of one layer's kernel [in, out] (no layer dim)."""
    return _LAYER_KERNELS[module]


def param_axes(path: Sequence[str], ndim: int) -> tuple:
    """Logical names of the base leaf at ``path`` (e.g. ``("layers", "q", "kernel")``) with ``ndim`` dims.

    A leaf *under* a kernel (a quantised kernel is a small pytree whose leaves keep the kernel's leading dims)
    gets the kernel's names, cut or padded with None to its own ndim."""
    path = tuple(path)
    names: tuple
    if path[0] == "layers" and len(path) >= 3 and path[1] in _LAYER_KERNELS and path[2] == "kernel":
        names = ("layers",) + _LAYER_KERNELS[path[1]]
    elif path[0] == "layers" and len(path) >= 3 and path[1] in _LAYER_KERNELS and path[2] == "bias":
        names = ("layers", _LAYER_KERNELS[path[1]][1])
    elif path[0] == "layers":
        names = ("layers", "norm")
    elif path[0] == "embed":
        names = ("vocab", "embed")
    elif path[0] == "lm_head":
        names = ("embed", "vocab")
    else:
        names = ("norm",)
    return (names + (None,) * ndim)[:ndim]


def adapter_axes(module: str, leaf: str, ndim: int) -> tuple:
    """Logical names of a LoRA leaf (``a`` [L, in, r] / ``b`` [L, r, out]; ``lm_head``'s without L) and of
    its optimiser moments: the side a tensor-parallel base splits over ``model`` is split the same way, so
    ``x @ a @ b`` stays local to each ``model`` shard; the hidden-size side is not stored over ``fsdp`` (an
    adapter is small, and its update would need it whole)."""
    k_in, k_out = ("embed", "vocab") if module == "lm_head" else _LAYER_KERNELS[module]
    side = (k_in, None) if leaf == "a" else (None, k_out)
    side = tuple(None if n == "embed" else n for n in side)
    return ((("layers",) if module != "lm_head" else ()) + side)[-ndim:] if ndim else ()
