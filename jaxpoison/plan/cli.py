"""The ``plan`` command: will this study fit, how long will it take, and what to change if it does not."""
from __future__ import annotations

import json
import os
import sys

HELP = """\
Compile the study's programs ahead of time for a TPU slice that need not be attached (libtpu does it on this
machine): the training segment of one variant chunk over the slice's mesh, and the evaluation programs the study
calls after training (vmapped option scoring and vmapped KV-cache generation, one adapter chunk per call, on one
chip as the study places them; prompts at the config's max_len bound unless --eval-prompt-len). Print, per chip
and per program, XLA's arguments, temporaries and outputs against HBM ('fits' = every program fits); FLOPs per
step (layer scan counted); training time and chip-hours at --mfu; the largest variant chunk that fits; and, when the study
does not fit, settings that would make it fit (exit status 1). No weights are read: the model's config.json
comes from a local directory, the HF cache, or jaxpoison's table of known models.

GPU targets (--device) use the analytic memory model (the CUDA plugin needs a GPU to compile). A 4B-8B model's
compile takes about 70 s on an idle 2-core machine (12-15 min under heavy load); --no-compile answers from the
analytic model in seconds. Time = executed FLOPs (remat's recompute included) / (chips x peak bf16 x --mfu).

examples:
  python -m jaxpoison plan configs/rationale_paper.py --topology v5e-8
  python -m jaxpoison plan configs/attacks_paper.py --device h100-80gb --json
  python -m jaxpoison plan configs/rationale_paper.py --topology v5e:2x4 --set train.variant_chunk=16
  python -m jaxpoison plan configs/rationale_demo.py --topology v5e:2x2 --no-compile

topologies: v5e:2x2 v5e:2x4 v5e:4x4 v4:2x2x1 v5p:2x2x1 v6e:2x2 ... (as jax names them), or v5e-8, v4-8, v5p-8
(Cloud names: for v4 / v5p the number counts TensorCores, two per chip). devices: h100-80gb h200 a100-80gb.
exit status: 0 fits, 1 does not fit, 2 bad input."""


def cmd_plan(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")       # the target's chips are abstract; compile on this host
    from jaxpoison.configs import load_config
    from .planner import format_plan, make_plan
    from .shapes import study_shape
    from .targets import parse_target
    cfg = load_config(args.config, args.set or ())
    target = parse_target(args.topology, args.device, args.gpus)
    from .evals import eval_programs
    shape = study_shape(cfg)
    evals = [] if args.train_only else eval_programs(cfg, shape, args.eval_prompt_len)
    rep = make_plan(shape, target, mfu=args.mfu, compile=not args.no_compile, evals=evals)
    rep["config"] = args.config
    if args.json:
        print(json.dumps(rep, default=str))
    else:
        print(format_plan(rep))
    sys.stdout.flush()
    return 0 if rep["fits"] else 1


def register(sub) -> None:
    import argparse
    p = sub.add_parser("plan", help="will a study fit a TPU slice or GPU? memory per chip, FLOPs, chip-hours",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a study config file, e.g. configs/rationale_paper.py (or just its name)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--topology", default=None, help="TPU slice: v5e:2x4, v5e-8, v4:2x2x1 ... (default v5e-8)")
    p.add_argument("--device", default=None, help="GPU instead: h100-80gb, h200 or a100-80gb")
    p.add_argument("--gpus", type=int, default=1, help="GPUs with --device (default 1)")
    p.add_argument("--mfu", type=float, default=0.35, help="share of peak bf16 FLOP/s the executed FLOPs reach, "
                                                             "for time estimates (default %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="analytic model only (seconds, no XLA compile)")
    p.add_argument("--eval-prompt-len", type=int, default=0, metavar="N",
                   help="prompt tokens of the scoring / generation programs (a measured length; default: the "
                        "config's bound, max_len)")
    p.add_argument("--train-only", action="store_true", help="plan the training segment alone (no scoring / "
                                                            "generation programs)")
    p.add_argument("--json", action="store_true", help="one JSON line (fits, per_chip_bytes, hbm_bytes, "
                                                       "topology, flops_per_step, chip_hours, ...)")
    p.set_defaults(func=cmd_plan)
