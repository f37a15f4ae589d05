"""Seed 003's weight-scaling mitigation, vectorised over the whole (s_A, s_B) grid, and its two-sided table.

Seed 003 shrank the LoRA factors element-wise, ``W * (1 - s * exp(-|W|))``, on q_proj A and B of a poisoned
adapter over s_A in {0.02, 0.04, 0.06} x s_B in {0.04, 0.08, 0.16}, and measured only the attack. Since
|W| ~ 0.01 the factor is ~(1 - s): close to a uniform shrink of dW by (1 - s_A)(1 - s_B), i.e. a smaller
LoRA scale. Shrinking an update also shrinks what it taught, so every grid point must be scored for general
capability too; :func:`mitigation_table` pairs the two and marks the grid points no other point beats on both.

Why these choices:

* :func:`shrink_grid` returns one LoRA tree with a leading grid axis [G, ...] (G = len(s_a) * len(s_b),
  s_A-major), the layout the engine's ``jax.vmap`` over variants already takes, so the caller evaluates every
  grid point in one program. Untouched modules are repeated along the grid axis so the tree is uniform, or,
  with ``repeat_rest=False``, left as they are for a caller that vmaps them with ``in_axes=None``.
* The heatmap axes carry the factors actually applied (the seed's plot divided them by 1000 instead of 100,
  labelling them 10x too small).
* Include 0 in ``s_a`` / ``s_b`` to get the unscaled adapter as a grid point (the seed's cell (0, 0)); the
  table then reports every point's change relative to it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.eval.stats import seed_summary

SEED_S_A = (0.02, 0.04, 0.06)
SEED_S_B = (0.04, 0.08, 0.16)
SEED_MODULES = ("q",)


def shrink(w, s):
    """Seed 003's ``adjust_matrix``: ``W * (1 - s * exp(-|W|))`` element-wise (s broadcasts)."""
    return w * (1.0 - s * jnp.exp(-jnp.abs(w)))


def grid_points(s_a: Sequence[float] = SEED_S_A, s_b: Sequence[float] = SEED_S_B) -> np.ndarray:
    """[G, 2] (s_A, s_B) pairs, s_A-major: the order of :func:`shrink_grid`'s leading axis."""
    a, b = np.meshgrid(np.asarray(s_a, float), np.asarray(s_b, float), indexing="ij")
    return np.stack([a.ravel(), b.ravel()], 1)


def shrink_grid(lora: dict, s_a: Sequence[float] = SEED_S_A, s_b: Sequence[float] = SEED_S_B,
                modules: Optional[Sequence[str]] = None, repeat_rest: bool = True) -> dict:
    """The adapter(s) shrunk at every grid point: each leaf gets a leading axis [G] (see :func:`grid_points`).

    ``a`` tensors of ``modules`` (default: every module in ``lora``; the seed used :data:`SEED_MODULES`) are
    shrunk by s_A, ``b`` tensors by s_B; other modules are repeated unchanged along the grid axis (or returned
    without it if ``repeat_rest`` is False)."""
    grid = jnp.asarray(grid_points(s_a, s_b), jnp.float32)
    chosen = set(lora if modules is None else modules)
    missing = chosen - set(lora)
    if missing:
        raise ValueError(f"modules {sorted(missing)} are not in the adapter (it has {sorted(lora)})")
    out = {}
    for m, t in lora.items():
        if m in chosen:
            out[m] = _shrink_module(t, grid)
        elif repeat_rest:
            out[m] = {k: jnp.broadcast_to(v, (len(grid),) + jnp.shape(v)) for k, v in t.items()}
        else:
            out[m] = t
    return out


@jax.jit
def _shrink_module(t: dict, grid):
    def one(point):
        return {"a": shrink(t["a"], point[0]), "b": shrink(t["b"], point[1])}
    return jax.vmap(one)(grid)


def mitigation_table(grid, attack_metric, capability_metric, attack_lower_is_better: bool = True,
                     confidence: float = 0.95) -> list:
    """Rows (one per grid point) pairing the attack effect with general capability.

    ``attack_metric`` and ``capability_metric`` are [G] or [G, ...]; trailing axes are replicates (seeds,
    variants) summarised by mean and t interval. Columns: s_a, s_b, attack (+ low/high, n), capability
    (+ low/high, n), their changes from the unscaled point (0, 0) when the grid has it, and ``pareto``: no other
    point is at least as good on both and better on one (attack lower -- or higher if
    ``attack_lower_is_better`` is False -- and capability higher)."""
    grid = np.asarray(grid, float)
    g = len(grid)
    summaries = {}
    for name, metric in (("attack", attack_metric), ("capability", capability_metric)):
        m = np.asarray(metric, float)
        if m.shape[0] != g:
            raise ValueError(f"{name}_metric has {m.shape[0]} grid points, the grid {g}")
        m = m.reshape(g, -1)
        if m.shape[1] == 1:
            summaries[name] = (m[:, 0], np.full(g, np.nan), np.full(g, np.nan), np.ones(g, int))
        else:
            s = seed_summary(m)
            summaries[name] = (np.asarray(s.mean), np.asarray(s.low), np.asarray(s.high), np.asarray(s.n))
    attack, capability = summaries["attack"][0], summaries["capability"][0]
    better_attack = -attack if attack_lower_is_better else attack
    dominated = np.array([np.any((better_attack >= better_attack[i]) & (capability >= capability[i])
                                 & ((better_attack > better_attack[i]) | (capability > capability[i])))
                          for i in range(g)])
    base = np.flatnonzero((grid[:, 0] == 0) & (grid[:, 1] == 0))
    rows = []
    for i in range(g):
        row = {"s_a": grid[i, 0], "s_b": grid[i, 1]}
        for name, (mean, low, high, n) in summaries.items():
            row.update({name: float(mean[i]), f"{name}_low": float(low[i]), f"{name}_high": float(high[i]),
                        f"{name}_n": int(n[i])})
            row[f"{name}_change"] = float(mean[i] - mean[base[0]]) if base.size else np.nan
        row["pareto"] = bool(np.isfinite(attack[i]) and np.isfinite(capability[i]) and not dominated[i])
        rows.append(row)
    return rows


def as_heatmap(rows: Sequence[dict], column: str) -> tuple:
    """(s_a values, s_b values, [len(s_a), len(s_b)] array) of one table column, for the plots."""
    s_a = np.unique([r["s_a"] for r in rows])
    s_b = np.unique([r["s_b"] for r in rows])
    out = np.full((len(s_a), len(s_b)), np.nan)
    for r in rows:
        out[np.searchsorted(s_a, r["s_a"]), np.searchsorted(s_b, r["s_b"])] = r[column]
    return s_a, s_b, out
