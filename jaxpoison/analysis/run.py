"""``python -m jaxpoison analyze RUN_DIR``: weight shift, a poisoned-adapter detector and shrink mitigation of a
finished run (or of a folder of exported PEFT adapters), written next to the run's other results.

What it writes (into the run folder, or ``--out``):

* ``weight_shift.csv`` -- tidy rows, one per variant x module x layer x feature
  (:func:`jaxpoison.analysis.weight_shift.feature_rows`); ``weight_tests.csv`` -- poisoned vs clean adapters per
  feature and layer (KS, permutation test, Cohen's d, Cliff's delta, BH q), for all poisoned variants together and
  for each poison level, with n per group in every row.
* ``detector.json`` -- the leave-one-seed-out logistic detector and the clean-distance score
  (:func:`jaxpoison.analysis.detector.detect`): ``auc``, ``auc_ci``, ``n_clean``, ``n_poisoned``, ``features``,
  ``by_level`` (AUC per poison count / fraction), ``by_kind``, plus what was skipped and why, the mitigation's
  status and the wall times.
* ``mitigation.csv`` -- every (s_A, s_B) grid point x every variant, both sides measured: the attack effect
  (rationale runs: target-subject accuracy, the drop against the same-seed clean variant at the same grid point,
  and the decoy rate; attacks runs: the attack-direction rate of the variant's task from regenerated answers,
  the seed's outcome rates, and ASR against the same-seed 0 % variant at the same grid point) and general
  capability (rationale: non-target accuracy; attacks: the study's capability set); ``mitigation_summary.csv``
  -- per group (poisoned, clean, each grid cell of the study, each task's poisoned adapters)
  :func:`jaxpoison.analysis.mitigation.mitigation_table`.
* ``plots/analysis_*.png`` -- pooled L-inf histograms (clean vs each poison level), per-layer profiles with CI bands
  across seeds, ROC, detector AUC by poison level, mitigation heatmaps.
* ``analysis.md`` / ``analysis.html`` -- the section; the same section is put into the run's ``report.md`` /
  ``report.html`` between ``<!-- jaxpoison-analyze -->`` markers (replaced on a re-run; ``python -m jaxpoison
  report`` rebuilds those files from scratch, so run ``analyze`` again after it).

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
:mod:`jaxpoison.studies.attacks_mitigation` (generation + rule grading; ``--mitigation-notes N`` bounds its
cost). A study without one gets capability only, on embedded ICD-10-CM test questions, and the report says so.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import sys
import time
import typing
from typing import Callable, Optional, Sequence

import numpy as np

from jaxpoison.analysis import detector as D
from jaxpoison.analysis import mitigation as M
from jaxpoison.analysis import plots as P
from jaxpoison.analysis import weight_shift as W

DEFAULT_GRID_A = M.SEED_S_A
DEFAULT_GRID_B = M.SEED_S_B
MARK_BEGIN, MARK_END = "<!-- jaxpoison-analyze -->", "<!-- /jaxpoison-analyze -->"
EVAL_BUCKETS = tuple(range(16, 4097, 16))   # the rationale study's eval buckets (checked by the eval hash)


class AnalysisError(ValueError):
    pass


# ---- inputs ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Adapters:
    """Stacked adapters of V variants and what is known about them."""
    lora: dict                      # {module: {"a": [V, L, in, r], "b": [V, L, r, out]}} (numpy)
    scale: float
    variants: list                  # one dict per variant (variant_id, kind, seed, poison_count, ...)
    source: str                     # 'run' | 'peft'
    meta: dict = dataclasses.field(default_factory=dict)
    run_dir: Optional[pathlib.Path] = None
    study: Optional[str] = None
    step: Optional[int] = None

    @property
    def num_variants(self) -> int:
        return int(next(iter(self.lora.values()))["a"].shape[0])

    def describe(self) -> str:
        first = next(iter(self.lora.values()))
        layers = first["a"].shape[1] if first["a"].ndim == 4 else 1
        return (f"{self.num_variants} adapters, modules {', '.join(self.lora)}, {layers} layers, "
                f"r={first['a'].shape[-1]}, scale {self.scale:g}")


class _quiet_absl:
    """Orbax logs three WARNINGs for every read-only CheckpointManager; a reader does not need them."""

    def __enter__(self):
        try:
            from absl import logging as absl_logging
        except ImportError:
            self.log = None
            return self
        self.log, self.level = absl_logging, absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)
        return self

    def __exit__(self, *a):
        if self.log is not None:
            self.log.set_verbosity(self.level)
        return False


def load_run(run_dir, step: Optional[int] = None) -> Adapters:
    """The stacked adapters of a run folder's checkpoint, with its variant table."""
    from jaxpoison.train.checkpoint import CheckpointError
    from jaxpoison.train.export import load_run_lora

    run = pathlib.Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} does not exist: give a run folder made by `python -m jaxpoison run`")
    if not (run / "checkpoints").is_dir():
        raise CheckpointError(f"{run} has no checkpoints/ folder: not a finished jaxpoison run (for exported PEFT "
                              f"adapters use --peft-dir)")
    try:
        with _quiet_absl():
            lora, meta = load_run_lora(run, step)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Fix: re-run the same `python -m jaxpoison run` command to finish or resume "
                              f"the run, or pass --step with a readable step") from None
    if not lora:
        raise CheckpointError(f"the checkpoint of {run} holds no LoRA tensors")
    from jaxpoison.train.lora import ALL_TARGETS                 # orbax hands the modules back sorted by name
    lora = {m: lora[m] for m in sorted(lora, key=lambda m: (list(ALL_TARGETS) + [m]).index(m))}
    variants = list(meta.get("variants") or [])
    V = int(next(iter(lora.values()))["a"].shape[0])
    if len(variants) != V:
        if variants:
            raise AnalysisError(f"{run}: the checkpoint holds {V} adapters but its variant table {len(variants)}")
        variants = [{"variant_id": i, "kind": "unknown", "seed": 0} for i in range(V)]
    lc = meta.get("lora", {})
    scale = lc.get("scale")
    if scale is None:
        r, alpha = lc.get("r"), lc.get("alpha")
        if r is None or alpha is None:
            raise AnalysisError(f"{run}: the checkpoint metadata has no LoRA scale")
        scale = alpha / (math.sqrt(r) if lc.get("scale_rule") == "rslora" else r)
    study = meta.get("study")
    cf = run / "config.json"
    if cf.exists():
        try:
            study = json.loads(cf.read_text()).get("study", study)
        except json.JSONDecodeError:
            pass
    return Adapters(lora, float(scale), variants, "run", meta, run, study, meta.get("step"))


class _ShapesOnly:
    """The two things :func:`jaxpoison.train.export.load_peft_adapter` asks of a ModelConfig, read from the
    adapter's own tensors (for PEFT adapters written by peft, without our ``jaxpoison_adapter.json``)."""

    def __init__(self, folder: pathlib.Path):
        import re
        from safetensors import safe_open
        from jaxpoison.models.config import HF_MODULE_NAMES
        ours = {v.split(".")[-1]: k for k, v in HF_MODULE_NAMES.items()}
        pat = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)\.lora_([AB])(?:\.default)?\.weight$")
        self.shapes, layers = {}, set()
        with safe_open(str(folder / "adapter_model.safetensors"), "np") as f:
            for k in f.keys():
                m = pat.match(k)
                if not m:
                    continue
                layers.add(int(m.group(1)))
                shape = f.get_slice(k).get_shape()
                mod = ours.get(m.group(2), m.group(2))
                got = self.shapes.setdefault(mod, [None, None])
                if m.group(3) == "A":
                    got[0] = shape[1]
                else:
                    got[1] = shape[0]
        self.num_layers = max(layers) + 1 if layers else 0

    def module_shape(self, module):
        return tuple(self.shapes[module])


