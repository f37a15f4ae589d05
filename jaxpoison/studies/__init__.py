"""The seed studies, each a composition of data, train, eval and analysis; nothing reusable lives here.

A study module exposes ``run(config, out_dir, resume) -> int`` and ``report(run_dir) -> int``; a config file
names its study in ``CONFIG.study``.
"""
from __future__ import annotations

import importlib
import json
import pathlib

STUDIES = {"rationale": "jaxpoison.studies.rationale.run", "attacks": "jaxpoison.studies.attacks.run"}
MULTI_HOST = ("rationale",)         # studies whose run() writes only from process 0 (jaxpoison.distributed)


def study_module(name: str):
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}: known studies are {', '.join(STUDIES)}")
    try:
        return importlib.import_module(STUDIES[name])
    except ModuleNotFoundError as e:
        if e.name == STUDIES[name]:
            raise ValueError(f"the {name!r} study is not implemented yet in this version of jaxpoison") from None
        raise


def cmd_run(args) -> int:
    from jaxpoison import distributed
    distributed.initialize(args)        # first: joins a multi-host job (SLURM, TPU slice, flags); else nothing
    from jaxpoison.configs import load_config
    cfg = load_config(args.config, args.set or ())
    if distributed.process_count() > 1 and cfg.study not in MULTI_HOST:
        raise ValueError(f"the {cfg.study!r} study runs as one process only so far (multi-host: "
                         f"{', '.join(MULTI_HOST)}); start one process, or pass --distributed off")
    rc = study_module(cfg.study).run(cfg, pathlib.Path(args.out), resume=not args.restart)
    distributed.finish()    # a multi-host job: the others wait while process 0 writes the report, then all leave
    return rc


def cmd_report(args) -> int:
    run = pathlib.Path(args.run_dir)
    f = run / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{run} has no config.json: not a jaxpoison run folder (made by `run`)")
    return study_module(json.loads(f.read_text())["study"]).report(run)


def register(sub) -> None:
    p = sub.add_parser("run", help="run a study from a config file",
                       description="Run a study preset (configs/*.py). Any field can be overridden with "
                                   "--set section.field=value, e.g. --set train.learning_rate=1e-4. An "
                                   "interrupted run resumes from its last checkpoint with the same command.")
    p.add_argument("config", help="a config file, e.g. configs/rationale_demo.py (or just its name)")
    p.add_argument("--out", required=True, help="run folder (results, checkpoints, plots, report)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in --out")
    from jaxpoison.distributed import add_args as add_distributed_args
    add_distributed_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild a run's report from its saved results (no training)",
                       description="Rebuild report.md/report.html and plots of a finished run folder.")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
