"""LoRA adapters: configuration, initialisation, merge.

An adapter is a pytree ``{module: {"a": [L, in, r], "b": [L, r, out]}}`` (``lm_head``: ``[in, r]``,
``[r, out]``) that the decoder applies as ``x @ W + s * dropout(x) @ a @ b`` and never merges while training.
``a`` is drawn like PEFT's default (kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in))) and ``b`` is zero,
so a fresh adapter leaves the base model unchanged. The scale ``s`` is ``alpha / r`` (PEFT default) or
``alpha / sqrt(r)`` (rsLoRA). Conventions differ between codebases, so r, alpha, the scale rule and the targets
travel with every checkpoint and every exported ``adapter_config.json``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxpoison.models.config import LINEAR_MODULES, ModelConfig

ALL_TARGETS = LINEAR_MODULES + ("lm_head",)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple = ("q", "v")
    scale_rule: str = "alpha/r"   # or "rslora" (alpha / sqrt(r))

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.scale_rule not in ("alpha/r", "rslora"):
            raise ValueError(f"unknown LoRA scale_rule {self.scale_rule!r}: use 'alpha/r' or 'rslora'")
        object.__setattr__(self, "targets", tuple(resolve_targets(self.targets)))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.scale_rule == "rslora" else self.r)


def resolve_targets(targets) -> list[str]:
    """Module names from names, HF names (q_proj, gate_proj ...), 'all-linear', or regexes over those names."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out = []
    for t in targets:
        t = {"all-linear": "all", "all_linear": "all"}.get(t, t)
        if t == "all":
            out.extend(LINEAR_MODULES)
            continue
        name = re.sub(r"_proj$", "", t)
        if name in ALL_TARGETS:
            out.append(name)
            continue
        hits = [m for m in ALL_TARGETS if re.fullmatch(t, m) or re.fullmatch(t, f"{m}_proj")]
        if not hits:
            raise ValueError(f"LoRA target {t!r} matches no module: choose from {', '.join(ALL_TARGETS)}, "
                             "'all-linear', or a regex over those names")
        out.extend(hits)
    return [m for m in ALL_TARGETS if m in set(out)]


def init_lora(key: jax.Array, cfg: ModelConfig, lcfg: LoraConfig, dtype=jnp.float32) -> dict:
    tree = {}
    for i, m in enumerate(lcfg.targets):
        fan_in, fan_out = cfg.module_shape(m)
        lead = () if m == "lm_head" else (cfg.num_layers,)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), lead + (fan_in, lcfg.r), dtype, -bound, bound)
        tree[m] = {"a": a, "b": jnp.zeros(lead + (lcfg.r, fan_out), dtype)}
    return tree


def delta(lora: dict, scale: float, module: str) -> jax.Array:
    """The dense update s * a @ b of one module ([L, in, out], or [in, out] for lm_head)."""
    return scale * jnp.einsum("...ir,...ro->...io", lora[module]["a"], lora[module]["b"])


def merge(params: dict, lora: dict, scale: float) -> dict:
    """Base params with the adapter folded in (export, analysis). Training never merges."""
    out = jax.tree.map(lambda x: x, params)
    for m in lora:
        if m == "lm_head":
            if "lm_head" not in params:
                raise ValueError("cannot merge an lm_head adapter into tied embeddings; untie first")
            out["lm_head"] = {"kernel": params["lm_head"]["kernel"] + delta(lora, scale, m)}
        else:
            layer = dict(out["layers"][m])
            layer["kernel"] = params["layers"][m]["kernel"] + delta(lora, scale, m).astype(layer["kernel"].dtype)
            out["layers"] = {**out["layers"], m: layer}
    return out


def num_params(lora: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(lora))


def stack_variants(trees: Sequence[dict]) -> dict:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