def _adapter_dirs(paths: Sequence) -> list:
    out = []
    for p in map(pathlib.Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"--peft-dir {p} does not exist")
        if (p / "adapter_config.json").exists():
            out.append(p)
            continue
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / "adapter_config.json").exists())
        if not subs:
            raise FileNotFoundError(f"{p} holds no PEFT adapter (no adapter_config.json in it or in a subfolder); "
                                    f"export adapters with `python -m jaxpoison export RUN --variant K --out {p}/vK`")
        out += subs
    return out


def _read_labels(path) -> dict:
    """labels.csv: ``folder,kind,seed,poisoned[,poison_count,poison_fraction]`` -> {folder name: variant dict}."""
    p = pathlib.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--labels {p} does not exist")
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "folder" not in rows[0]:
        raise AnalysisError(f"{p}: a labels CSV needs a header with 'folder' and at least one of 'kind' / "
                            f"'poisoned' (optional: seed, poison_count, poison_fraction)")
    out = {}
    for r in rows:
        v: dict = {}
        flag = (r.get("poisoned") or "").strip().lower()
        if flag and flag not in ("1", "0", "true", "false", "yes", "no"):
            raise AnalysisError(f"{p}: poisoned must be true/false (or 1/0), got {r['poisoned']!r}")
        poisoned = None if not flag else flag in ("1", "true", "yes")
        kind = (r.get("kind") or "").strip() or ("poisoned" if poisoned else "clean")
        v["kind"] = kind
        v["seed"] = int(r["seed"]) if (r.get("seed") or "").strip() else 0
        for k in ("poison_count", "poison_fraction"):
            if (r.get(k) or "").strip():
                v[k] = float(r[k])
        if poisoned is not None and W.is_poisoned(v) != poisoned:
            raise AnalysisError(f"{p}: folder {r['folder']!r} says poisoned={r['poisoned']} but kind={kind!r} / "
                                f"its poison level says otherwise; fix the row")
        out[pathlib.Path(r["folder"].strip()).name] = v
    return out


def load_peft_dirs(paths: Sequence, labels_csv=None) -> Adapters:
    """Adapters of one or more PEFT folders (each an adapter or a folder of adapter subfolders), stacked.

    Labels per adapter: the ``variant`` entry of its ``jaxpoison_adapter.json`` (written by ``export``), else the
    row of ``labels_csv`` for its folder name."""
    from jaxpoison.models.config import ModelConfig
    from jaxpoison.train.export import load_peft_adapter

    dirs = _adapter_dirs(paths)
    labels = _read_labels(labels_csv) if labels_csv else {}
    loras, scales, variants, metas = [], [], [], []
    for i, d in enumerate(dirs):
        extra = {}
        jf = d / "jaxpoison_adapter.json"
        if jf.exists():
            extra = json.loads(jf.read_text())
        cfg = ModelConfig.from_json(extra["model"]) if "model" in extra else _ShapesOnly(d)
        lora, scale = load_peft_adapter(d, cfg)
        if d.name in labels:
            v = dict(labels[d.name])
        elif isinstance(extra.get("variant"), dict) and extra["variant"]:
            v = dict(extra["variant"])
        else:
            raise AnalysisError(f"{d}: no label: its jaxpoison_adapter.json has no 'variant' entry; fix: pass "
                                f"--labels labels.csv with columns folder,kind,seed,poisoned")
        v.setdefault("variant_id", i)
        v["adapter"] = d.name
        loras.append(lora)
        scales.append(scale)
        variants.append(v)
        metas.append(extra)
    ref = loras[0]
    for d, lora, s in zip(dirs, loras, scales):
        if sorted(lora) != sorted(ref):
            raise AnalysisError(f"{d} adapts modules {sorted(lora)}, {dirs[0]} {sorted(ref)}: analyse adapters of "
                                f"one kind together")
        for m in lora:
            if lora[m]["a"].shape != ref[m]["a"].shape or lora[m]["b"].shape != ref[m]["b"].shape:
                raise AnalysisError(f"{d}: module {m} has shapes {lora[m]['a'].shape} / {lora[m]['b'].shape}, "
                                    f"{dirs[0]} {ref[m]['a'].shape} / {ref[m]['b'].shape} (another model or r)")
        if not math.isclose(s, scales[0], rel_tol=1e-6):
            raise AnalysisError(f"{d} has LoRA scale {s:g}, {dirs[0]} {scales[0]:g}: the norms would not compare")
    if len({v["variant_id"] for v in variants}) != len(variants):
        for i, v in enumerate(variants):
            v["variant_id"] = i
    stacked = {m: {k: np.stack([l[m][k] for l in loras]) for k in ("a", "b")} for m in ref}
    meta = {"model": metas[0].get("model"), "adapters": [str(d) for d in dirs]}
    return Adapters(stacked, float(scales[0]), variants, "peft", meta)


def normalise_variants(variants: Sequence[dict]) -> list:
    """Copies of the variant dicts in the form :mod:`.weight_shift` reads: a ``kind`` where a study's table has
    none (the attacks study: ``poisoned`` when its poison count / fraction is > 0, else ``clean``) and
    ``poison_fraction`` from ``fraction``."""
    out = []
    for i, v in enumerate(variants):
        v = dict(v)
        v.setdefault("variant_id", i)
        if "fraction" in v and "poison_fraction" not in v:
            v["poison_fraction"] = v["fraction"]
        if not v.get("kind"):
            levels = [W._num(v.get(k)) for k in W.LEVEL_KEYS if v.get(k) not in (None, "")]
            v["kind"] = "poisoned" if any(x > 0 for x in levels) else "clean"
        out.append(v)
    return out


def labels_for(variants: Sequence[dict]) -> dict:
    """:func:`weight_shift.variant_labels`, with the clean reference of a variant taken from its own task where
    the variants carry one (the attacks study trains every task's variants of a seed from one LoRA init)."""
    labels = W.variant_labels(variants)
    tasks = [v.get("task") for v in variants]
    if any(t is not None for t in tasks):
        first = {}
        for i in np.flatnonzero(labels["clean"]):
            first.setdefault((labels["seed"][i].item(), tasks[i]), i)
        labels["reference"] = np.array([first.get((s.item(), t), -1) for s, t in zip(labels["seed"], tasks)], int)
    return labels


def parse_modules(spec, available: Sequence[str]) -> list:
    """``--modules``: our names (q, v, ...), HF names (q_proj, ...), 'all', or regexes; each must be adapted."""
    from jaxpoison.train.lora import resolve_targets
    if spec is None:
        return list(M.SEED_MODULES) if set(M.SEED_MODULES) <= set(available) else list(available)
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise AnalysisError("--modules is empty; give e.g. --modules q,v")
    out = []
    for s in items:
        if s in available:
            out.append(s)
            continue
        try:
            hits = resolve_targets([s])
        except ValueError:
            hits = []
        if s == "all":
            hits = list(available)
        hits = [h for h in hits if h in available]
        if not hits:
            raise AnalysisError(f"--modules: {s!r} is not a module of these adapters; they adapt "
                                f"{', '.join(available)}")
        out += hits
    return [m for m in available if m in set(out)]


def parse_grid(spec, name: str) -> tuple:
    if spec is None:
        return None
    vals = spec if isinstance(spec, (list, tuple)) else [x for x in str(spec).split(",") if x.strip()]
    try:
        out = tuple(float(x) for x in vals)
    except ValueError:
        raise AnalysisError(f"{name}: comma-separated numbers, e.g. 0.02,0.04,0.06; got {spec!r}") from None
    if not out or any(not math.isfinite(x) or x < 0 for x in out):
        raise AnalysisError(f"{name}: non-negative shrink factors, got {spec!r}")
    return out


