"""Training configuration (frozen, hashable: it is a static argument of the jitted study program)."""
from __future__ import annotations

import dataclasses

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 2e-4
    schedule: str = "linear"        # decay after warmup: constant | linear (to 0) | cosine (to 0)
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0          # global-norm clipping; 0 disables
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    epochs: float = 2.0
    batch_size: int = 8             # examples per micro-batch
    grad_accum: int = 1             # micro-batches per optimiser update
    loss_norm: str = "token"        # token: mean over all loss tokens of the update; example: mean of per-example means
    head_chunk: int = 128           # sequence chunk of the lm_head / cross-entropy
    loss_budget: int = 0            # >0: compute the head only on this many loss positions per row (completion-only)
    dtype: str = "float32"
    remat: bool = False             # recompute layer activations in the backward pass (memory for compute)
    trunk_cache: bool = False       # with lora.layers_from = k > 0: run every pool row through layers [0, k) once
                                    # and train from those states (memory: rows x seq x hidden)
    variant_chunk: int = 0          # >0: run variants in sequential chunks of this size (memory)
    seed: int = 0
    save_every: int = 0             # steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    log_every: int = 10             # steps per jitted segment when no checkpoint interval is set (progress)
    tensorboard: bool = True        # also write RUN_DIR/tensorboard event files (one TensorBoard run per variant)

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.loss_norm not in ("token", "example"):
            raise ValueError(f"unknown loss_norm {self.loss_norm!r}: use 'token' or 'example'")
        for name in ("batch_size", "grad_accum", "head_chunk", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")

    @property
    def rows_per_update(self) -> int:
        return self.batch_size * self.grad_accum
