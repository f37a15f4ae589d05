"""A study config -> the shapes of its training program, without data, tokenizer or weights.

What a study's data would decide is bounded from its config instead, so a plan is an upper bound on the run:
sequences are ``max_len`` long (a run pads its pool to the longest row's bucket, at most ``max_len``), a
completion-only loss budget of ``-1`` (resolved from the data at run time) counts every position, and the
rationale grid's target-subject pool holds the fewest examples the grid can be built from. Row counts per
variant, and so optimiser steps, follow exactly from the grid (the same ``mix_specs`` / ``resolve`` the study
uses), which is what the chip-hours rest on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from jaxpoison.models.config import ModelConfig
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig


@dataclasses.dataclass(frozen=True)
class StudyShape:
    model: str                  # the --model spec
    cfg: ModelConfig
    source: str                 # where cfg's numbers came from
    dtype: str                  # base/compute dtype
    tcfg: TrainConfig           # loss_budget resolved to a number
    lcfg: LoraConfig
    steps: tuple                # optimiser updates of each variant, in variant order
    pool_rows: int              # R of the token pool [R, T]
    seq_len: int                # T
    max_rows: int               # M: rows of the largest variant
    quant: str = ""             # '' or the quantised base kind (the study config's `quant`)
    mesh: Any = None            # the study config's `mesh` section, if it has one

    @property
    def variants(self) -> int:
        return len(self.steps)

    @property
    def chunk(self) -> int:
        """Variants per chunk: train.variant_chunk, or all of them (0)."""
        c = self.tcfg.variant_chunk
        return self.variants if not c or c >= self.variants else c


def _updates(rows: int, tcfg: TrainConfig) -> int:
    upe = max(-(-rows // tcfg.rows_per_update), 1)
    return int(np.ceil(upe * tcfg.epochs))


def _budget(tcfg: TrainConfig, T: int) -> TrainConfig:
    if tcfg.loss_budget < 0 or tcfg.loss_budget >= T:
        return dataclasses.replace(tcfg, loss_budget=0)     # every position (the upper bound)
    return tcfg


def rationale_shape(cfg) -> dict:
    from jaxpoison.data.mixes import resolve
    from jaxpoison.studies.rationale.grid import mix_specs
    g, d = cfg.grid, cfg.data
    need = [*g.counts, g.clean_with_target or 0]
    for c in g.counts:
        need += [c + round(c * (1 - r) / r) for r in g.ratios_target]
    n_target = max(need + [1])
    n_non = max(d.n_nontarget_pool or 0, d.n_nontarget + max(g.forgetting_extra, default=0),
                d.n_nontarget + max(g.decoy_counts, default=0),      # decoy rows come from beyond the clean mix
                d.n_nontarget * max(g.forgetting_steps, default=1),  # forgetting at k x the clean mix's rows
                max([round(c / r) - c for r in g.ratios_all for c in g.counts], default=0))
    specs = mix_specs(cfg, n_target, n_non)
    rows = []
    for s in specs:
        r = resolve(s, n_target, n_non)
        rows.append(r.poison_count + r.n_correct_target + r.n_nontarget)
    rows = [r for r in rows for _ in cfg.grid.seeds]        # variants: cells x seeds (seed-major order aside)
    versions = 1 + ("rationale" in g.kinds or bool(g.ratios_all)) + ("overwrite" in g.kinds)
    return {"rows": rows, "pool_rows": n_non + versions * n_target, "T": d.max_len}


def attacks_shape(cfg) -> dict:
    n = cfg.notes.n_train
    para = len(getattr(cfg.grid, "paraphrase", (False,)))
    V = len(cfg.prompt.tasks) * len(cfg.grid.fractions) * len(cfg.grid.seeds) * para
    return {"rows": [n] * V, "pool_rows": 2 * n * len(cfg.prompt.tasks) * para, "T": cfg.max_len}


SHAPES = {"rationale": rationale_shape, "attacks": attacks_shape}


def study_shape(cfg, model_cfg: Optional[ModelConfig] = None, source: str = "") -> StudyShape:
    """The training program's shapes for a study config (``model_cfg``: skip the config.json lookup)."""
    from .known_models import model_config
    if cfg.study not in SHAPES:
        raise ValueError(f"the planner knows the studies {', '.join(SHAPES)}, not {cfg.study!r}")
    if model_cfg is None:
        model_cfg, source = model_config(cfg.model)
    s = SHAPES[cfg.study](cfg)
    T = -(-int(s["T"]) // 16) * 16
    tcfg = _budget(dataclasses.replace(cfg.train, dtype=cfg.train.dtype), T)
    steps = tuple(_updates(r, tcfg) for r in s["rows"])
    return StudyShape(cfg.model, model_cfg, source, cfg.dtype, tcfg, cfg.lora, steps, int(s["pool_rows"]), T,
                      int(max(s["rows"])), _quant(cfg), getattr(cfg, "mesh", None))


def _quant(cfg) -> str:
    q = str(getattr(cfg, "quant", "") or "")
    return "" if q == "none" else q


def chunk_steps(steps, chunk: int, grouped: bool = True) -> list:
    """Steps each chunk runs: variants sorted by step count (grouped) or in order, ``chunk`` at a time; a chunk
    runs as long as its longest variant, and a short last chunk is padded to ``chunk`` (one compiled shape)."""
    s = sorted(steps) if grouped else list(steps)
    return [max(s[i:i + chunk]) for i in range(0, len(s), chunk)]