# ---- weight shift --------------------------------------------------------------------------------------------
def group_labels(variants: Sequence[dict], labels: dict) -> np.ndarray:
    """Plot groups per variant: 'clean', 'forgetting', 'poisoned (<level>)'."""
    out = []
    for v, p, lev in zip(variants, labels["poisoned"], labels["level"]):
        if not p:
            out.append("forgetting" if v.get("kind") == "forgetting" else "clean")
        else:
            out.append(f"poisoned ({lev:g})" if np.isfinite(lev) and lev > 0 else "poisoned")
    return np.array(out)


def _group_order(groups) -> list:
    def key(g):
        if g == "clean":
            return (0, 0.0)
        if g == "forgetting":
            return (1, 0.0)
        try:
            return (2, float(g.split("(")[1].rstrip(")")))
        except (IndexError, ValueError):
            return (3, 0.0)
    return sorted(set(np.asarray(groups).tolist()), key=key)


def weight_tests(feats: dict, labels: dict, n_resamples: int, seed: int = 0) -> tuple:
    """group_tests for all poisoned vs clean and for each poison level vs clean; (rows, skipped reasons)."""
    clean, poisoned = labels["clean"], labels["poisoned"]
    rows, skipped = [], []
    comps = [("poisoned vs clean", poisoned)]
    levels = labels["level"]
    uniq = np.unique(levels[poisoned & np.isfinite(levels)])
    if len(uniq) > 1:
        comps += [(f"{labels['level_key']}={lv:g} vs clean", poisoned & (levels == lv)) for lv in uniq]
    for name, pos in comps:
        if pos.sum() < 2 or clean.sum() < 2:
            skipped.append(f"{name}: needs >= 2 adapters per group, has {int(pos.sum())} poisoned and "
                           f"{int(clean.sum())} clean")
            continue
        for r in W.group_tests(feats, poisoned, include=clean | pos, n_resamples=n_resamples, seed=seed):
            rows.append({"comparison": name, **r})
    return rows, skipped


# ---- detector ---------------------------------------------------------------------------------------------------
def _reduced_detect(x, names, y, groups, levels, n_resamples, seed, why) -> dict:
    """The logistic half of :func:`detect` when the clean-distance score cannot be formed."""
    scores, coefs = D.cross_validated_scores(x, y, groups, seed=seed)
    folds = D.grouped_folds(groups, None, seed)
    fpr, tpr, _ = D.roc_curve(scores, y)
    full = D.fit_logistic(x, y)
    order = np.argsort(-np.abs(full["coef"]))[:20]
    uni = D.roc_auc(x.T, y)
    uni_order = np.argsort(-np.abs(uni - 0.5))[:20]
    rep = {**D._auc_summary(scores, y, groups, folds, n_resamples, seed), "features": list(names),
           "cv": "leave-one-seed-out", "l2": 1.0, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
           "coefficients": [{"feature": names[j], "coef": float(full["coef"][j]),
                             "fold_mean": float(coefs[:, j].mean()), "fold_sd": float(coefs[:, j].std())}
                            for j in order],
           "univariate_auc": [{"feature": names[j], "auc": float(uni[j])} for j in uni_order],
           "distance": {"skipped": why}, "scores": scores.tolist()}
    rep["by_level"] = []
    for level in np.unique(levels[y & np.isfinite(levels)]):
        keep = ~y | (levels == level)
        rep["by_level"].append({"level": float(level), **D._auc_summary(
            scores[keep], y[keep], groups[keep], D._restrict(folds, keep), n_resamples, seed)})
    return rep


def run_detector(feats: dict, variants: Sequence[dict], labels: dict, n_resamples: int = 2000,
                 seed: int = 0) -> dict:
    """detector.json's content. Always has ``n_clean``, ``n_poisoned``, ``auc``, ``auc_ci``; ``skipped`` says why
    a part could not be computed."""
    y = np.asarray(labels["poisoned"], bool)
    kinds = np.array([str(v.get("kind", "")) for v in variants])
    base = {"n_clean": int((~y).sum()), "n_poisoned": int(y.sum()),
            "n_forgetting": int(np.sum(kinds == "forgetting")), "n_seeds": int(len(np.unique(labels["seed"]))),
            "level_key": labels["level_key"], "negatives": "every non-poisoned adapter (clean and forgetting)"}
    if y.sum() < 2 or (~y).sum() < 2:
        return {**base, "auc": None, "auc_ci": [None, None], "features": [], "by_level": [],
                "skipped": f"the detector needs >= 2 clean and >= 2 poisoned adapters; this input has "
                           f"{int((~y).sum())} clean and {int(y.sum())} poisoned, so no classifier was fitted "
                           f"(weight_shift.csv and the plots are still written)"}
    x, names = D.feature_matrix(feats)
    groups = np.asarray(labels["seed"])
    notes = []
    one_seed = len(np.unique(groups)) < 2
    if one_seed:
        groups = np.arange(len(y))
        notes.append("all adapters have one seed: folds leave one adapter out (siblings of a seed may sit on both "
                     "sides, so the AUC can be optimistic)")
    levels = np.asarray(labels["level"], float)
    if labels["level_key"] is None:          # no poison count / fraction known: no per-level AUCs
        levels = np.full(len(y), np.nan)
    try:
        rep = D.detect(x, names, y, groups, levels=levels, n_resamples=n_resamples, seed=seed)
    except ValueError as e:
        if "clean adapters outside a fold" not in str(e):
            return {**base, "auc": None, "auc_ci": [None, None], "features": list(names), "by_level": [],
                    "skipped": f"detector not fitted: {e}"}
        notes.append(f"clean-distance score skipped: {e}")
        try:
            rep = _reduced_detect(x, names, y, groups, levels, n_resamples, seed, str(e))
        except ValueError as e2:
            return {**base, "auc": None, "auc_ci": [None, None], "features": list(names), "by_level": [],
                    "skipped": f"detector not fitted: {e2}"}
    rep = {**rep, **base}
    if one_seed:
        rep["cv"] = "leave-one-adapter-out"
    for b in rep.get("by_level", []):
        b["level_key"] = labels["level_key"]
    # AUC per poison kind (each kind vs every non-poisoned adapter), from the same out-of-fold scores
    scores = np.asarray(rep["scores"], float)
    folds = D.grouped_folds(groups, None, seed)
    pk = sorted(set(kinds[y].tolist()))
    if len(pk) > 1:
        rep["by_kind"] = []
        for k in pk:
            keep = ~y | (kinds == k)
            rep["by_kind"].append({"kind": k, **D._auc_summary(scores[keep], y[keep], groups[keep],
                                                                D._restrict(folds, keep), n_resamples, seed)})
    tasks = np.array([str(v.get("task", "")) for v in variants])
    if len(set(tasks.tolist())) > 1:         # each task's poisoned vs its own non-poisoned adapters
        rep["by_task"] = []
        for task in sorted(set(tasks.tolist())):
            keep = tasks == task
            if y[keep].any() and not y[keep].all():
                rep["by_task"].append({"task": task, **D._auc_summary(scores[keep], y[keep], groups[keep],
                                                                       D._restrict(folds, keep), n_resamples, seed)})
    n_rows = [v.get("n_rows") for v in variants]
    if all(isinstance(n, (int, float)) for n in n_rows):
        n_rows = np.asarray(n_rows, float)
        rep["n_rows_auc"] = float(D.roc_auc(n_rows, y))
        if rep["n_rows_auc"] > 0.75:
            notes.append(f"poisoned variants trained on more rows than the non-poisoned ones (mean "
                         f"{n_rows[y].mean():.3g} vs {n_rows[~y].mean():.3g}; the row count alone separates them "
                         f"with AUC {rep['n_rows_auc']:.2f}); adapter norms grow with the number of optimizer steps, "
                         f"so part of the detector's AUC may be data size, not poison; forgetting controls "
                         f"(grid.forgetting_extra) or ratio-all cells give negatives of the same size")
    rep["variant_ids"] = [v.get("variant_id", i) for i, v in enumerate(variants)]
    rep["feature_set"] = {"modules": sorted({n.split("/")[0].replace("log ", "") for n in names}),
                          "features": list(W.INTRINSIC_FEATURES), "per_layer": True, "logged": "positive columns",
                          "excluded": list(W.REFERENCE_FEATURES) + ["(need the clean twin, unknown to a detector)"]}
    if notes:
        rep["notes"] = notes
    return rep


