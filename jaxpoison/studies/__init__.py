"""The study registry. A study is a package here (``rationale/``, ``attacks/``) over the shared layer
:mod:`.common`, and its ``__init__.py`` exports one :class:`Study` record, ``STUDY``; a config file names its
study in ``CONFIG.study``. The commands ``run`` and ``report`` (below), ``analyze``'s mitigation evaluator and
each study's own commands are all looked up here, so no lower layer (models, data, train, eval, analysis)
imports a study.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from typing import Callable, Optional

PACKAGES = {"rationale": "jaxpoison.studies.rationale", "attacks": "jaxpoison.studies.attacks"}


@dataclasses.dataclass(frozen=True)
class Study:
    """What the rest of jaxpoison knows of a study.

    ``run(config, out_dir, resume=True, progress=True, base_override=None) -> int`` builds, trains, scores and
    reports into a run folder; ``report(run_dir) -> int`` rebuilds the report from the saved results alone;
    ``evaluator(run_dir, base_override=None[, n_notes=N]) -> Evaluator`` scores stacked adapters for
    ``analyze``'s mitigation grid (:class:`jaxpoison.eval.evaluator.Evaluator`), None = capability only;
    ``multi_host``: ``run`` writes only from process 0 (:mod:`jaxpoison.distributed`); ``commands``: functions
    ``register(subparsers)`` adding the study's own CLI commands."""
    name: str
    config_cls: type
    run: Callable
    report: Callable
    evaluator: Optional[Callable] = None
    multi_host: bool = False
    commands: tuple = ()


def get(name: str) -> Study:
    """The registered study ``name`` (its package is imported on first use)."""
    if name not in PACKAGES:
        raise ValueError(f"unknown study {name!r}: known studies are {', '.join(PACKAGES)}")
    return importlib.import_module(PACKAGES[name]).STUDY


def all_studies() -> list:
    return [get(name) for name in PACKAGES]


def of_run(run_dir) -> Optional[Study]:
    """The study that made a run folder (its ``config.json``), or None (no config.json, an unknown study)."""
    f = pathlib.Path(run_dir) / "config.json"
    if not f.exists():
        return None
    name = json.loads(f.read_text()).get("study")
    return get(name) if name in PACKAGES else None


def evaluator_for(run_dir) -> Optional[Callable]:
    """``analyze``'s evaluator factory for a run folder: its study's, or None (capability only)."""
    study = of_run(run_dir) if run_dir is not None else None
    return study.evaluator if study is not None else None


def cmd_run(args) -> int:
    from jaxpoison import distributed
    distributed.initialize(args)        # first: joins a multi-host job (SLURM, TPU slice, flags); else nothing
    from jaxpoison.configs import load_config
    cfg = load_config(args.config, args.set or ())
    study = get(cfg.study)
    if distributed.process_count() > 1 and not study.multi_host:
        multi = [s.name for s in all_studies() if s.multi_host]
        raise ValueError(f"the {cfg.study!r} study runs as one process only so far (multi-host: "
                         f"{', '.join(multi)}); start one process, or pass --distributed off")
    rc = study.run(cfg, pathlib.Path(args.out), resume=not args.restart)
    distributed.finish()    # a multi-host job: the others wait while process 0 writes the report, then all leave
    return rc


def cmd_report(args) -> int:
    run = pathlib.Path(args.run_dir)
    f = run / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{run} has no config.json: not a jaxpoison run folder (made by `run`)")
    return get(json.loads(f.read_text())["study"]).report(run)


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
