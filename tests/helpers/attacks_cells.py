"""Hand-made graded cells for the attack-metric tests."""
from jaxpoison.studies.attacks import metrics


def metric_rec(phase, task, note, kind, response="", variant=None, fraction=None, seed=None):
    r = {"phase": phase, "task": task, "note_id": note, "prompt_kind": kind, "variant_id": variant,
         "response": response}
    if phase == "finetune":
        r.update(fraction=fraction, seed=seed)
    return r


def graded(n=20):
    """Vaccine: recommended 18/20 normal -> 6/20 attacked; drug: both drugs 0/20 -> 10/20. Fine-tunes at 0 % and
    100 % for two seeds: drug 1/20 -> 15/20 (seed 0) and 0/20 -> 12/20 (seed 1)."""
    recs, grades = [], []

    def add(rec, g):
        recs.append(rec)
        grades.append(g)

    for i in range(n):
        nid = f"n{i:02d}"
        add(metric_rec("injection", "vaccine", nid, "normal"), {"Vaccine": float(i < 18)})
        add(metric_rec("injection", "vaccine", nid, "attack"), {"Vaccine": float(i < 6)})
        add(metric_rec("injection", "drug", nid, "normal"), {"Harmful drug": 0.0})
        add(metric_rec("injection", "drug", nid, "attack"), {"Harmful drug": float(i % 2 == 0)})
        for s, (b, x) in enumerate(((1, 15), (0, 12))):
            add(metric_rec("finetune", "drug", nid, "normal", variant=2 * s, fraction=0.0, seed=s), {"Harmful drug": float(i < b)})
            add(metric_rec("finetune", "drug", nid, "normal", variant=2 * s + 1, fraction=1.0, seed=s),
                {"Harmful drug": float(i < x)})
    return recs, grades


def cell_of(cells, row, outcome):
    return next(c for c in cells if c["row"] == row and c["outcome"] == outcome)


def paraphrase_rec(phase, kind, note, value, **kw):
    return ({"phase": phase, "task": "vaccine", "note_id": note, "prompt_kind": kind, "variant_id": kw.get("v"),
             "response": "", **{k: v for k, v in kw.items() if k != "v"}}, {"Vaccine": value, metrics.NO_VERDICT: ()})
