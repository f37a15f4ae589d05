"""Which evaluator scores ``analyze``'s mitigation grid: the run's study's own, else capability only.

Mitigation evaluation: every grid point of every variant is one adapter of a single stacked axis (grid-major,
``shrink_grid`` over a chunk of variants, flattened), scored by the evaluator (:class:`jaxpoison.eval.evaluator.
Evaluator`) in fixed-size chunks (the last one padded, so one compile), with a tqdm bar over adapters. The
study's evaluator factory comes from the caller (the CLI takes it from the study registry,
:mod:`jaxpoison.studies`): ``factory(run_dir, base_override=None[, n_notes=N]) -> Evaluator`` (or its fields as a
dict). The rationale study's scores its own test questions; the attacks study's regenerates and grades answers
(``--mitigation-notes N`` bounds its cost). Without a factory the grid gets capability only, on embedded
ICD-10-CM test questions, and the report says so.
"""
from __future__ import annotations

import json
import pathlib
from typing import Callable, Optional

from jaxpoison.analysis.adapters import Adapters, AnalysisError
from jaxpoison.eval.evaluator import Evaluator, capability_evaluator


def study_evaluator(ad: Adapters, factory: Optional[Callable] = None, base_override=None, eval_run=None,
                    capability_questions: int = 64, mitigation_notes: Optional[int] = None) -> Evaluator:
    """The evaluator for these adapters: ``factory``'s (the run's study's), or capability only.
    ``mitigation_notes`` goes to the factory as ``n_notes`` (the attacks study: test notes whose answers are
    regenerated)."""
    run = pathlib.Path(eval_run) if eval_run is not None else ad.run_dir
    if run is None:
        raise AnalysisError("PEFT adapters carry no test set: pass a run folder (positional RUN_DIR) whose model "
                            "and test questions to use, or leave out --mitigation")
    study = ad.study if eval_run is None else None
    cf = run / "config.json"
    if study is None and cf.exists():
        study = json.loads(cf.read_text()).get("study")
    if study is None:
        raise AnalysisError(f"{run} has no config.json: its study (and test set) is unknown")
    if factory is not None:
        kw = {} if mitigation_notes is None else {"n_notes": int(mitigation_notes)}
        got = factory(run, base_override=base_override, **kw)
        return got if isinstance(got, Evaluator) else Evaluator(**got)
    cfg = json.loads(cf.read_text()).get("config", {}) if cf.exists() else {}
    meta_base = ad.meta.get("base", {}) if ad.source == "run" else {}
    model = "override" if meta_base.get("name") == "override" else cfg.get("model") or meta_base.get("name", "")
    ev = capability_evaluator(model, cfg.get("dtype", "float32"), meta_base.get("fingerprint", ""), base_override,
                              capability_questions, cfg.get("quant", "none"))
    ev.note = (f"the {study!r} study offers no attack re-evaluation in this version (no evaluator in its STUDY "
               f"record, jaxpoison.studies), so the grid is scored for general capability only; " + ev.note)
    return ev
