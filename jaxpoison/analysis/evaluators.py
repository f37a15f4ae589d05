"""How a mitigation grid point is scored: the study evaluators behind ``analyze``'s mitigation.

Mitigation evaluation: every grid point of every variant is one adapter of a single stacked axis (grid-major,
``shrink_grid`` over a chunk of variants, flattened), scored by :func:`jaxpoison.eval.score.score_options`'s
vmapped program in fixed-size chunks (the last one padded, so one compile), with a tqdm bar over adapters.
A study module can provide its own evaluator by defining ``mitigation_evaluator(run_dir, base_override=None
[, n_notes=None])`` returning an :class:`Evaluator` (or its fields as a dict): ``evaluate(lora, scale) ->
{"attack": [N], "capability": [N], ...}``, ``attack_name``, ``capability_name``, ``attack_lower_is_better``;
optionally ``needs_variants`` (then ``evaluate(lora, scale, variants=[variant dict or None per adapter])``:
the flattened grid-major axis maps adapter ``g * chunk + j`` to the chunk's j-th variant) and ``paired(res,
reference)`` (columns computed against each variant's same-seed clean twin at the same grid point, after the
grid). The rationale study's is built here from its ``config.json`` / ``scores.npz``; the attacks study's is
:mod:`jaxpoison.studies.attacks.mitigation` (generation + rule grading; ``--mitigation-notes N`` bounds its
cost). A study without one gets capability only, on embedded ICD-10-CM test questions, and the report says so.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import typing
from typing import Callable, Optional

import numpy as np

from jaxpoison.analysis.adapters import Adapters, AnalysisError

EVAL_BUCKETS = tuple(range(16, 4097, 16))   # the rationale study's eval buckets (checked by the eval hash)


# ---- mitigation evaluators -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Evaluator:
    """Scores stacked adapters [N, ...] -> per-adapter metric arrays [N] (``attack`` and ``capability`` at least).

    ``evaluate(lora, scale)``; with ``needs_variants`` ``evaluate(lora, scale, variants=...)``, where
    ``variants[i]`` is the variant dict of adapter ``i`` (its ``task``, ``seed``, ...) or None for a padding
    adapter whose metrics are discarded (the attacks study: each adapter answers its own task's prompts).
    ``paired(res, reference)``, if given, is called once after the whole grid with the metric arrays [G, V] and
    each variant's same-seed clean twin (``reference[v]``, -1 = none) and returns more [G, V] columns (the
    attacks study: ASR against the unshrunk 0 % variant and against the 0 % variant at the same grid point)."""
    evaluate: Callable
    attack_name: str
    capability_name: str
    attack_lower_is_better: bool = True
    note: str = ""
    capability_only: bool = False
    needs_variants: bool = False
    paired: Optional[Callable] = None


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def dataclass_from_dict(cls, d: dict):
    """A (nested, frozen) config dataclass from its JSON form: lists back to tuples, unknown keys ignored."""
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        v, t = d[f.name], hints.get(f.name)
        kw[f.name] = dataclass_from_dict(t, v) if dataclasses.is_dataclass(t) and isinstance(v, dict) else _tuplify(v)
    return cls(**kw)


def _load_base(model: str, dtype: str, fingerprint: str, base_override, quant: str = "none"):
    """(cfg, params, tokenizer, jnp dtype) of the run's base model, checked against its fingerprint and quantised
    as the run's config says (``quant``, :func:`jaxpoison.models.quant.quantize_base`)."""
    import jax.numpy as jnp
    from jaxpoison.models.quant import quantize_base
    if base_override is not None:
        cfg, params, tok = base_override[:3]
        return cfg, quantize_base(params, quant), tok, jnp.float32
    if model in ("", "override"):
        raise AnalysisError("the run was trained on a base passed in from Python (tests), which the command line "
                            "cannot reload; call jaxpoison.analysis.run.analyze(..., base_override=(cfg, params, "
                            "tokenizer))")
    from jaxpoison.models.lm import load_model
    lm = load_model(model, dtype)
    if fingerprint and lm.fingerprint != fingerprint:
        raise AnalysisError(f"the base model {model!r} found here (fingerprint {lm.fingerprint[:12]}) is not the one "
                            f"the run trained on ({fingerprint[:12]}); the adapters would be scored on another model")
    return lm.cfg, quantize_base(lm.params, quant), lm.tokenizer, lm.dtype


