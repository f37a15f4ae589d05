"""The rationale demo's training and scoring on the embedded SmolLM2-135M, timed, against whichever jaxpoison
tree is first on ``sys.path`` (run by :mod:`jaxpoison.bench.ab`, once per tree, in a fresh process each time).

It must run against this tree and against older ones (the A/B runner puts the other tree first on the path and
runs this file by its path), so it imports only what both engine generations have: ``train.trainer.StudyData``
and ``train_study``, ``train.engine.Static``, ``TrainConfig`` / ``LoraConfig``, ``models.lm.load_model``,
``eval.score.score_options`` and ``data.pool.McEval``. Which engine is present (``make_train`` over
Pool/Variants/TrainState, or the older ``compile_segment``/``init_state``) is reported as ``api``; both are driven
through ``train_study``, the call the demo makes, so each tree's own host loop (chunks, trunk cache, dispatch)
is what is timed. No torch.

Workload, with the demo's settings (configs/rationale_demo.py) unless a flag changes them: LoRA r 8, alpha 16,
all seven linear modules, ``layers_from=-8``, ``train.trunk_cache``, batch 4, ``loss_norm='example'``,
``loss_budget`` 96 (what the demo's ``-1`` resolves to), constant learning rate 2e-3, one epoch, one jitted
segment per step (``log_every=1``), ``variant_chunk`` 3 (the demo sets 4 for 30 variants, which today's trainer
cuts into chunks of 3; the older trainer needs a chunk size that divides the variant count). The token pool is
synthetic and fixed (seeded): rows of at most 160 tokens (the demo's T), lengths and completion (loss) lengths
drawn around the demo's (row 68-160, median ~129; completion 11-94, median ~69), right-padded; like the demo,
the variants draw from a part of the pool only (about 6.5 used rows per variant of 15 pool rows per variant),
each variant ``steps x batch`` rows, so it takes exactly ``steps`` updates. Variants share seeds five by five,
as the demo's cells do.

Scoring: ``score_options`` on a synthetic question set of the demo's shape (4 options; a shared question prefix
of 21-30 tokens, options of 4-10 tokens, rows padded to 48; neutral prefix 16, rows of 32; ``batch_questions``
8; calibrated), for ``--score-adapters`` models: the base plus trained-looking adapters (random ``a`` and ``b``
on the top 8 layers, zero below, so the shared trunk is used as in the demo). The base rides along as a zero
adapter, or with ``score_options(with_base=True)`` where the tree's rationale study calls it that way
(``--score-base auto``, reported as ``score_base``).

Timing: each phase runs twice in the process. The first call is what a run pays (trace, compile, run); the
second finds the executables in a persistent compilation cache private to this process (a fresh temporary
folder, so no tree ever sees another's entries) and still traces. Every span that jax reports as tracing,
lowering or compiling (cache reads included) is collected (``jax.monitoring`` time spans, overlaps merged);
``*_compile_s`` is that time within a call and ``*_steady_s`` the second call's wall time less it: the
execution and host loop of the workload with compilation taken out. One JSON line on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

MARK = "ab_workload"            # key of the result line (the runner looks for it)
DEMO_SEQ = 160                  # configs/rationale_demo.py: the tokenized pool is [448, 160]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="ab_workload", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--variants", type=int, default=6)
    p.add_argument("--steps", type=int, default=5, help="updates per variant (rows per variant = steps x batch)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=DEMO_SEQ, help="pool row length T (the demo's is 160)")
    p.add_argument("--variant-chunk", type=int, default=3, help="train.variant_chunk (must divide --variants)")
    p.add_argument("--loss-budget", type=int, default=96)
    p.add_argument("--no-trunk-cache", action="store_true")
    p.add_argument("--layers-from", type=int, default=-8)
    p.add_argument("--score-adapters", type=int, default=8, help="models scored, base included (demo: 31); 0 = none")
    p.add_argument("--score-questions", type=int, default=32, help="questions scored (demo: 112)")
    p.add_argument("--score-base", choices=("auto", "zero", "with-base"), default="auto")
    p.add_argument("--repeats", type=int, default=1, help="warm calls per phase (steady = their median)")
    p.add_argument("--no-run-dir", action="store_true",
                   help="train without a run folder (the demo writes metrics, TensorBoard and a checkpoint)")
    a = p.parse_args(argv)
    for name in ("variants", "steps", "batch", "seq", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.variant_chunk < 0 or (a.variant_chunk and a.variants % a.variant_chunk):
        p.error(f"--variant-chunk {a.variant_chunk} must divide --variants {a.variants} (the older trainer "
                "requires it); use e.g. --variants 6 --variant-chunk 3")
    if a.seq < 24:
        p.error("--seq must be >= 24 (rows hold a prompt and a completion)")
    if a.score_adapters and a.score_adapters < 2:
        p.error("--score-adapters counts the base too: use 0 (no scoring) or >= 2")
    return a


class CompileClock:
    """Wall time jax spends tracing, lowering and compiling (cache reads included), overlaps merged."""
    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax.monitoring
        self.spans, self.hits = [], 0
        jax.monitoring.register_event_time_span_listener(self._span)
        jax.monitoring.register_event_listener(self._event)

    def _span(self, event, start, end, **kw):
        if event in self.EVENTS:
            self.spans.append((start, end))

    def _event(self, event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def within(self, t0: float, t1: float) -> float:
        """Seconds of [t0, t1] (``time.time()``) covered by compile spans."""
        total, cur = 0.0, None
        for s, e in sorted((max(s, t0), min(e, t1)) for s, e in self.spans if e > t0 and s < t1):
            if cur and s <= cur[1]:
                cur[1] = max(cur[1], e)
            else:
                if cur:
                    total += cur[1] - cur[0]
                cur = [s, e]
        return total + (cur[1] - cur[0] if cur else 0.0)


def synthetic_pool(rng, n_rows: int, T: int, vocab: int, pad: int):
    """[R, T] tokens / loss_mask / attn_mask, right-padded, completion at the end of each row; one row of T."""
    import numpy as np
    lens = np.clip(np.rint(rng.normal(0.80 * T, 0.09 * T, n_rows)), int(0.42 * T), T).astype(int)
    lens[0] = T
    comp = np.clip(np.rint(rng.normal(0.43 * T, 0.08 * T, n_rows)), max(1, T // 15), int(0.59 * T)).astype(int)
    comp = np.minimum(comp, lens - 8)
    tokens = np.full((n_rows, T), pad, np.int32)
    loss = np.zeros((n_rows, T), np.float32)
    attn = np.zeros((n_rows, T), bool)
    for r, (n, c) in enumerate(zip(lens, comp)):
        tokens[r, :n] = rng.integers(3, vocab, n)
        attn[r, :n] = True
        loss[r, n - c:n] = 1.0
    return tokens, loss, attn


def variant_rows(rng, V: int, per_variant: int):
    """Each variant's rows: ``per_variant`` distinct rows of a used part of the pool (~6.5 rows per variant, as
    the demo's 195 used rows of 448 for 30 variants); the pool has 15 rows per variant."""
    import numpy as np
    n_pool = max(15 * V, per_variant)
    used = min(n_pool, max(per_variant, int(round(6.5 * V))))
    rows = np.stack([rng.choice(used, per_variant, replace=False) for _ in range(V)]).astype(np.int32)
    return n_pool, rows


