"""How a stack of adapters is scored on a task: the :class:`Evaluator` record that ``analyze``'s mitigation grid
calls, the multiple-choice evaluator, the general-capability scorer, and the base model of a run reloaded and
checked against the fingerprint it trained on.

A study supplies its own evaluator factory through its ``STUDY`` record (:mod:`jaxpoison.studies`):
``evaluator(run_dir, base_override=None[, n_notes=N]) -> Evaluator``. Nothing here knows a study.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable, Optional

import numpy as np

EVAL_BUCKETS = tuple(range(16, 4097, 16))   # the length buckets of multiple-choice test questions (eval hash)


class EvaluatorError(ValueError):
    """An evaluator that cannot be built (a base model that cannot be reloaded, or is not the run's)."""


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


def eval_mesh(model: str, dtype: str, base_override=None, devices=None):
    """The mesh a post-hoc evaluator loads the base into, worked out before any weight loads: ``variant``, ``data``
    and ``model`` 1 (an evaluator scores adapters a chunk at a time), ``fsdp`` 'auto'
    (:func:`jaxpoison.train.mesh.resolve` over this process's devices): on accelerators the base is split over all
    of them (sized first by what it needs to fit one chip), on CPU one device. The float base's bytes decide (a
    quantised base takes less)."""
    import jax
    from jaxpoison.train.base_load import base_abstract
    from jaxpoison.train.mesh import AUTO, MeshConfig, resolve
    if base_override is not None:
        leaves = jax.tree.leaves(base_override[1])
    else:
        try:
            leaves = jax.tree.leaves(base_abstract(model, dtype))
        except FileNotFoundError:
            return None         # the load itself says what is missing
    nbytes = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves)
    return resolve(MeshConfig(variant=1, data=1, fsdp=AUTO, model=1), n_variants=1, batch_size=1,
                   base_bytes=nbytes, devices=jax.local_devices() if devices is None else devices)


def load_checked_base(model: str, dtype: str, fingerprint: str, base_override, quant: str = "none", mesh=None):
    """(cfg, params, tokenizer, jnp dtype) of a run's base model, checked against its fingerprint and quantised
    as the run's config says (``quant``, :func:`jaxpoison.models.quant.quantize_base`).

    Mesh first, as a study loads (:func:`jaxpoison.train.base_load.load_base`): ``mesh`` (a resolved
    :class:`jaxpoison.train.mesh.MeshConfig`, default :func:`eval_mesh`) is decided before any weight loads and a
    safetensors checkpoint is read straight into the base's shards on it (one device: that device)."""
    from jaxpoison.train.base_load import load_base
    if base_override is None and model in ("", "override"):
        raise EvaluatorError("the run was trained on a base passed in from Python (tests), which the command line "
                             "cannot reload; call jaxpoison.analysis.run.analyze(..., base_override=(cfg, params, "
                             "tokenizer))")
    mesh = eval_mesh(model, dtype, base_override) if mesh is None else mesh
    lm = load_base(model, dtype, None if base_override is None else tuple(base_override[:3]), quant, mesh=mesh)
    if base_override is None and fingerprint and lm.fingerprint != fingerprint:
        raise EvaluatorError(f"the base model {model!r} found here (fingerprint {lm.fingerprint[:12]}) is not the one "
                             f"the run trained on ({fingerprint[:12]}); the adapters would be scored on another model")
    return lm.cfg, lm.params, lm.tokenizer, lm.dtype


def mc_evaluator(mcfg, params, mc, is_target, method: str, dtype, batch_questions: int,
                 share_trunk: bool = True, nontarget=None) -> Callable:
    """``evaluate(lora, scale)`` -> target / non-target accuracy and the target decoy rate of multiple-choice
    questions ``mc`` (option scores ``method``); attack = target accuracy, capability = non-target accuracy."""
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


def capability_scorer(mcfg, params, tok, jdt, own=None, n_questions: int = 64) -> tuple:
    """(fn(lora, scale) -> {"capability": accuracy [N], ...}, description, capability name) on a loaded base:
    ``own`` = (name, multiple-choice eval, batch_questions), a study's own capability set, else ``n_questions``
    embedded ICD-10-CM test questions; option scores ``sum``."""
    from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
    from jaxpoison.data.pool import build_mc_eval
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
    ev = mc_evaluator(mcfg, params, mc, np.zeros(len(mc.ids), bool), "sum", jdt, bq)
    return ev, f"{what}, option scores `sum`", f"{name} accuracy"


def capability_evaluator(model: str, dtype: str, fingerprint: str, base_override=None, n_questions: int = 64,
                         quant: str = "none") -> Evaluator:
    """Capability only (a study without an attack evaluator): :func:`capability_scorer` on the run's base."""
    mcfg, params, tok, jdt = load_checked_base(model, dtype, fingerprint, base_override, quant)
    score, what, name = capability_scorer(mcfg, params, tok, jdt, None, n_questions)

    def evaluate(lora, scale):
        out = score(lora, scale)
        out["attack"] = np.full_like(out["capability"], np.nan)
        return out
    return Evaluator(evaluate, "attack (not measured)", name, capability_only=True, note=f"capability only: {what}")
