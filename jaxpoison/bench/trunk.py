"""``bench trunk RUN_DIR``: scoring a rationale run's adapters with the shared trunk vs through every layer.

Adapters trained with ``lora.layers_from = k`` leave layers ``[0, k)`` untouched, so the scorer runs those once
for all variants (:func:`jaxpoison.eval.score.shared_layers`). This times the run's own test questions under all
its adapters both ways, alternating, checks the metrics are the same, and prints one JSON line.
"""
from __future__ import annotations

import numpy as np

from . import common


def run_trunk(run_dir: str, rounds: int = 2) -> dict:
    from jaxpoison.analysis.adapters import load_run
    from jaxpoison.studies.rationale.evaluator import mitigation_evaluator as rationale_evaluator
    from jaxpoison.eval.score import shared_layers

    ad = load_run(run_dir)
    L = next(int(ab["a"].shape[1]) for m, ab in ad.lora.items() if m != "lm_head")   # [V, L, in, r]
    evs = {"shared": rationale_evaluator(run_dir), "full": rationale_evaluator(run_dir, share_trunk=False)}
    out = {name: ev.evaluate(ad.lora, ad.scale) for name, ev in evs.items()}      # compiles, and the check
    diff = max(float(np.nanmax(np.abs(np.asarray(out["shared"][k], float) - np.asarray(out["full"][k], float))))
               for k in out["shared"])
    timing = common.alternate({n: (lambda ev=ev: ev.evaluate(ad.lora, ad.scale)) for n, ev in evs.items()},
                              rounds=rounds, warmup=0)
    return {"bench": "trunk", "run": str(run_dir), "adapters": ad.num_variants, "layers": L,
            "shared_layers": shared_layers(ad.lora, L), "shared_s": timing["shared"]["median"],
            "full_s": timing["full"]["median"], "speedup": timing["full"]["median"] / timing["shared"]["median"],
            "max_abs_metric_diff": diff, "peak_gflops": common.matmul_peak_jax(),
            "times_s": {k: v["times"] for k, v in timing.items()}}


def register(bench_sub) -> None:
    p = bench_sub.add_parser("trunk", help="score a rationale run's adapters: shared bottom layers vs every layer",
                             description="Scores a finished rationale run's test questions under all its adapters "
                                         "twice, alternating: with the shared trunk (the bottom layers no adapter "
                                         "touches, e.g. below lora.layers_from, run once for all variants) and "
                                         "through every layer; checks the metrics agree; prints one JSON line. "
                                         "Example: python -m jaxpoison bench trunk runs/demo")
    p.add_argument("run_dir", help="a finished rationale run folder (python -m jaxpoison run ...)")
    p.add_argument("--rounds", type=int, default=2)
    p.set_defaults(func=lambda a: common.emit(run_trunk(a.run_dir, a.rounds)) and 0)
