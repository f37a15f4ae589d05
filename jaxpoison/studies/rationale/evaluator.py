"""``analyze``'s evaluator for a rationale run: its test questions rebuilt from ``config.json`` + the question ids
in ``scores.npz``, checked against the run's eval hash; attack = target-subject accuracy, capability = non-target
accuracy (:func:`jaxpoison.eval.evaluator.mc_evaluator`)."""
from __future__ import annotations

import json
import pathlib

import numpy as np

from jaxpoison.analysis.adapters import AnalysisError
from jaxpoison.configs import dataclass_from_dict
from jaxpoison.eval.evaluator import EVAL_BUCKETS, Evaluator, load_checked_base, mc_evaluator
from jaxpoison.studies.rationale.config import DataConfig
from jaxpoison.studies.rationale.grid import load_examples


def mitigation_evaluator(run_dir, base_override=None, n_notes=None, share_trunk: bool = True) -> Evaluator:
    """The evaluator of a rationale run (``n_notes`` is the attacks study's and has no meaning here).
    ``share_trunk=False`` scores every adapter through all layers (``bench trunk`` compares the two)."""
    from jaxpoison.data.pool import build_mc_eval
    run = pathlib.Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())["config"]
    if not (run / "scores.npz").exists():
        raise AnalysisError(f"{run} has no scores.npz (the run stopped before scoring): the test questions are "
                            f"unknown; finish the run first")
    z = np.load(run / "scores.npz", allow_pickle=False)
    ids, is_target = [str(i) for i in z["ids"]], z["is_target"].astype(bool)
    d = dataclass_from_dict(DataConfig, cfg["data"])
    _, test = load_examples(d)
    by_id = {ex.id: ex for ex in test}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise AnalysisError(f"{len(missing)} test questions of the run (e.g. {missing[0]}) are not in the data "
                            f"set rebuilt from config.json: the data changed since the run")
    base = json.loads((run / "data.json").read_text()).get("base", {}) if (run / "data.json").exists() else {}
    model = "override" if base.get("name") == "override" else cfg["model"]
    mcfg, params, tok, dtype = load_checked_base(model, cfg.get("dtype", "float32"), base.get("fingerprint", ""),
                                                 base_override, cfg.get("quant", "none"))
    mc = build_mc_eval([by_id[i] for i in ids], tok, cfg["eval"]["format"], max_len=d.max_len, buckets=EVAL_BUCKETS)
    want = json.loads((run / "data.json").read_text()).get("eval_hash") if (run / "data.json").exists() else None
    if want and mc.data_hash != want:
        raise AnalysisError("the test questions rebuilt from config.json tokenize differently from the run's "
                            "(eval hash mismatch: another tokenizer or code version)")
    method = cfg["eval"].get("method", "sum")
    nontarget = (np.array([str(g) for g in z["group"]]) == "nontarget") if "group" in z.files else ~is_target
    ev = mc_evaluator(mcfg, params, mc, is_target, method, dtype, int(cfg["eval"].get("batch_questions", 8)),
                      share_trunk, nontarget)
    return Evaluator(ev, "target-subject accuracy", "non-target accuracy", attack_lower_is_better=False,
                     note=f"{int(is_target.sum())} target and {int(nontarget.sum())} non-target test questions "
                          f"of the run, option scores `{method}`")
