"""``bench forward``: forward-scoring tokens/s, jaxpoison against HF transformers on the same weights.

The work is the scoring path of evaluation: full per-token log-probs of a ``[batch, seq]`` batch of random
tokens. Ours is :func:`jaxpoison.models.lm.sequence_logprobs` (jitted; chunked lm_head, logits never held whole);
the reference is transformers' PyTorch ``*ForCausalLM`` built from the same weights (``to_hf_state_dict``), fp32,
``torch.no_grad``, ``torch.set_num_threads(threads)``, scored as ``logits.log_softmax(-1).gather`` — what a user of
the seed papers would write. The two are timed alternately in one process, and their log-probs are compared.
"""
from __future__ import annotations

import os
import time
from typing import Any

from . import common


def run(model: str = "smollm2-135m", batch: int = 16, seq: int = 256, rounds: int = 5, threads: int = 2,
        chunk: int = 128) -> dict:
    """Time forward scoring of a ``[batch, seq]`` batch for ours and transformers'; return the JSON record."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jaxpoison.models.lm import load_model, sequence_logprobs

    torch.set_num_threads(threads)
    lm = load_model(model, "float32", tokenizer=False)
    cfg = lm.cfg
    tokens_np = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
    tokens, mask = jnp.asarray(tokens_np), jnp.ones((batch, seq), bool)

    score = jax.jit(lambda p, t, m: sequence_logprobs(p, t, m, cfg=cfg, chunk=chunk))
    t0 = time.perf_counter()
    compiled = score.lower(lm.params, tokens, mask).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    ours_out = {}

    def ours():
        ours_out["lp"] = compiled(lm.params, tokens, mask).block_until_ready()

    hf = common.torch_reference_model(cfg, jax.tree.map(np.asarray, lm.params))
    t_tok = torch.from_numpy(tokens_np.astype(np.int64))
    t_mask = torch.ones_like(t_tok)
    torch_out = {}

    def reference():
        with torch.no_grad():
            logits = hf(input_ids=t_tok, attention_mask=t_mask).logits
            torch_out["lp"] = logits[:, :-1].log_softmax(-1).gather(-1, t_tok[:, 1:, None])[..., 0]

    peaks = {"jax": common.matmul_peak_jax(), "torch": common.matmul_peak_torch(threads=threads)}
    rss = {}
    with common.RssPeak() as m:
        ours()
    rss["ours"] = m.growth
    with common.RssPeak() as m:
        reference()
    rss["transformers"] = m.growth
    timing = common.alternate({"ours": ours, "transformers": reference}, rounds=rounds, warmup=1)
    # the peak again at the end: the machine is shared, the mean of the two brackets the run
    peaks = {k: max(v, f()) for (k, v), f in zip(peaks.items(), (common.matmul_peak_jax,
                                                                  lambda: common.matmul_peak_torch(threads=threads)))}
    peak = max(peaks.values())
    max_diff = float(np.abs(np.asarray(ours_out["lp"]) - torch_out["lp"].numpy()).max())

    n_tok = batch * seq
    fpt = common.forward_flops_per_token(cfg)
    tps = {k: n_tok / v["median"] for k, v in timing.items()}
    best_tps = {k: n_tok / v["best"] for k, v in timing.items()}
    return {
        "bench": "forward", "model": model, "batch": batch, "seq": seq, "rounds": rounds, "threads": threads,
        "ours_tok_s": tps["ours"], "transformers_tok_s": tps["transformers"],
        "ratio": tps["ours"] / tps["transformers"],
        "ours_best_tok_s": best_tps["ours"], "transformers_best_tok_s": best_tps["transformers"],
        "peak_gflops": peak, "peak_gflops_jax": peaks["jax"], "peak_gflops_torch": peaks["torch"],
        "ours_frac_peak": common.mfu(tps["ours"], fpt, peak),
        "transformers_frac_peak": common.mfu(tps["transformers"], fpt, peak),
        "gflop_per_token": fpt / 1e9,
        "ours_rss_growth_mib": common.mib(rss["ours"]), "transformers_rss_growth_mib": common.mib(rss["transformers"]),
        "ours_xla_temp_mib": common.mib(mem.temp_size_in_bytes) if mem is not None else None,
        "process_peak_rss_mib": common.mib(common.peak_rss_bytes()),
        "max_abs_logprob_diff": max_diff, "compile_s": compile_s,
        "attn_impl": getattr(hf.config, "_attn_implementation", None),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__, "torch": torch.__version__,
        "times_s": {k: v["times"] for k, v in timing.items()},
    }


def register(subparsers) -> Any:
    """Add ``bench`` (with its own sub-commands) to ``subparsers``; returns the ``bench`` sub-subparsers so that
    other benchmarks (train, variants, eval) can be added beside ``forward``."""
    bench = subparsers.add_parser("bench", help="benchmarks against HF transformers, one JSON line each",
                                  description="Benchmarks: jaxpoison against HF transformers (PyTorch) on the "
                                              "same weights, timed alternately in one process, with the fp32 "
                                              "matmul peak measured in the same run.")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    p = sub.add_parser("forward", help="forward-scoring tokens/s: ours vs transformers",
                       description="Forward scoring (full per-token log-probs of a [batch, seq] batch): tokens/s "
                                   "of jaxpoison and of transformers' PyTorch model, their ratio, both as a fraction "
                                   "of the fp32 matmul peak, and memory; prints one JSON line.")
    p.add_argument("--model", default="smollm2-135m", help="embedded name, HF directory or hub id")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per contender (alternating)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.set_defaults(func=_main_forward)
    return sub


def _main_forward(args) -> int:
    common.emit(run(args.model, args.batch, args.seq, args.rounds, args.threads))
    return 0


def main(argv=None) -> int:
    """``python -m jaxpoison.bench.forward ...`` until the top-level CLI calls :func:`register`."""
    import argparse

    parser = argparse.ArgumentParser(prog="jaxpoison")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", "forward", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
