"""LoRA adapters: configuration, initialisation, merge.

An adapter is a pytree ``{module: {"a": [L, in, r], "b": [L, r, out]}}`` (``lm_head``: ``[in, r]``,
``[r, out]``) that the decoder applies as ``x @ W + s * dropout(x) @ a @ b`` and never merges while training.
``a`` is drawn like PEFT's default (kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in))) and ``b`` is zero,
so a fresh adapter leaves the base model unchanged. The scale ``s`` is ``alpha / r`` (PEFT default) or
``alpha / sqrt(r)`` (rsLoRA). ``layers_from`` (``LoraConfig``) restricts training to the top layers: the tree
keeps its ``[L, ...]`` layout with rows below that layer exactly zero, and the training loss then runs the lower
layers without LoRA and without a backward pass (``decoder.hidden_lora_from``). Conventions differ between
codebases, so r, alpha, the scale rule and the targets travel with every checkpoint and every exported
``adapter_config.json``.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
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
    layers_from: int = 0          # LoRA only on layers >= this one (negative: counted from the top, -8 = top 8)

    def __post_init__(self):
        if isinstance(self.layers_from, bool) or not isinstance(self.layers_from, numbers.Integral):
            raise ValueError(f"LoraConfig.layers_from must be an int (a layer index; negative counts from the "
                             f"top), got {self.layers_from!r}")
        object.__setattr__(self, "layers_from", int(self.layers_from))
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

    def first_layer(self, num_layers: int) -> int:
        """``layers_from`` resolved against a model of ``num_layers`` layers: the index of the lowest layer that
        carries LoRA, in ``[0, num_layers)``. Raises a ValueError naming the field when out of range."""
        L, k = int(num_layers), self.layers_from
        if not -L <= k < L:
            raise ValueError(f"LoraConfig.layers_from={k} is out of range for a model with {L} layers: use "
                             f"0..{L - 1} (first layer with LoRA) or -{L}..-1 (that many layers from the top)")
        return k + L if k < 0 else k


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
    """A fresh adapter. With ``lcfg.layers_from`` resolving to ``k > 0``, rows ``[:k]`` of every layer module's
    ``a`` and ``b`` are exactly zero (the adapter is the identity there); rows ``[k:]`` are drawn exactly as
    without ``layers_from``. Training keeps those rows at zero: their gradient is zero on both the split and the
    plain decoder path, and AdamW (+ decoupled weight decay) maps a zero parameter with zero gradient to zero."""
    k = lcfg.first_layer(cfg.num_layers)
    tree = {}
    for i, m in enumerate(lcfg.targets):
        fan_in, fan_out = cfg.module_shape(m)
        lead = () if m == "lm_head" else (cfg.num_layers,)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), lead + (fan_in, lcfg.r), dtype, -bound, bound)
        if lead and k > 0:
            a = a.at[:k].set(0)
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
