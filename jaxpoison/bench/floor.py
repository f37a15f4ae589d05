"""The matmul floor: how fast a step could possibly run on this machine if it were nothing but its matmuls.

A LoRA training token costs ``4 × matmul params`` FLOPs (the forward dots and the backward dots that carry the
gradient to the activations) and a scored token ``2 ×``; the MFU figures count exactly these. The floor runs
those same dots, at the model's real shapes and the benchmark's real row count, chained layer by layer (each
dot's output feeds the next, so nothing can be skipped), with no attention, norm, softmax, optimiser or
bookkeeping between them: the time of a perfect implementation that only did the counted work. It is measured
in the benchmark's own process, for XLA (the library's dots) and for torch (its BLAS), so a goal can be set
against what the machine allows: a contender at 0.9 of the floor has 10 % left to win, whatever the peak.
"""
from __future__ import annotations

import numpy as np

from .common import best_time


def _layer_shapes(cfg):
    D, F = cfg.hidden_size, cfg.intermediate_size
    Hq, Hkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": (D, Hq), "k": (D, Hkv), "v": (D, Hkv), "o": (Hq, D), "gate": (D, F), "up": (D, F), "down": (F, D)}


def _weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32) for n, s in _layer_shapes(cfg).items()}


def _head_blocks(cfg, block=1536):
    """[n_blocks, D, block]: the lm_head in vocabulary blocks, as the chunked cross-entropy walks it. Each block
    is its own array, so no block's matmul is loop-invariant (XLA hoists a loop-invariant dot out of the scan and
    runs it once: the floor of session 3 did that, and undercounted the head 32-fold)."""
    rng = np.random.default_rng(1)
    nb = max(1, cfg.vocab_size // block)
    return (rng.standard_normal((nb, cfg.hidden_size, block)) / np.sqrt(cfg.hidden_size)).astype(np.float32)


def _jax_program(cfg, rows: int, backward: bool, head: bool):
    """(timed callable, jitted program, its arguments). Weights are arguments, as in the real step (constants
    would let XLA specialise on them)."""
    import jax
    import jax.numpy as jnp

    args = ({k: jnp.asarray(v) for k, v in _weights(cfg).items()}, jnp.asarray(_head_blocks(cfg)),
            jnp.asarray(np.random.default_rng(2).standard_normal((rows, cfg.hidden_size)).astype(np.float32)))

    @jax.jit
    def run(w, wh, x):
        def layer(h, _):
            q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
            o = q @ w["o"]
            g, u = o @ w["gate"], o @ w["up"]
            d = (g + u) @ w["down"]
            if backward:   # dX = dY @ W.T for every projection, chained
                b1 = d @ w["down"].T
                b2 = b1 @ w["up"].T + b1 @ w["gate"].T
                out = d + k @ w["k"].T + v @ w["v"].T + (b2 @ w["o"].T) @ w["q"].T
            else:
                out = d + (k.sum() + v.sum()) * 1e-9
            return h + 1e-3 * out, None

        def blk(h, wb):   # one vocabulary block: logits, and (training) their gradient back to the rows
            y = h @ wb
            return (h + 1e-3 * (y @ wb.T) if backward else h + 1e-9 * y.sum(axis=1, keepdims=True)), None

        h, _ = jax.lax.scan(layer, x, None, length=cfg.num_layers)
        if head:
            h, _ = jax.lax.scan(blk, h, wh)
        return h

    return (lambda: run(*args).block_until_ready()), run, args


def _torch_program(cfg, rows: int, backward: bool, head: bool):
    import torch

    w = {k: torch.from_numpy(v) for k, v in _weights(cfg).items()}
    wt = {k: v.T.contiguous() for k, v in w.items()}
    wh = torch.from_numpy(_head_blocks(cfg))
    wht = wh.transpose(1, 2).contiguous()
    x0 = torch.from_numpy(np.random.default_rng(2).standard_normal((rows, cfg.hidden_size)).astype(np.float32))

    def run():
        with torch.no_grad():
            h = x0
            for _ in range(cfg.num_layers):
                q, k, v = h @ w["q"], h @ w["k"], h @ w["v"]
                o = q @ w["o"]
                g, u = o @ w["gate"], o @ w["up"]
                d = (g + u) @ w["down"]
                if backward:
                    out = d + k @ wt["k"] + v @ wt["v"]
                    b1 = d @ wt["down"]
                    b2 = b1 @ wt["up"] + b1 @ wt["gate"]
                    out = out + (b2 @ wt["o"]) @ wt["q"]
                else:
                    out = d
                h = h + 1e-3 * out
            if head:
                for b in range(wh.shape[0]):
                    y = h @ wh[b]
                    h = h + 1e-3 * (y @ wht[b]) if backward else h + 1e-9 * y.sum(dim=1, keepdim=True)
        return h

    return run


def matmul_floor(cfg, rows: int, *, backward: bool, head: bool = True, torch_too: bool = True,
                 reps: int = 2) -> dict:
    """Seconds for the counted dots of ``rows`` tokens, best of ``reps``: ``{"jax": s, "torch": s}``.

    ``backward=True``: a LoRA training step (forward + activation-gradient dots, lm_head both ways).
    ``head=False``: no lm_head (multiple-choice scoring reads logits at one position only).
    """
    out = {"jax": best_time(_jax_program(cfg, rows, backward, head)[0], reps)}
    if torch_too:
        out["torch"] = best_time(_torch_program(cfg, rows, backward, head), reps)
    return out


def compiled_flops(cfg, rows: int, *, backward: bool, head: bool = True) -> float:
    """FLOPs of the compiled XLA floor program by XLA's own cost analysis (a check that it does the counted work)."""
    _, run, args = _jax_program(cfg, rows, backward, head)
    cost = run.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def floor_fields(prefix: str, n_tok: int, floor: dict, tps: dict, goal_ratio: float | None = None,
                 baseline: str | None = None) -> dict:
    """JSON fields: tokens/s at each floor, each contender's fraction of the faster floor, and (with a goal)
    the fraction of that floor the goal asks of us."""
    best = min(floor.values())
    fields = {f"{prefix}floor_{k}_tok_s": n_tok / v for k, v in floor.items()}
    for name, t in tps.items():
        fields[f"{name}_frac_floor"] = t * best / n_tok
    if goal_ratio and baseline in tps:
        fields["goal_tok_s"] = goal_ratio * tps[baseline]
        fields["goal_frac_floor"] = goal_ratio * tps[baseline] * best / n_tok
    return fields