# ---- mitigation evaluators -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Evaluator:
    """Scores stacked adapters [N, ...] -> per-adapter metric arrays [N] (``attack`` and ``capability`` at least).

    ``evaluate(lora, scale)``; with ``needs_variants`` ``evaluate(lora, scale, variants=...)``, where
    ``variants[i]`` is the variant dict of adapter ``i`` (its ``task``, ``seed``, ...) or None for a padding
    adapter whose metrics are discarded (the attacks study: each adapter answers its own task's prompts).
    ``paired(res, reference)``, if given, is called once after the whole grid with the metric arrays [G, V] and
    each variant's same-seed clean twin (``reference[v]``, -1 = none) and returns more [G, V] columns (the
    attacks study: ASR against the 0 % variant at the same grid point)."""
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


def _load_base(model: str, dtype: str, fingerprint: str, base_override):
    """(cfg, params, tokenizer, jnp dtype) of the run's base model, checked against its fingerprint."""
    import jax.numpy as jnp
    if base_override is not None:
        cfg, params, tok = base_override[:3]
        return cfg, params, tok, jnp.float32
    if model in ("", "override"):
        raise AnalysisError("the run was trained on a base passed in from Python (tests), which the command line "
                            "cannot reload; call jaxpoison.analysis.run.analyze(..., base_override=(cfg, params, "
                            "tokenizer))")
    from jaxpoison.models.lm import load_model
    lm = load_model(model, dtype)
    if fingerprint and lm.fingerprint != fingerprint:
        raise AnalysisError(f"the base model {model!r} found here (fingerprint {lm.fingerprint[:12]}) is not the one "
                            f"the run trained on ({fingerprint[:12]}); the adapters would be scored on another model")
    return lm.cfg, lm.params, lm.tokenizer, lm.dtype


def _mc_evaluator(mcfg, params, mc, is_target, method: str, dtype, batch_questions: int) -> Callable:
    from jaxpoison.eval.score import choice_metrics, score_options
    tgt = np.asarray(is_target, bool)
    has = (np.asarray(mc.decoy) >= 0) & tgt

    def evaluate(lora, scale):
        s = score_options(params, mcfg, mc, lora, lora_scale=float(scale), dtype=dtype,
                          batch_questions=batch_questions, calibrate=method == "calibrated", progress=False)
        m = choice_metrics(s.method(method), mc.answer, mc.decoy)
        cor = m["correct"].astype(float)
        nan = np.full(cor.shape[0], np.nan)
        out = {"target_acc": cor[:, tgt].mean(1) if tgt.any() else nan,
               "nontarget_acc": cor[:, ~tgt].mean(1) if (~tgt).any() else nan,
               "target_decoy_rate": ((m["pick"] == mc.decoy[None]) & has[None]).sum(1) / has.sum()
               if has.any() else nan}
        out["attack"], out["capability"] = out["target_acc"], out["nontarget_acc"]
        return out
    return evaluate


def rationale_evaluator(run_dir, base_override=None) -> Evaluator:
    """The seed-000 study's test questions rebuilt from ``config.json`` + the question ids in ``scores.npz``,
    checked against the run's eval hash; attack = target-subject accuracy, capability = non-target accuracy."""
    from jaxpoison.data.pool import build_mc_eval
    from jaxpoison.studies import rationale as R
    run = pathlib.Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())["config"]
    if not (run / "scores.npz").exists():
        raise AnalysisError(f"{run} has no scores.npz (the run stopped before scoring): the test questions are "
                            f"unknown; finish the run first")
    z = np.load(run / "scores.npz", allow_pickle=False)
    ids, is_target = [str(i) for i in z["ids"]], z["is_target"].astype(bool)
    d = dataclass_from_dict(R.DataConfig, cfg["data"])
    _, test = R.load_examples(d)
    by_id = {ex.id: ex for ex in test}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AnalysisError(f"{len(missing)} test questions of the run (e.g. {missing[0]}) are not in the data "
                            f"set rebuilt from config.json: the data changed since the run")
    base = json.loads((run / "data.json").read_text()).get("base", {}) if (run / "data.json").exists() else {}
    model = "override" if base.get("name") == "override" else cfg["model"]
    mcfg, params, tok, dtype = _load_base(model, cfg.get("dtype", "float32"), base.get("fingerprint", ""),
                                          base_override)
    mc = build_mc_eval([by_id[i] for i in ids], tok, cfg["eval"]["format"], max_len=d.max_len, buckets=EVAL_BUCKETS)
    want = json.loads((run / "data.json").read_text()).get("eval_hash") if (run / "data.json").exists() else None
    if want and mc.data_hash != want:
        raise AnalysisError("the test questions rebuilt from config.json tokenize differently from the run's "
                            "(eval hash mismatch: another tokenizer or code version)")
    method = cfg["eval"].get("method", "sum")
    ev = _mc_evaluator(mcfg, params, mc, is_target, method, dtype, int(cfg["eval"].get("batch_questions", 8)))
    return Evaluator(ev, "target-subject accuracy", "non-target accuracy", attack_lower_is_better=False,
                     note=f"{int(is_target.sum())} target and {int((~is_target).sum())} non-target test questions "
                          f"of the run, option scores `{method}`")


def _study_capability_set(study_cfg: dict, tok):
    """The attacks study's own first general-capability set (its ``capability`` config), or None."""
    try:
        from jaxpoison.studies import attacks, attacks_steps
        cap = dataclass_from_dict(attacks.CapabilityConfig, study_cfg["capability"])
        if not cap.sources:
            return None
        sets = attacks_steps.capability_sets(cap, tok, int(study_cfg.get("max_len", 4096)))
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
    mcfg, params, tok, jdt = _load_base(model, dtype, fingerprint, base_override)
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
                            "and test questions to use, or --no-mitigation")
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


# ---- mitigation -------------------------------------------------------------------------------------------------
def _take(tree, idx):
    return {m: {k: np.asarray(x)[idx] for k, x in t.items()} for m, t in tree.items()}


def mitigation_cost_hint(ad: Adapters, n_points: int) -> str:
    """One line with the mitigation grid's size and, for a run folder whose study recorded how long its own scoring
    took (``timing.json``), the expected time at that rate, with the flags that make it cheaper."""
    n = n_points * ad.num_variants
    line = f"mitigation: {n_points} grid points x {ad.num_variants} adapters = {n} adapter evaluations"
    run = ad.run_dir
    try:
        timing = json.loads((run / "timing.json").read_text()) if run is not None else {}
    except (OSError, ValueError):
        timing = {}
    per = None
    if timing.get("eval_s"):                                   # rationale: base + variants scored once
        per = timing["eval_s"] / (ad.num_variants + 1)
    elif timing.get("generate_variants_s"):                    # attacks: the variants' generation
        per = timing["generate_variants_s"] / ad.num_variants
    if per:
        line += (f", about {n * per / 60:.0f} min at the study's own rate ({per:.1f} s per adapter); fewer points: "
                 f"--grid-a 0.06 --grid-b 0.16 (4 with the unscaled one), or --no-mitigation")
    return line


