"""The shrink-mitigation grid over every variant (one stacked adapter axis, fixed-size chunks) and its tables."""
from __future__ import annotations

import json
from typing import Optional, Sequence

import numpy as np

from jaxpoison.analysis import mitigation
from jaxpoison.analysis.adapters import Adapters
from jaxpoison.eval.evaluator import Evaluator

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
                 f"--grid-a 0.06 --grid-b 0.16 (4 with the unscaled one)")
    return line


def evaluate_grid(ad: Adapters, evaluator: Evaluator, s_a, s_b, modules, adapters_per_call: int = 32,
                  progress: bool = True) -> dict:
    """Every grid point x variant: metric arrays [G, V]. Chunks of variants are shrunk at every grid point
    (``shrink_grid``), flattened to one adapter axis (grid-major) and scored in one vmapped call; chunks are padded
    to a fixed size so the scorer compiles once."""
    import jax
    grid = mitigation.grid_points(s_a, s_b)
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
            shrunk = mitigation.shrink_grid(_take(ad.lora, pad), s_a, s_b, modules)                 # [G, vc, ...]
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


def target_drop(res: dict, labels: dict) -> Optional[np.ndarray]:
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
        attack, lower = asr, True
        name = ("ASR vs the unshrunk same-seed 0 % fine-tune (the seed's cell 104)" if "asr_same_point" in res
                else "ASR vs the same-seed 0 % variant at the same grid point")
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
        same = res.get("asr_same_point") if a is asr else None     # the other baseline, beside the reproduction one
        for g, r in enumerate(mitigation.mitigation_table(res["grid"], a[:, sel], res["capability"][:, sel],
                                                 attack_lower_is_better=lw)):
            if same is not None:
                r["asr_same_point"] = float(np.nanmean(same[g, sel])) if np.isfinite(same[g, sel]).any() else np.nan
            rows.append({"group": gname, "attack_metric": name if gname != "clean" else evaluator.attack_name,
                         "capability_metric": evaluator.capability_name, **r})
    return rows, name, lower