def synthetic_mc(rng, McEval, Q: int, vocab: int, pad: int, T: int = 48, T_uncond: int = 32, C: int = 4):
    """A question set of the demo's shape: shared prefix per question, options at the end of each row."""
    import numpy as np

    def arrays(prefix_len, T):
        tok = np.full((Q, C, T), pad, np.int32)
        cont = np.zeros((Q, C, T), np.float32)
        attn = np.zeros((Q, C, T), bool)
        for q in range(Q):
            pre = rng.integers(3, vocab, prefix_len[q])
            for c in range(C):
                n = int(options[q, c])
                row = np.concatenate([pre, option_tokens[q][c][:n]])
                tok[q, c, :len(row)] = row
                attn[q, c, :len(row)] = True
                cont[q, c, len(pre):len(row)] = 1.0
        return tok, cont, attn

    options = rng.integers(4, 11, (Q, C))
    option_tokens = [[rng.integers(3, vocab, 10) for _ in range(C)] for _ in range(Q)]
    tok, cont, attn = arrays(rng.integers(21, 31, Q), T)
    utok, ucont, uattn = arrays(np.full(Q, 16), T_uncond)
    return McEval(tokens=tok, cont_mask=cont, attn_mask=attn, answer=rng.integers(0, C, Q).astype(np.int32),
                  decoy=np.full(Q, -1, np.int32), subject=["s"] * Q, subjects=[("s",)] * Q,
                  ids=[f"q{i}" for i in range(Q)], uncond_tokens=utok, uncond_cont_mask=ucont,
                  uncond_attn_mask=uattn, fmt="synthetic", stats={}, data_hash="synthetic")


