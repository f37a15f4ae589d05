"""A study run's (or a folder of PEFT adapters') stacked LoRA adapters and their labels: the input of ``analyze``."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from typing import Optional, Sequence

import numpy as np

from jaxpoison.analysis import mitigation
from jaxpoison.analysis import weight_shift

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
        if poisoned is not None and weight_shift.is_poisoned(v) != poisoned:
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
            levels = weight_shift.poison_levels(v)
            v["kind"] = "poisoned" if any(x > 0 for x in levels) else "clean"
        out.append(v)
    return out


def labels_for(variants: Sequence[dict]) -> dict:
    """:func:`weight_shift.variant_labels`, with the clean reference of a variant taken from its own task where
    the variants carry one (the attacks study trains every task's variants of a seed from one LoRA init)."""
    labels = weight_shift.variant_labels(variants)
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
        return list(mitigation.SEED_MODULES) if set(mitigation.SEED_MODULES) <= set(available) else list(available)
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
