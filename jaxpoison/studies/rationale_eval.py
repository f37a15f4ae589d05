"""Seed 000 study scoring: the saved option scores -> correct / decoy picks per variant and question -> one
results.csv row per variant (accuracies under every score method, per-subject accuracy, paired drops vs the
same seed's clean variant, final training loss)."""
from __future__ import annotations

import csv
import json
import pathlib

import numpy as np

from jaxpoison.studies.rationale_config import SCORE_METHODS, family

MIX_COLUMNS = ("mix_size", "ratio_all_cell")      # variant-table columns that older runs do not have


def load_scores(run_dir: pathlib.Path) -> dict:
    z = np.load(pathlib.Path(run_dir) / "scores.npz", allow_pickle=False)
    return {k: z[k] for k in z.files}


def correctness(scores: dict, method: str) -> dict:
    """Per variant (row 0 = zero-shot) and question: correct and decoy picks [V+1, Q]."""
    from jaxpoison.eval.score import OptionScores, choice_metrics
    os_ = OptionScores(scores["sum"], scores["n_tokens"], scores["uncond"])
    m = choice_metrics(os_.method(method), scores["answer"], scores["decoy"])
    has = scores["decoy"] >= 0
    return {"correct": m["correct"], "decoy": (m["pick"] == scores["decoy"][None]) & has[None], "has_decoy": has}


def _rate(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return x[..., mask].mean(-1) if mask.any() else np.full(x.shape[:-1], np.nan)


def results_rows(table: list, scores: dict, method: str) -> tuple:
    """One dict per variant (the results.csv rows) and the zero-shot row."""
    tgt = scores["is_target"].astype(bool)
    subjects = [str(s) for s in scores["subject"]]
    per = {m: correctness(scores, m) for m in SCORE_METHODS}
    c = per[method]
    rows = []
    clean_of = {t["seed"]: t["variant_id"] for t in table if t["spec_name"] == "clean"}

    def acc_cols(i):
        cor, dec = c["correct"][i], c["decoy"][i]
        out = {"target_acc": _rate(cor, tgt), "nontarget_acc": _rate(cor, ~tgt),
               "target_decoy_rate": _rate(dec, tgt & c["has_decoy"])}
        for m in SCORE_METHODS:
            out[f"target_acc_{m}"] = _rate(per[m]["correct"][i], tgt)
            out[f"nontarget_acc_{m}"] = _rate(per[m]["correct"][i], ~tgt)
        for s in sorted(set(subjects)):
            out[f"acc_{s}"] = _rate(cor, np.array([x == s for x in subjects]))
        return out

    zero = {"variant_id": -1, "name": "zero-shot", "kind": "zero-shot", **acc_cols(0)}
    for t in table:
        v = t["variant_id"]
        row = {"variant_id": v, "name": t["name"], "spec_name": t["spec_name"], "kind": t["kind"],
               "family": family(t["kind"]), "poison_count": t["poison_count"],
               "ratio_target": round(t["ratio_target"], 6), "ratio_all": round(t["ratio_all"], 6),
               "with_correct_target": bool(t["with_correct_target"]), "n_correct_target": t["n_correct_target"],
               "n_nontarget": t["n_nontarget"], "forgetting_extra": t["forgetting_extra"], "n_rows": t["n_rows"],
               **{k: t[k] for k in MIX_COLUMNS if k in t}, "seed": t["seed"], **acc_cols(v + 1)}
        ref = clean_of.get(t["seed"])
        if ref is not None:
            rc = acc_cols(ref + 1)
            row["target_drop"] = rc["target_acc"] - row["target_acc"]
            row["nontarget_drop"] = rc["nontarget_acc"] - row["nontarget_acc"]
        else:
            row["target_drop"] = row["nontarget_drop"] = float("nan")
        rows.append(row)
    return rows, zero


def _final_losses(run_dir: pathlib.Path, V: int) -> np.ndarray:
    """Each variant's mean loss over its last logged quarter of steps (NaN where it never trained)."""
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return np.full(V, np.nan)
    loss = [json.loads(l)["loss"] for l in f.read_text().splitlines() if l.strip()]
    if not loss:
        return np.full(V, np.nan)
    arr = np.array([[np.nan if x is None else x for x in r] for r in loss], float)
    out = np.full(V, np.nan)
    for v in range(min(V, arr.shape[1])):
        col = arr[:, v][np.isfinite(arr[:, v])]
        if col.size:
            out[v] = col[-max(1, col.size // 4):].mean()
    return out



def write_csv(path: pathlib.Path, rows: list) -> None:
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