def evaluate_grid(ad: Adapters, evaluator: Evaluator, s_a, s_b, modules, adapters_per_call: int = 32,
                  progress: bool = True) -> dict:
    """Every grid point x variant: metric arrays [G, V]. Chunks of variants are shrunk at every grid point
    (``shrink_grid``), flattened to one adapter axis (grid-major) and scored in one vmapped call; chunks are padded
    to a fixed size so the scorer compiles once."""
    import jax
    grid = M.grid_points(s_a, s_b)
    G, V = len(grid), ad.num_variants
    vc = max(1, min(V, adapters_per_call // G if adapters_per_call else V))
    vc = -(-V // -(-V // vc))          # balance the chunks: 9 variants at 8 per call -> 5 + 5, not 8 + 8 (padded)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=G * V, desc=f"mitigation {G} grid points x {V} variants", unit="adapter")
    out: dict = {}
    try:
        for v0 in range(0, V, vc):
            idx = np.arange(v0, min(V, v0 + vc))
            n = len(idx)
            pad = np.concatenate([idx, np.full(vc - n, idx[0])])
            shrunk = M.shrink_grid(_take(ad.lora, pad), s_a, s_b, modules)                 # [G, vc, ...]
            flat = jax.tree.map(lambda x: x.reshape((G * vc,) + x.shape[2:]), shrunk)
            if evaluator.needs_variants:       # flat index g * vc + j is variant pad[j]; padding -> None
                vs = [ad.variants[i] if j < n else None for j, i in enumerate(pad)]
                res = evaluator.evaluate(flat, ad.scale, variants=vs * G)
            else:
                res = evaluator.evaluate(flat, ad.scale)
            for k, val in res.items():
                val = np.asarray(val, float).reshape(G, vc)[:, :n]
                out.setdefault(k, np.full((G, V), np.nan))[:, idx] = val
            if bar:
                bar.update(G * n)
    finally:
        if bar:
            bar.close()
    return {"grid": grid, **out}


def mitigation_rows(res: dict, variants: Sequence[dict], labels: dict) -> list:
    """mitigation.csv: one row per grid point x variant with both sides and their change from (0, 0)."""
    grid = res["grid"]
    base = np.flatnonzero((grid[:, 0] == 0) & (grid[:, 1] == 0))
    known = ("attack", "asr", "capability", "target_acc", "nontarget_acc", "target_decoy_rate", "target_drop")
    metrics = [k for k in known if k in res] + sorted(k for k in res if k != "grid" and k not in known)
    has_task = any(var.get("task") for var in variants)
    rows = []
    for g, (sa, sb) in enumerate(grid):
        for v, var in enumerate(variants):
            r = {"s_a": float(sa), "s_b": float(sb), "variant_id": var.get("variant_id", v),
                 "name": var.get("name", var.get("adapter", "")), "kind": var.get("kind"), "seed": var.get("seed"),
                 "poison_count": var.get("poison_count"), "poisoned": bool(labels["poisoned"][v])}
            if has_task:
                r["task"] = var.get("task")
            for k in metrics:
                r[k] = float(res[k][g, v])
                if base.size and k in ("attack", "capability"):
                    r[f"{k}_change"] = float(res[k][g, v] - res[k][base[0], v])
            rows.append(r)
    return rows


def _target_drop(res: dict, labels: dict) -> Optional[np.ndarray]:
    ref = np.asarray(labels["reference"])
    if "target_acc" not in res or (ref < 0).all():
        return None
    acc = res["target_acc"]
    return np.where(ref[None] >= 0, acc[:, np.maximum(ref, 0)] - acc, np.nan)


def mitigation_summary(res: dict, variants: Sequence[dict], labels: dict, evaluator: Evaluator) -> tuple:
    """(rows of mitigation_summary.csv, the attack metric used for the poisoned group, its direction)."""
    y = np.asarray(labels["poisoned"], bool)
    drop, asr = res.get("target_drop"), res.get("asr")
    if drop is not None and np.isfinite(drop[:, y]).all() and y.any():
        attack, name, lower = drop, "target drop vs same-seed clean at the same grid point", True
    elif asr is not None and y.any() and np.isfinite(asr[:, y]).all():
        attack, name, lower = asr, "ASR vs the same-seed 0 % variant at the same grid point", True
    else:
        attack, name, lower = res["attack"], evaluator.attack_name, evaluator.attack_lower_is_better
    groups = [("poisoned", y), ("clean", np.asarray(labels["clean"], bool))]
    cells = sorted({v.get("spec_name") for v in variants if v.get("spec_name")})
    groups += [(c, np.array([v.get("spec_name") == c for v in variants])) for c in cells]
    tasks = sorted({v.get("task") for v in variants if v.get("task")})
    if len(tasks) > 1:                                 # the attacks study: each task's poisoned adapters
        groups += [(f"poisoned {t}", y & np.array([v.get("task") == t for v in variants])) for t in tasks]
    rows = []
    for gname, sel in groups:
        if not sel.any():
            continue
        a = attack if gname != "clean" else res["attack"]
        lw = lower if gname != "clean" else evaluator.attack_lower_is_better
        for r in M.mitigation_table(res["grid"], a[:, sel], res["capability"][:, sel], attack_lower_is_better=lw):
            rows.append({"group": gname, "attack_metric": name if gname != "clean" else evaluator.attack_name,
                         "capability_metric": evaluator.capability_name, **r})
    return rows, name, lower


# ---- plots -------------------------------------------------------------------------------------------------------
def _level_plot(by_level: list, level_key: str, path) -> str:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    lv = [b["level"] for b in by_level]
    for key, label, color in (("auc", "logistic (per-fold mean, 95 % CI)", P.PALETTE[4]),
                              ("distance_auc", "clean distance", P.PALETTE[2])):
        vals = [b.get(key, np.nan) for b in by_level]
        vals = [np.nan if v is None else v for v in vals]
        if key == "auc":
            lo = [np.nan if b["auc_ci"][0] is None else b["auc_ci"][0] for b in by_level]
            hi = [np.nan if b["auc_ci"][1] is None else b["auc_ci"][1] for b in by_level]
            err = np.array([np.subtract(vals, lo), np.subtract(hi, vals)])
            ax.errorbar(lv, vals, yerr=np.where(np.isfinite(err), err, 0), fmt="o-", color=color, capsize=3,
                        label=label)
        elif np.isfinite(vals).any():
            ax.plot(lv, vals, "s--", color=color, label=label)
    ax.axhline(0.5, color="grey", ls=":", lw=1)
    ax.set(xlabel=level_key or "poison level", ylabel="ROC AUC (poisoned vs clean)", ylim=(0, 1.02),
           title="detection vs poison level")
    if len(lv) > 1 and min(lv) > 0 and max(lv) / min(lv) > 10:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(lv, [f"{v:g}" for v in lv])
    ax.legend(fontsize=8, loc="lower right")
    return P._save(fig, path)


def make_plots(out: pathlib.Path, ad: Adapters, feats: dict, labels: dict, groups: np.ndarray, det: dict,
               mit: Optional[dict], hist_module: str) -> list:
    pdir = out / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    figs = []
    order = _group_order(groups)
    linf = W.linf_columns(ad.lora, [hist_module])[hist_module]
    pooled = {g: {"a": linf["a"][groups == g], "b": linf["b"][groups == g]} for g in order}
    figs.append((P.linf_histograms(pooled, pdir / "analysis_linf_hist.png",
                                   title=f"{hist_module}: pooled over layers and variants"),
                 f"Seed 003's measure on `{hist_module}`: per-column L-inf norms of LoRA A and B pooled over layers, "
                 f"clean vs each poison level (share of columns; n = columns pooled)."))
    layered = [k for k in feats if np.ndim(feats[k]) == 2 and np.shape(feats[k])[1] > 1]
    if layered:
        keys = [f"{hist_module}/{f}" for f in ("fro", "spectral", "erank", "linf_b_max", "shift", "cosine")
                if f"{hist_module}/{f}" in layered]
        order_idx = np.concatenate([np.flatnonzero(groups == g) for g in order])
        fs = {k: np.asarray(feats[k])[order_idx] for k in feats}
        figs.append((P.layer_profiles(fs, groups[order_idx], pdir / "analysis_profiles.png", keys=keys),
                     f"Per-layer features of `{hist_module}` (mean over seeds, band: 95 % t interval across seeds). "
                     f"`shift` / `cosine` compare each adapter with the clean variant of its seed."))
        fro = [f"{m}/fro" for m in ad.lora if f"{m}/fro" in layered]
        if len(fro) > 1:
            figs.append((P.layer_profiles(fs, groups[order_idx], pdir / "analysis_profiles_fro.png", keys=fro),
                         "Frobenius norm of the update s·A·B per layer, every adapted module."))
    if det.get("roc"):
        curves = {"logistic, leave-one-seed-out": (det["roc"]["fpr"], det["roc"]["tpr"], det.get("auc_pooled"))}
        if det.get("distance_scores"):
            y = np.asarray(labels["poisoned"], bool)
            fpr, tpr, _ = D.roc_curve(np.asarray(det["distance_scores"], float), y)
            curves["distance from clean adapters"] = (fpr, tpr, det["distance"].get("auc_pooled"))
        figs.append((P.roc_plot(curves, pdir / "analysis_roc.png"),
                     f"ROC of the detectors on out-of-fold scores ({det['n_poisoned']} poisoned, {det['n_clean']} "
                     f"clean adapters, {det['n_seeds']} seeds)."))
    if len(det.get("by_level", [])) > 1:
        figs.append((_level_plot(det["by_level"], det.get("level_key"), pdir / "analysis_auc_by_level.png"),
                     "Detector AUC per poison level (each level against all non-poisoned adapters)."))
    if mit and mit.get("status") == "done":
        for gname in ("poisoned", "clean"):
            fname = f"analysis_mitigation_{gname}.png"
            rows = [r for r in mit["summary"] if r["group"] == gname]
            if not rows:
                continue
            sa, sb, att = M.as_heatmap(rows, "attack")
            _, _, cap = M.as_heatmap(rows, "capability")
            lower = mit["attack_lower_is_better"] if gname == "poisoned" else mit["raw_attack_lower_is_better"]
            alabel = (mit["attack_metric"] if gname == "poisoned" else mit["attack_name"]) + f" ({gname})"
            if not np.isfinite(att).any():
                att = np.zeros_like(cap)
                alabel = "attack not measured (capability only)"
            figs.append((P.mitigation_heatmaps(sa, sb, att, cap, pdir / fname, attack_label=alabel,
                                               capability_label=f"{mit['capability_name']} ({gname})",
                                               attack_lower_is_better=lower),
                         f"Shrink mitigation on the {gname} adapters: mean over variants at every (s_A, s_B) "
                         f"(s_A, s_B = 0: unscaled). Bold: best cell."))
    return [(str(pathlib.Path(p).relative_to(out)), cap) for p, cap in figs]


# ---- report ------------------------------------------------------------------------------------------------------
def _fmt_ci(v, ci) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    lo, hi = (ci or [None, None])[:2]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{v:.3f}"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def build_doc(ad: Adapters, det: dict, tests: list, test_skips: list, mit: Optional[dict], figs: list,
              timing: dict, out: pathlib.Path):
    from jaxpoison.studies.report_utils import Doc
    d = Doc("Weight shift, poisoned-adapter detection and shrink mitigation")
    y = det["n_poisoned"]
    where = f"checkpoint step {ad.step}" if ad.step else ad.source
    d.p(f"`python -m jaxpoison analyze` on {ad.describe()} ({where}"
        f"): {det['n_clean']} non-poisoned ({det.get('n_forgetting', 0)} of them forgetting controls) and {y} "
        f"poisoned adapters over {det['n_seeds']} seeds.")
    d.h("Weight shift", 3)
    d.p("Per variant, layer and module: Frobenius and spectral norm of the update s·A·B (from r × r Gram matrices), "
        "its effective rank, the seed's per-column L-inf norms of A and B, and against the clean variant of the same "
        "seed the cosine and the shift |ΔW − ΔW_clean|. Tests (KS, permutation on the mean, Cohen's d, Cliff's "
        "delta, BH q over all cells) compare poisoned with clean adapters; every row of `weight_tests.csv` states "
        "the n per group.")
    main = [r for r in tests if r["comparison"] == "poisoned vs clean"]
    if main:
        top = sorted(main, key=lambda r: (np.nan_to_num(r["perm_p"], nan=2.0),
                                          -abs(np.nan_to_num(r["cliffs_delta"]))))[:10]
        d.table(["module", "feature", "layer", "n clean / poisoned", "mean clean", "mean poisoned", "Cliff's δ",
                 "Cohen's d", "p (perm.)", "q (BH)"],
                [[r["module"], r["feature"], "" if r["layer"] is None else r["layer"],
                  f"{r['n_clean']} / {r['n_poisoned']}", f"{r['mean_clean']:.4g}", f"{r['mean_poisoned']:.4g}",
                  r["cliffs_delta"], r["cohens_d"], f"{r['perm_p']:.3g}", f"{r['perm_q']:.3g}"] for r in top])
        nsig = sum(1 for r in main if np.isfinite(r["perm_q"]) and r["perm_q"] < 0.05)
        d.p(f"{nsig} of {len(main)} (feature, layer) cells differ at BH q < 0.05 (the 10 smallest p shown).")
    for s in test_skips:
        d.p(f"Skipped: {s}.")
    d.h("Detector", 3)
    if det.get("auc") is None:
        d.p(f"Skipped: {det.get('skipped', 'not fitted')}.")
    else:
        dist = det.get("distance", {})
        d.p(f"L2 logistic regression on {len(det['features'])} per-layer features, {det['cv']} cross-validation: "
            f"AUC **{_fmt_ci(det['auc'], det['auc_ci'])}** (mean of per-fold AUCs, Nadeau-Bengio 95 % CI); pooled "
            f"out-of-fold AUC {_fmt_ci(det.get('auc_pooled'), det.get('auc_pooled_ci'))} (seed bootstrap, "
            f"optimistic). Unsupervised distance from the clean adapters of the other seeds: "
            + (f"AUC {_fmt_ci(dist.get('auc'), dist.get('auc_ci'))}." if "auc" in dist else
               f"skipped ({dist.get('skipped', '')})."))
        if det.get("by_level"):
            d.table([f"{det.get('level_key') or 'level'}", "n poisoned", "n clean", "AUC (95 % CI)", "distance AUC"],
                    [[int(b["level"]) if float(b["level"]).is_integer() else f"{b['level']:.4g}", b["n_poisoned"],
                      b["n_clean"], _fmt_ci(b["auc"], b["auc_ci"]),
                      b.get("distance_auc")] for b in det["by_level"]])
        for key in ("kind", "task"):
            if det.get(f"by_{key}"):
                d.table([key, "n poisoned", "n clean", "AUC (95 % CI)"],
                        [[b[key], b["n_poisoned"], b["n_clean"], _fmt_ci(b["auc"], b["auc_ci"])]
                         for b in det[f"by_{key}"]])
        uni = det.get("univariate_auc", [])[:5]
        if uni:
            d.p("Strongest single features (AUC on their own, in-sample): " +
                "; ".join(f"`{u['feature']}` {u['auc']:.2f}" for u in uni) + ".")
        for n in det.get("notes", []):
            d.p(f"Note: {n}.")
    d.h("Shrink mitigation", 3)
    if not mit or mit.get("status") != "done":
        d.p(f"Not run: {(mit or {}).get('reason', 'disabled with --no-mitigation')}.")
    else:
        attack = ("not measured (capability only)" if mit["capability_only"] else
                  f"{mit['attack_metric']} ({'lower' if mit['attack_lower_is_better'] else 'higher'} is better for "
                  f"the defender)")
        note = mit["note"][:1].upper() + mit["note"][1:]
        sa, sb = (", ".join(f"{x:g}" for x in mit[k]) for k in ("s_a", "s_b"))
        d.p(f"Seed 003's shrink W·(1 − s·exp(−|W|)) on the A / B factors of `{', '.join(mit['modules'])}` over "
            f"s_A ∈ {{{sa}}} × s_B ∈ {{{sb}}}, "
            f"{mit['n_adapters']} adapters scored ({mit['seconds']:.0f} s). Attack effect: {attack}; general "
            f"capability: {mit['capability_name']}. {note}.")
        rows = [r for r in mit["summary"] if r["group"] == "poisoned"]
        if rows:
            d.table(["s_A", "s_B", "attack (95 % CI)", "Δ attack", "capability (95 % CI)", "Δ capability", "Pareto"],
                    [[f"{r['s_a']:g}", f"{r['s_b']:g}", _fmt_ci(r["attack"], [r["attack_low"], r["attack_high"]]),
                      r["attack_change"], _fmt_ci(r["capability"], [r["capability_low"], r["capability_high"]]),
                      r["capability_change"], "yes" if r["pareto"] else ""] for r in rows])
    for f, cap in figs:
        d.figure(f, cap)
    d.p("Files: `weight_shift.csv`, `weight_tests.csv`, `detector.json`, `mitigation.csv`, `mitigation_summary.csv`, "
        "`plots/analysis_*.png`. Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()) + ".")
    return d


def write_report(d, out: pathlib.Path, run_dir: Optional[pathlib.Path]) -> list:
    """analysis.md/.html always; the section between markers in the run's report.md/.html when they exist."""
    written = list(d.write(out, stem="analysis"))
    if run_dir is None:
        return written
    md_section = d.markdown().replace(f"# {d.title}", f"## {d.title}", 1).strip()
    html_full = d.html(run_dir)
    body = html_full.split("<body>", 1)[1].rsplit("</body>", 1)[0]
    body = body.replace("<h1>", "<h2>", 1).replace("</h1>", "</h2>", 1)
    for name, section in (("report.md", md_section), ("report.html", body)):
        f = run_dir / name
        if not f.exists():
            continue
        text = f.read_text(encoding="utf-8")
        block = f"{MARK_BEGIN}\n{section}\n{MARK_END}"
        if MARK_BEGIN in text and MARK_END in text:
            pre, rest = text.split(MARK_BEGIN, 1)
            text = pre + block + rest.split(MARK_END, 1)[1]
        elif name == "report.html" and "</body>" in text:
            pre, post = text.rsplit("</body>", 1)
            text = pre + block + "</body>" + post
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        f.write_text(text, encoding="utf-8")
        written.append(f)
    return written


# ---- the command ---------------------------------------------------------------------------------------------------
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_,)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def analyze(run_dir=None, *, peft_dirs: Sequence = (), labels=None, out=None, step: Optional[int] = None,
            grid_a=None, grid_b=None, modules=None, mitigation: bool = True, zero: bool = True,
            adapters_per_call: int = 32, n_resamples: int = 9999, detector_resamples: int = 2000,
            plots: bool = True, capability_questions: int = 64, base_override=None, progress: bool = True,
            seed: int = 0, mitigation_notes: Optional[int] = None) -> dict:
    """Analyse a run folder (or PEFT adapters) and write the files listed in the module docstring.

    Returns a summary dict (paths, detector AUC, mitigation status, timings). ``base_override`` = (cfg, params,
    tokenizer) scores a run trained on a base passed in from Python (tests)."""
    t_all = time.time()
    timing = {}
    if not peft_dirs and run_dir is None:
        raise AnalysisError("give a run folder, or --peft-dir with exported adapters")
    t = time.time()
    ad = load_peft_dirs(peft_dirs, labels) if peft_dirs else load_run(run_dir, step)
    eval_run = pathlib.Path(run_dir) if (peft_dirs and run_dir is not None) else None
    if out is None:
        first = pathlib.Path(peft_dirs[0]) if peft_dirs else None
        out = ad.run_dir if ad.run_dir else first.parent if (first / "adapter_config.json").exists() else first
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mods = parse_modules(modules, list(ad.lora))
    s_a = parse_grid(grid_a, "--grid-a") or DEFAULT_GRID_A
    s_b = parse_grid(grid_b, "--grid-b") or DEFAULT_GRID_B
    if zero:
        s_a, s_b = tuple(sorted({0.0, *s_a})), tuple(sorted({0.0, *s_b}))
    timing["load"] = time.time() - t
    if progress:
        print(f"[analyze] {ad.describe()}", file=sys.stderr, flush=True)

    t = time.time()
    ad.variants = normalise_variants(ad.variants)
    labels_ = labels_for(ad.variants)
    feats = W.features(ad.lora, ad.scale, reference=labels_["reference"])
    timing["features"] = time.time() - t
    t = time.time()
    W.write_csv(W.feature_rows(feats, ad.variants), out / "weight_shift.csv", W.ROW_FIELDS)
    timing["weight_shift_csv"] = time.time() - t
    t = time.time()
    tests, test_skips = weight_tests(feats, labels_, n_resamples, seed)
    fields = ["comparison", "module", "feature", "layer", "n_clean", "n_poisoned", "mean_clean", "mean_poisoned",
              "ks_stat", "ks_p", "perm_p", "perm_q", "cohens_d", "cliffs_delta"]
    W.write_csv(tests, out / "weight_tests.csv", fields)
    timing["weight_tests"] = time.time() - t
    t = time.time()
    det = run_detector(feats, ad.variants, labels_, detector_resamples, seed)
    timing["detector"] = time.time() - t
    if test_skips:
        det["weight_tests_skipped"] = test_skips

    mit = None
    if mitigation:
        t = time.time()
        mit = {"status": "skipped", "modules": mods, "s_a": list(s_a), "s_b": list(s_b)}
        try:
            ev = study_evaluator(ad, base_override, eval_run, capability_questions, mitigation_notes)
        except (AnalysisError, FileNotFoundError) as e:
            mit["reason"] = str(e)
            print(f"warning: mitigation skipped: {e}", file=sys.stderr, flush=True)
        else:
            hint = mitigation_cost_hint(ad, len(M.grid_points(s_a, s_b)))
            if hint and progress:
                print(f"[analyze] {hint}", file=sys.stderr, flush=True)
            res = evaluate_grid(ad, ev, s_a, s_b, mods, adapters_per_call, progress)
            drop = _target_drop(res, labels_)
            if drop is not None:
                res["target_drop"] = drop
            if ev.paired is not None:
                res.update(ev.paired(res, labels_["reference"]))
            W.write_csv(mitigation_rows(res, ad.variants, labels_), out / "mitigation.csv")
            summary, aname, lower = mitigation_summary(res, ad.variants, labels_, ev)
            W.write_csv(summary, out / "mitigation_summary.csv")
            mit.update(status="done", summary=summary, attack_metric=aname, attack_lower_is_better=lower,
                       attack_name=ev.attack_name, raw_attack_lower_is_better=ev.attack_lower_is_better,
                       capability_name=ev.capability_name, capability_only=ev.capability_only, note=ev.note,
                       n_adapters=int(len(res["grid"]) * ad.num_variants), seconds=time.time() - t)
        timing["mitigation"] = time.time() - t
    det["mitigation"] = {k: v for k, v in (mit or {"status": "disabled (--no-mitigation)"}).items() if k != "summary"}

    t = time.time()
    hist_module = mods[0] if mods else next(iter(ad.lora))
    figs = make_plots(out, ad, feats, labels_, group_labels(ad.variants, labels_), det, mit, hist_module) \
        if plots else []
    timing["plots"] = time.time() - t
    det["timing_s"] = dict(timing)
    det["source"] = {"kind": ad.source, "run_dir": str(ad.run_dir) if ad.run_dir else None, "step": ad.step,
                     "adapters": ad.meta.get("adapters"), "study": ad.study}
    (out / "detector.json").write_text(json.dumps(_jsonable(det), indent=1, allow_nan=False))
    doc = build_doc(ad, det, tests, test_skips, mit, figs, timing, out)
    in_run = ad.run_dir is not None and out.resolve() == ad.run_dir.resolve()
    reports = write_report(doc, out, ad.run_dir if in_run else None)
    timing["total"] = time.time() - t_all
    if progress:
        auc = "skipped" if det.get("auc") is None else f"{det['auc']:.3f}"
        print(f"[analyze] detector AUC {auc}; mitigation {mit['status'] if mit else 'off'}; wrote {out} "
              f"in {timing['total']:.1f} s", file=sys.stderr, flush=True)
    return {"out": out, "detector": det, "mitigation": mit, "timing": timing, "figures": figs,
            "reports": [str(r) for r in reports]}


def cmd_analyze(args) -> int:
    analyze(args.run_dir, peft_dirs=args.peft_dir or (), labels=args.labels, out=args.out, step=args.step,
            grid_a=args.grid_a, grid_b=args.grid_b, modules=args.modules, mitigation=not args.no_mitigation,
            zero=not args.no_zero, adapters_per_call=args.adapters_per_call, n_resamples=args.n_resamples,
            plots=not args.no_plots, mitigation_notes=args.mitigation_notes)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "analyze", help="weight shift, poisoned-adapter detector and shrink mitigation of a run",
        description="Analyse a finished run's adapters (or exported PEFT adapters): weight_shift.csv, "
                    "weight_tests.csv, detector.json, mitigation.csv, plots/analysis_*.png and a section in "
                    "report.md / report.html (or analysis.md).")
    p.add_argument("run_dir", nargs="?", default=None,
                   help="run folder (with --peft-dir: the run whose model and test set score the mitigation)")
    p.add_argument("--peft-dir", action="extend", nargs="+", default=None, metavar="DIR",
                   help="PEFT adapter folder(s): an adapter, or a folder of adapter subfolders")
    p.add_argument("--labels", default=None,
                   help="CSV folder,kind,seed,poisoned[,poison_count] for PEFT adapters without jaxpoison labels")
    p.add_argument("--out", default=None, help="output folder (default: the run folder / the PEFT folder)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest readable)")
    p.add_argument("--grid-a", default=None, help="s_A shrink factors (default: 0.02,0.04,0.06)")
    p.add_argument("--grid-b", default=None, help="s_B shrink factors (default: 0.04,0.08,0.16)")
    p.add_argument("--no-zero", action="store_true", help="do not add s = 0 (the unscaled adapter) to both axes")
    p.add_argument("--modules", default=None, help="modules to shrink, e.g. q or q,v or all (default: q)")
    p.add_argument("--no-mitigation", action="store_true", help="skip the mitigation grid (no model needed)")
    p.add_argument("--adapters-per-call", type=int, default=32,
                   help="adapters scored per vmapped call (memory; default %(default)s)")
    p.add_argument("--mitigation-notes", type=int, default=None, metavar="N",
                   help="attacks runs: regenerate the answers to the first N test notes only (generation dominates "
                        "the cost; default: all)")
    p.add_argument("--n-resamples", type=int, default=9999, help="permutation resamples of the weight tests")
    p.add_argument("--no-plots", action="store_true", help="write the tables and the report without figures")
    p.set_defaults(func=cmd_analyze)


# ---- benchmark --------------------------------------------------------------------------------------------------
def benchmark(n_seeds: int = 16, levels: Sequence[int] = (0, 4, 16, 64), num_layers: int = 30, r: int = 8,
              modules: Sequence[str] = ("q", "k", "v", "o", "gate", "up", "down"), n_resamples: int = 9999,
              out=None, plots: bool = False, seed: int = 0) -> dict:
    """Wall time of the weight-shift + detector half on random adapters of SmolLM2-135M shapes (hidden 576,
    intermediate 1536, 9 heads / 3 kv heads of 64): ``n_seeds * len(levels)`` variants (default 64) x
    ``num_layers`` layers. Poisoned adapters get a rank-1 shift proportional to their level. Writes the CSVs and
    detector.json (and the plots) into ``out`` when given."""
    from jaxpoison.models.config import ModelConfig
    cfg = ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=num_layers, num_heads=9, num_kv_heads=3, head_dim=64)
    rng = np.random.default_rng(seed)
    variants = [{"variant_id": i, "seed": s, "kind": "rationale" if lv else "clean", "poison_count": lv}
                for i, (s, lv) in enumerate((s, lv) for s in range(n_seeds) for lv in levels)]
    V = len(variants)
    lv = np.array([v["poison_count"] for v in variants], np.float32)
    lora = {}
    for m in modules:
        fi, fo = cfg.module_shape(m)
        a = rng.standard_normal((V, num_layers, fi, r), np.float32) / np.float32(np.sqrt(fi))
        b = np.float32(0.01) * rng.standard_normal((V, num_layers, r, fo), np.float32)
        a[:, :, :, 0] += (0.002 * lv)[:, None, None] * rng.standard_normal(fi).astype(np.float32)
        b[:, :, 0, :] += (0.0002 * lv)[:, None, None] * rng.standard_normal(fo).astype(np.float32)
        lora[m] = {"a": a, "b": b}
    ad = Adapters(lora, 2.0, variants, "bench")
    timing, cpu = {}, {}

    def clock(name, fn, *args):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*args)
        timing[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        return out

    labels = labels_for(variants)
    feats = clock("features", W.features, lora, ad.scale, labels["reference"])
    rows = clock("feature_rows", W.feature_rows, feats, variants)
    tests, _ = clock("weight_tests", weight_tests, feats, labels, n_resamples, seed)
    det = clock("detector", run_detector, feats, variants, labels, 2000, seed)
    timing["weight_shift_and_detector"] = sum(timing.values())
    cpu["weight_shift_and_detector"] = sum(cpu.values())
    clock("features_again (compiled)", W.features, lora, ad.scale, labels["reference"])
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        t = time.time()
        W.write_csv(rows, out / "weight_shift.csv", W.ROW_FIELDS)
        W.write_csv(tests, out / "weight_tests.csv")
        (out / "detector.json").write_text(json.dumps(_jsonable(det), indent=1, allow_nan=False))
        timing["write"] = time.time() - t
        if plots:
            t = time.time()
            make_plots(out, ad, feats, labels, group_labels(variants, labels), det, None, "q")
            timing["plots"] = time.time() - t
    return {"variants": V, "layers": num_layers, "modules": list(modules), "r": r, "n_features": len(det["features"]),
            "n_test_rows": len(tests), "n_shift_rows": len(rows), "auc": det.get("auc"), "auc_ci": det.get("auc_ci"),
            "by_level": [(b["level"], round(b["auc"], 3)) for b in det.get("by_level", [])], "timing_s": timing,
            "cpu_s": cpu}