def study_scores_with_base(root: pathlib.Path) -> bool:
    """Whether this tree's rationale study scores its base with ``score_options(with_base=True)``."""
    for rel in ("studies/rationale/run.py", "studies/rationale.py"):
        f = root / rel
        if f.exists():
            return "with_base=True" in f.read_text()
    return False


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.time()
    cache_dir = tempfile.mkdtemp(prefix="ab_jaxcache_")
    run_root = tempfile.mkdtemp(prefix="ab_runs_")
    import jaxpoison
    import jax
    import jax.numpy as jnp
    import numpy as np
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    clock = CompileClock()

    import inspect
    from jaxpoison.data.pool import McEval
    from jaxpoison.eval.score import score_options
    from jaxpoison.models.lm import load_model
    from jaxpoison.train import engine
    from jaxpoison.train.config import TrainConfig
    from jaxpoison.train.engine import Static
    from jaxpoison.train.lora import LoraConfig, init_lora
    from jaxpoison.train.trainer import StudyData, train_study
    api = "new" if hasattr(engine, "make_train") else "old" if hasattr(engine, "compile_segment") else "unknown"
    root = pathlib.Path(jaxpoison.__file__).resolve().parent

    t = time.time()
    lm = load_model(a.model, "float32", tokenizer=False)
    cfg, base = lm.cfg, lm.params
    jax.block_until_ready(base)
    load_s = time.time() - t

    rng = np.random.default_rng(0)
    per_variant = a.steps * a.batch
    n_pool, rows = variant_rows(rng, a.variants, per_variant)
    tokens, loss_mask, attn_mask = synthetic_pool(rng, n_pool, a.seq, cfg.vocab_size, 2)
    table = [{"variant_id": v, "seed": v // 5, "kind": "synthetic", "name": f"v{v}"} for v in range(a.variants)]
    tcfg = TrainConfig(learning_rate=2e-3, schedule="constant", epochs=1.0, batch_size=a.batch,
                       loss_budget=a.loss_budget, loss_norm="example", log_every=1, variant_chunk=a.variant_chunk,
                       trunk_cache=not a.no_trunk_cache, tensorboard=not a.no_run_dir)
    lcfg = LoraConfig(r=8, alpha=16, targets=("all",), layers_from=a.layers_from)
    st = Static(cfg, tcfg, lcfg)

    def sd():
        return StudyData(tokens, loss_mask, attn_mask, rows, np.full(a.variants, per_variant, np.int32), table,
                         "synthetic")

    def timed(fn):
        t0 = time.time()
        out = fn()
        t1 = time.time()
        return out, t1 - t0, clock.within(t0, t1)

    def train_once():
        run_dir = None if a.no_run_dir else tempfile.mkdtemp(dir=run_root)
        res = train_study(base, st, sd(), run_dir=run_dir, progress=False, base_name=a.model)
        jax.block_until_ready(res.state)
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        return res

    out = {MARK: 1, "api": api, "jaxpoison": str(root), "jax": jax.__version__,
           "devices": jax.device_count(), "platform": jax.devices()[0].platform,
           "xla_flags": os.environ.get("XLA_FLAGS", ""), "args": vars(a), "load_s": load_s,
           "pool": [int(n_pool), int(a.seq)], "used_rows": int(len(np.unique(rows))),
           "real_tokens": int(attn_mask.sum())}
    res, out["train_first_s"], out["train_first_compile_s"] = timed(train_once)
    warm = [timed(train_once) for _ in range(a.repeats)]
    res = warm[-1][0]
    out["train_warm_wall_s"] = statistics.median(w[1] for w in warm)
    out["train_warm_compile_s"] = statistics.median(w[2] for w in warm)
    out["train_steady_s"] = statistics.median(w[1] - w[2] for w in warm)
    out["train_steady_per_step_s"] = out["train_steady_s"] / a.steps
    out["train_steps"] = int(res.steps)
    loss = np.asarray(res.metrics["loss"], np.float64)
    out["train_loss_first"], out["train_loss_last"] = float(np.nanmean(loss[0])), float(np.nanmean(loss[-1]))

    if a.score_adapters:
        k = lcfg.first_layer(cfg.num_layers)
        keys = jax.random.split(jax.random.PRNGKey(1), a.score_adapters - 1)

        def adapter(key):
            lora = init_lora(key, cfg, lcfg, jnp.float32)
            for i, (m, ab) in enumerate(sorted(lora.items())):
                b = 0.02 * jax.random.normal(jax.random.fold_in(key, 1000 + i), ab["b"].shape, jnp.float32)
                if m != "lm_head" and k > 0:
                    b = b.at[:k].set(0)
                ab["b"] = b
            return lora

        adapters = jax.tree.map(lambda *x: jnp.stack(x), *[adapter(kk) for kk in keys])
        with_base = {"auto": study_scores_with_base(root), "zero": False, "with-base": True}[a.score_base]
        if with_base and "with_base" not in inspect.signature(score_options).parameters:
            raise SystemExit("--score-base with-base: this tree's score_options has no with_base; use "
                             "--score-base zero or auto")
        if with_base:
            lora, kw = adapters, {"with_base": True}
        else:   # the base as one more adapter whose b is zero, in front (the demo's common.base_first)
            lora, kw = jax.tree.map(lambda x: jnp.concatenate([jnp.zeros_like(x[:1]), x]), adapters), {}
        mc = synthetic_mc(np.random.default_rng(1), McEval, a.score_questions, cfg.vocab_size, 2)

        def score_once():
            return score_options(base, cfg, mc, lora, lora_scale=lcfg.scale, dtype=jnp.float32, batch_questions=8,
                                 calibrate=True, progress=False, **kw)

        sc, out["score_first_s"], out["score_first_compile_s"] = timed(score_once)
        warm = [timed(score_once) for _ in range(a.repeats)]
        sc = warm[-1][0]
        out["score_warm_wall_s"] = statistics.median(w[1] for w in warm)
        out["score_warm_compile_s"] = statistics.median(w[2] for w in warm)
        out["score_steady_s"] = statistics.median(w[1] - w[2] for w in warm)
        out["score_base"] = "with_base" if with_base else "zero_adapter"
        out["score_shape"] = [int(a.score_adapters), int(a.score_questions), 4]
        s = np.asarray(sc.sum, np.float64)
        out["score_checksum"] = float(s.mean())
        out["score_rows"] = int(s.shape[0])
    out["cache_hits"] = clock.hits
    out["total_s"] = time.time() - t_start
    shutil.rmtree(cache_dir, ignore_errors=True)
    shutil.rmtree(run_root, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