def _mc_evaluator(mcfg, params, mc, is_target, method: str, dtype, batch_questions: int,
                  share_trunk: bool = True, nontarget=None) -> Callable:
    from jaxpoison.eval.score import choice_metrics, score_options
    tgt = np.asarray(is_target, bool)
    non = ~tgt if nontarget is None else np.asarray(nontarget, bool)   # decoy-free target copies are neither
    has = (np.asarray(mc.decoy) >= 0) & tgt

    def evaluate(lora, scale):
        s = score_options(params, mcfg, mc, lora, lora_scale=float(scale), dtype=dtype,
                          batch_questions=batch_questions, calibrate=method == "calibrated", progress=False,
                          share_trunk=share_trunk)
        m = choice_metrics(s.method(method), mc.answer, mc.decoy)
        cor = m["correct"].astype(float)
        nan = np.full(cor.shape[0], np.nan)
        out = {"target_acc": cor[:, tgt].mean(1) if tgt.any() else nan,
               "nontarget_acc": cor[:, non].mean(1) if non.any() else nan,
               "target_decoy_rate": ((m["pick"] == mc.decoy[None]) & has[None]).sum(1) / has.sum()
               if has.any() else nan}
        out["attack"], out["capability"] = out["target_acc"], out["nontarget_acc"]
        return out
    return evaluate


def rationale_evaluator(run_dir, base_override=None, share_trunk: bool = True) -> Evaluator:
    """The seed-000 study's test questions rebuilt from ``config.json`` + the question ids in ``scores.npz``,
    checked against the run's eval hash; attack = target-subject accuracy, capability = non-target accuracy.
    ``share_trunk=False`` scores every adapter through all layers (``bench trunk`` compares the two)."""
    from jaxpoison.data.pool import build_mc_eval
    from jaxpoison.studies.rationale import config as rationale_config
    from jaxpoison.studies.rationale import grid
    run = pathlib.Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())["config"]
    if not (run / "scores.npz").exists():
        raise AnalysisError(f"{run} has no scores.npz (the run stopped before scoring): the test questions are "
                            f"unknown; finish the run first")
    z = np.load(run / "scores.npz", allow_pickle=False)
    ids, is_target = [str(i) for i in z["ids"]], z["is_target"].astype(bool)
    d = dataclass_from_dict(rationale_config.DataConfig, cfg["data"])
    _, test = grid.load_examples(d)
    by_id = {ex.id: ex for ex in test}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AnalysisError(f"{len(missing)} test questions of the run (e.g. {missing[0]}) are not in the data "
                            f"set rebuilt from config.json: the data changed since the run")
    base = json.loads((run / "data.json").read_text()).get("base", {}) if (run / "data.json").exists() else {}
    model = "override" if base.get("name") == "override" else cfg["model"]
    mcfg, params, tok, dtype = _load_base(model, cfg.get("dtype", "float32"), base.get("fingerprint", ""),
                                          base_override, cfg.get("quant", "none"))
    mc = build_mc_eval([by_id[i] for i in ids], tok, cfg["eval"]["format"], max_len=d.max_len, buckets=EVAL_BUCKETS)
    want = json.loads((run / "data.json").read_text()).get("eval_hash") if (run / "data.json").exists() else None
    if want and mc.data_hash != want:
        raise AnalysisError("the test questions rebuilt from config.json tokenize differently from the run's "
                            "(eval hash mismatch: another tokenizer or code version)")
    method = cfg["eval"].get("method", "sum")
    nontarget = (np.array([str(g) for g in z["group"]]) == "nontarget") if "group" in z.files else ~is_target
    ev = _mc_evaluator(mcfg, params, mc, is_target, method, dtype, int(cfg["eval"].get("batch_questions", 8)),
                       share_trunk, nontarget)
    return Evaluator(ev, "target-subject accuracy", "non-target accuracy", attack_lower_is_better=False,
                     note=f"{int(is_target.sum())} target and {int(nontarget.sum())} non-target test questions "
                          f"of the run, option scores `{method}`")


