"""Shared pieces of the benchmarks: matmul peak, model FLOPs utilisation, alternating timing, memory, output, the
transformers reference.

* ``matmul_peak_jax`` / ``matmul_peak_torch``: GFLOP/s of a square fp32 matmul (4096² by default), the ceiling a
  model's matmuls can reach on this machine; both libraries are measured because each links its own BLAS.
* FLOPs per token: ``2 × cfg.matmul_params()`` for a scored token (forward only), ``4 ×`` for a LoRA training
  token (forward + the backward pass to the activations; the frozen base gets no weight gradient).
* ``alternate``: runs each contender once per round, in turn, and returns per-contender median and best, so a
  slow spell of the shared machine hits every contender alike.
* ``RssPeak``: the peak resident memory of the process while a block runs (a sampling thread), since torch on
  CPU keeps no allocator statistics and XLA's only account is the compiled program's own.
* ``emit``: one JSON line on stdout, the form every ``bench`` command prints.
* ``torch_reference_model``: transformers' PyTorch model holding our weights, the reference the forward and
  training benchmarks time against.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import threading
import time
from typing import Any, Callable, Mapping


def best_time(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak_jax(n: int = 4096, reps: int = 3) -> float:
    """GFLOP/s of an fp32 ``[n, n] @ [n, n]`` under jit (best of ``reps``)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    return 2 * n ** 3 / best_time(lambda: f(a, b).block_until_ready(), reps) / 1e9


def matmul_peak_torch(n: int = 4096, reps: int = 3, threads: int | None = None) -> float:
    """GFLOP/s of an fp32 ``[n, n] @ [n, n]`` in torch (best of ``reps``)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    return 2 * n ** 3 / best_time(lambda: torch.matmul(a, b, out=out), reps) / 1e9


def forward_flops_per_token(cfg) -> int:
    """Matmul FLOPs of scoring one token (the lm_head included, tied or not)."""
    return 2 * cfg.matmul_params()


def lora_train_flops_per_token(cfg) -> int:
    """Matmul FLOPs of one LoRA training token: forward + activation gradients (no base weight gradient)."""
    return 4 * cfg.matmul_params()


def mfu(tokens_per_s: float, flops_per_token: float, peak_gflops: float) -> float:
    """Achieved matmul FLOP/s as a fraction of the measured peak."""
    return tokens_per_s * flops_per_token / (peak_gflops * 1e9)


def alternate(contenders: Mapping[str, Callable[[], Any]], rounds: int = 5, warmup: int = 1) -> dict:
    """Time each contender once per round, in turn; returns ``{name: {"median", "best", "times"}}`` in seconds.

    Each callable must block until its work is done. ``warmup`` untimed rounds come first (compilation, caches).
    """
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        # reverse the order every other round so neither contender always runs right after the other
        names = list(contenders) if r % 2 == 0 else list(reversed(list(contenders)))
        for name in names:
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median": statistics.median(ts), "best": min(ts), "times": ts} for name, ts in times.items()}


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssPeak:
    """``with RssPeak() as m: ...`` then ``m.peak`` (bytes) and ``m.growth`` (peak minus resident at entry)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start


def mib(n_bytes: float) -> float:
    return round(n_bytes / 2 ** 20, 1)


def emit(record: Mapping[str, Any], file=None) -> str:
    """Print ``record`` as ONE JSON line (floats rounded to 4 significant digits) and return the line."""
    def rnd(x):
        if isinstance(x, float):
            return float(f"{x:.4g}")
        if isinstance(x, dict):
            return {k: rnd(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [rnd(v) for v in x]
        return x

    line = json.dumps(rnd(dict(record)), separators=(", ", ": "))
    print(line, file=file or sys.stdout, flush=True)
    return line


def torch_reference_model(cfg, params):
    """transformers' PyTorch ``*ForCausalLM`` for the model config ``cfg`` holding ``params`` (the reference the
    forward and training benchmarks time against; only lm_head may be missing: it is tied)."""
    import torch
    import transformers

    from jaxpoison.models.hf import to_hf_state_dict

    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
               "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}
    if cfg.model_type not in classes:
        raise ValueError(f"no transformers reference for model_type {cfg.model_type!r}; the benchmarks compare "
                         f"against {sorted(classes)}: pick a model of one of those families")
    cls = classes[cfg.model_type]
    rope_scaling = None
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                        "high_freq_factor": rs.high_freq_factor,
                        "original_max_position_embeddings": rs.original_max_position_embeddings}
    hf_cfg = cls[0](vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                    num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                    num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                    rope_theta=cfg.rope_theta, rope_scaling=rope_scaling,
                    max_position_embeddings=cfg.max_position_embeddings,
                    tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype="float32")
    model = cls[1](hf_cfg).eval()
    sd = {k: torch.tensor(v) for k, v in to_hf_state_dict(params, cfg).items()}
    res = model.load_state_dict(sd, strict=False)
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    if set(res.missing_keys) - allowed or res.unexpected_keys:
        raise RuntimeError(f"weights did not fit transformers' model: missing {res.missing_keys}, "
                           f"unexpected {res.unexpected_keys}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model
