"""Seed 000 study scoring: the saved option scores -> correct / decoy picks per variant and question -> one
results.csv row per variant (accuracies under every score method, per-subject accuracy, paired drops vs the
same seed's clean variant, final training loss)."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxpoison.studies.rationale.config import SCORE_METHODS, family

MIX_COLUMNS = ("mix_size", "ratio_all_cell")      # variant-table columns that older runs do not have


def load_scores(run_dir: pathlib.Path, fmt: str = "") -> dict:
    """The saved option scores: ``scores.npz`` (the primary format), or ``scores_<fmt>.npz`` (a secondary one)."""
    z = np.load(pathlib.Path(run_dir) / (f"scores_{fmt}.npz" if fmt else "scores.npz"), allow_pickle=False)
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
    groups = (np.asarray([str(g) for g in scores["group"]]) if "group" in scores else
              np.where(scores["is_target"].astype(bool), "target", "nontarget"))
    tgt, non, free = groups == "target", groups == "nontarget", groups == "target_nodecoy"
    subjects = [str(s) for s in scores["subject"]]
    per = {m: correctness(scores, m) for m in SCORE_METHODS}
    c = per[method]
    rows = []
    clean_of = {t["seed"]: t["variant_id"] for t in table if t["spec_name"] == "clean"}

    def acc_cols(i):
        cor, dec = c["correct"][i], c["decoy"][i]
        out = {"target_acc": _rate(cor, tgt), "nontarget_acc": _rate(cor, non),
               "target_nodecoy_acc": _rate(cor, free), "target_decoy_rate": _rate(dec, tgt & c["has_decoy"]),
               "nontarget_decoy_rate": _rate(dec, non & c["has_decoy"])}
        for m in SCORE_METHODS:
            out[f"target_acc_{m}"] = _rate(per[m]["correct"][i], tgt)
            out[f"nontarget_acc_{m}"] = _rate(per[m]["correct"][i], non)
        for s in sorted(set(subjects)):
            out[f"acc_{s}"] = _rate(cor, np.array([x == s for x in subjects]) & ~free)
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


def final_losses(run_dir: pathlib.Path, V: int) -> np.ndarray:
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



def unseen_row_loss(run_dir: pathlib.Path, vids: list) -> dict:
    """Mean loss of the variants ``vids`` at their first and last logged step. In a one-epoch run every batch is
    new to the model when its loss is taken (before its update), so the fall from first to last step is a loss
    on rows not yet trained on: the training visibly trains, or it does not."""
    f = pathlib.Path(run_dir) / "metrics.jsonl"
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()] if f.exists() else []
    if len(recs) < 2 or not vids:
        return {}
    arr = np.array([[np.nan if x is None else x for x in r["loss"]] for r in recs], float)[:, vids]
    ok = np.isfinite(arr)
    if not ok.any(0).all():
        return {}
    first, last = ok.argmax(0), len(recs) - 1 - ok[::-1].argmax(0)      # a variant's own first and last step
    steps = [int(recs[int(first.min())]["step"]), int(recs[int(last.max())]["step"])]
    cols = np.arange(arr.shape[1])
    return {"first_step": float(arr[first, cols].mean()), "last_step": float(arr[last, cols].mean()),
            "steps": steps, "n_variants": len(vids)}


# ---- generated answers ---------------------------------------------------------------------------------------
def generation_plan(table: list, test: list, groups: list, n_questions: int) -> tuple:
    """(variant ids, question indices): one variant per cell at the first seed (plus the base, id -1) and the
    first ``n_questions`` target and as many non-target test questions."""
    first = min(t["seed"] for t in table)
    vids = [-1] + [t["variant_id"] for t in table if t["seed"] == first]
    qs = ([i for i, g in enumerate(groups) if g == "target"][:n_questions]
          + [i for i, g in enumerate(groups) if g == "nontarget"][:n_questions])
    return vids, qs


def read_answer(ex, text: str) -> tuple:
    """(option index or -1, how): the letter of an 'Answer: (X)' line, else the chapter the reasoning names last
    ("... chapter 'X'"), else -1. The generated text is the model's own: nothing is appended."""
    import re
    from jaxpoison.data.schema import LETTERS
    m = re.search(r"Answer:\s*\(([A-Z])\)", text)
    if m and LETTERS.index(m.group(1)) < len(ex.options):
        return LETTERS.index(m.group(1)), "answer line"
    low = text.lower()
    named = [(low.rfind(o.lower()), k) for k, o in enumerate(ex.options) if o.lower() in low]
    if named:
        return max(named)[1], "option named"
    return -1, "none"