def _study_capability_set(study_cfg: dict, tok):
    """The attacks study's own first general-capability set (its ``capability`` config), or None."""
    try:
        from jaxpoison.studies.attacks import config
        from jaxpoison.studies.attacks import steps
        cap = dataclass_from_dict(config.CapabilityConfig, study_cfg["capability"])
        if not cap.sources:
            return None
        sets = steps.capability_sets(cap, tok, int(study_cfg.get("max_len", 4096)))
        name = next(iter(sets))
        return name, sets[name], int(cap.batch_questions)
    except (ImportError, AttributeError, KeyError, TypeError):
        return None


def capability_scorer(mcfg, params, tok, jdt, study_cfg: Optional[dict] = None, n_questions: int = 64) -> tuple:
    """(fn(lora, scale) -> {"capability": accuracy [N], ...}, description, capability name) on a loaded base:
    the study's own first capability set where it names one (the attacks study's ``capability`` config), else
    ``n_questions`` embedded ICD-10-CM test questions; option scores ``sum``."""
    import random
    from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
    from jaxpoison.data.pool import build_mc_eval
    own = _study_capability_set(study_cfg, tok) if study_cfg else None
    if own is not None:
        name, mc, bq = own
        what = f"the study's own {mc.stats['n_questions']} `{name}` capability questions (format `{mc.fmt}`)"
    else:
        test = sorted(build_icd10_set(IcdConfig())["test"], key=lambda ex: ex.id)
        n = len(test[0].options)
        test = [ex for ex in test if len(ex.options) == n]
        test = random.Random("analyze-capability").sample(test, min(n_questions, len(test)))
        mc, bq, name = build_mc_eval(test, tok, "statement", max_len=1024, buckets=EVAL_BUCKETS), 8, "ICD-10-CM"
        what = f"{len(test)} embedded ICD-10-CM test questions (format `statement`)"
    ev = _mc_evaluator(mcfg, params, mc, np.zeros(len(mc.ids), bool), "sum", jdt, bq)
    return ev, f"{what}, option scores `sum`", f"{name} accuracy"


def capability_evaluator(model: str, dtype: str, fingerprint: str, base_override=None,
                         n_questions: int = 64, study_cfg: Optional[dict] = None) -> Evaluator:
    """Capability only (a study without an attack evaluator): :func:`capability_scorer` on the run's base."""
    mcfg, params, tok, jdt = _load_base(model, dtype, fingerprint, base_override,
                                        (study_cfg or {}).get("quant", "none"))
    score, what, name = capability_scorer(mcfg, params, tok, jdt, study_cfg, n_questions)

    def evaluate(lora, scale):
        out = score(lora, scale)
        out["attack"] = np.full_like(out["capability"], np.nan)
        return out
    return Evaluator(evaluate, "attack (not measured)", name, capability_only=True, note=f"capability only: {what}")


def study_evaluator(ad: Adapters, base_override=None, eval_run=None, capability_questions: int = 64,
                    mitigation_notes: Optional[int] = None) -> Evaluator:
    """The evaluator for these adapters: the run's study's own, the rationale study's, or capability only.
    ``mitigation_notes`` goes to a study's ``mitigation_evaluator`` as ``n_notes`` (the attacks study: test notes
    whose answers are regenerated)."""
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
    if study == "rationale":
        return rationale_evaluator(run, base_override)
    from jaxpoison.studies import study_module
    try:
        mod = study_module(study)
    except (ValueError, ImportError):
        mod = None
    if mod is not None and hasattr(mod, "mitigation_evaluator"):
        kw = {} if mitigation_notes is None else {"n_notes": int(mitigation_notes)}
        got = mod.mitigation_evaluator(run, base_override=base_override, **kw)
        return got if isinstance(got, Evaluator) else Evaluator(**got)
    cfg = json.loads(cf.read_text()).get("config", {}) if cf.exists() else {}
    meta_base = ad.meta.get("base", {}) if ad.source == "run" else {}
    model = "override" if meta_base.get("name") == "override" else cfg.get("model") or meta_base.get("name", "")
    ev = capability_evaluator(model, cfg.get("dtype", "float32"), meta_base.get("fingerprint", ""), base_override,
                              capability_questions, cfg)
    ev.note = (f"the {study!r} study offers no attack re-evaluation in this version (no mitigation_evaluator in "
               f"jaxpoison.studies.{study}), so the grid is scored for general capability only; " + ev.note)
    return ev