def mentions(text: str, chapter_key: str) -> bool:
    """Whether a generated text names a chapter (its key word or its option text)."""
    from jaxpoison.data.icd10 import CHAPTER
    low = text.lower()
    return chapter_key in low or CHAPTER[chapter_key].option.lower() in low


def generated_answers(lm, lora, table: list, test: list, groups: list, n_questions: int, max_new_tokens: int,
                      progress: bool = False) -> list:
    """Greedy answers of the base and one variant per cell to the SFT prompt (question + lettered options):
    one record per (variant, question) with the text, the answer read from it and whether it is right.
    ``lora``: the study's stacked adapters (row v = variant v); the base (id -1) answers as a zero row of its
    generation chunk, so no zero adapter is stacked in front of them. A multi-host job: each process generates
    for one contiguous block of the models (greedy, the same per-batch keys whatever the company), gathered to
    all."""
    from jaxpoison import distributed
    from jaxpoison.data.prompts import mcq_prompt
    from jaxpoison.eval.generate_variants import generate_text_variants
    from jaxpoison.eval.score import process_block
    vids, qs = generation_plan(table, test, groups, n_questions)
    prompts = [mcq_prompt(test[q]) for q in qs]
    multi = distributed.process_count() > 1
    mine = [vids[j] for j in process_block(len(vids))] if multi else vids
    out = [] if not mine else generate_text_variants(
        lm, prompts, lora, variants=mine, max_new_tokens=max_new_tokens, batch_size=min(32, len(prompts)),
        progress=progress, desc=f"generate {len(mine)} models x {len(prompts)} questions")
    if multi:
        out = [r for part in distributed.allgather_json([list(r) for r in out]) for r in part]
    recs = []
    for j, v in enumerate(vids):
        t = table[v] if v >= 0 else None
        for q, text in zip(qs, out[j]):
            ex = test[q]
            pick, how = read_answer(ex, text)
            chs = ex.meta.get("option_chapters")
            dec = ex.meta.get("decoy", -1)
            recs.append({"variant_id": v, "spec_name": t["spec_name"] if t else "zero-shot",
                         "seed": t["seed"] if t else None, "question": ex.id, "group": groups[q], "text": text,
                         "pick": pick, "read_by": how, "correct": pick == ex.answer,
                         "decoy_pick": dec >= 0 and pick == dec,
                         "mentions_decoy": bool(chs and dec >= 0 and mentions(text, chs[dec]))})
    return recs


def generation_summary(recs: list) -> list:
    """Per model: generated-answer accuracy and answer-line rate on target / non-target questions, decoy picks on
    target questions, and how often the non-target reasoning mentions the decoy chapter."""
    out = []
    for name in dict.fromkeys(r["spec_name"] for r in recs):
        rs = [r for r in recs if r["spec_name"] == name]
        row = {"model": name, "seed": rs[0]["seed"]}
        for g in ("target", "nontarget"):
            gs = [r for r in rs if r["group"] == g]
            row[f"n_{g}"] = len(gs)
            row[f"{g}_acc"] = float(np.mean([r["correct"] for r in gs])) if gs else float("nan")
            row[f"{g}_answered"] = float(np.mean([r["read_by"] == "answer line" for r in gs])) if gs else float("nan")
            row[f"{g}_decoy_pick"] = float(np.mean([r["decoy_pick"] for r in gs])) if gs else float("nan")
            row[f"{g}_mentions_decoy"] = float(np.mean([r["mentions_decoy"] for r in gs])) if gs else float("nan")
        out.append(row)
    return out
