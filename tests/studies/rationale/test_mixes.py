"""Equal-size mixes (grid.equal_size): every variant of the demo and grid presets trains on the same number of
rows, so every variant takes the same number of optimiser steps; the poison count and ratios are the ones the
config asks for and are recorded as they are; the clean variant of a seed shares all rows it can with that
seed's poisoned variants. No training: the variant tables only."""
import csv
import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from jaxpoison.configs import apply_override, load_config
from jaxpoison.data.mixes import MixSpec, build_variants
from jaxpoison.data.mixes import resolve as _resolve
from jaxpoison.data.poison import row_id
from jaxpoison.data.schema import DataError
from jaxpoison import configs
from jaxpoison.report import to_json, write_csv
from jaxpoison.studies.rationale import config
from jaxpoison.studies.rationale import grid
from jaxpoison.studies.rationale import report as rationale_report
from jaxpoison.studies.rationale import results
from jaxpoison.studies.rationale import run
from jaxpoison.studies.rationale import stats
from jaxpoison.train.engine import num_steps, total_updates


def spec_count(name: str) -> int:
    m = re.match(r"(rationale|overwrite|decoy)-n(\d+)", name)
    return int(m.group(2)) if m else 0


def steps_of(n_rows, tcfg) -> np.ndarray:
    return np.asarray(total_updates(np.asarray(n_rows), tcfg))


def check_table(table, rows, n_rows, N, target_ids, cfg):
    """Shared checks of an equal-size table: rows, counts, ratios, pairing with the same seed's clean variant."""
    assert (np.asarray(n_rows) == N).all() and all(t["n_rows"] == N and t["mix_size"] == N for t in table)
    ids = {t["variant_id"]: set(rows[t["variant_id"]]) for t in table}
    clean = {t["seed"]: ids[t["variant_id"]] for t in table if t["spec_name"] == "clean"}
    for t in table:
        v, name = t["variant_id"], t["spec_name"]
        assert len(ids[v]) == N                                      # no row twice
        c = spec_count(name)
        assert t["poison_count"] == c
        assert t["ratio_all"] == pytest.approx(c / N)                # poisoned / all rows, as trained
        k = t["n_correct_target"]
        if name.startswith(("rationale", "overwrite")):
            rt = re.search(r"-rt([0-9.]+)$", name)
            assert t["ratio_target"] == pytest.approx(float(rt.group(1)) if rt else 1.0)
            assert t["ratio_target"] == pytest.approx(c / (c + k))
        elif name.startswith("decoy"):                               # non-target rows, no target sample
            assert t["kind"] == "decoy" and t["ratio_target"] == 0.0 and k == 0
        else:
            assert c == 0 and t["ratio_target"] == 0.0
        assert t["n_nontarget"] == N - c - k
        assert not t["ratio_all_cell"]
        shared = ids[v] & clean[t["seed"]]
        x = t["forgetting_extra"]
        # every non-target row a variant has is the clean variant's, except the forgetting control's x swapped in
        assert len(shared) == N - c - k - x
        assert sum(r in target_ids for r in ids[v]) == (0 if name.startswith("decoy") else c + k)
    for fam in cfg.grid.kinds:                                       # the poison counts asked for, every seed
        got = sorted({t["poison_count"] for t in table if t["spec_name"].startswith(fam)})
        want = cfg.grid.overwrite_counts if fam == "overwrite" and cfg.grid.overwrite_counts else cfg.grid.counts
        assert set(want) <= set(got)


@pytest.fixture(scope="module")
def demo():
    cfg = load_config("configs/rationale_demo.py")
    inp = grid.build_inputs(cfg, tiny_tokenizer())
    return cfg, inp


def test_demo_variants_have_equal_rows_and_steps(demo):
    cfg, inp = demo
    vt, pool = inp.variants, inp.pool
    g = cfg.grid
    names = sorted({t["spec_name"] for t in vt.table})       # the cells each finding needs, and the controls
    assert names == sorted(["clean", "rationale-n2", "rationale-n8", "rationale-n8-rt0.5", "overwrite-n8", "decoy-n8"])
    assert g.equal_size and len(vt) == len(names) * len(g.seeds) and len(g.seeds) == 5
    N = cfg.data.n_nontarget
    tcfg = run.resolve_train(cfg, pool)
    steps = steps_of(vt.n_rows, tcfg)
    assert (steps == steps[0]).all() and steps[0] == num_steps(vt.n_rows, tcfg) == 5
    rows = [[pool.row_ids[i] for i in r[:n]] for r, n in zip(vt.rows, vt.n_rows)]
    target_ids = {row_id(ex.id, k) for ex in inp.target for k in ("clean", "rationale", "overwrite")}
    check_table(vt.table, rows, vt.n_rows, N, target_ids, cfg)
    # poisoned rows are the spec's kind; rationale and overwrite poison the same examples at the same count
    by = {(t["spec_name"], t["seed"]): set(rows[t["variant_id"]]) for t in vt.table}
    for t in vt.table:
        kinds = [r.rsplit("::", 1)[1] for r in rows[t["variant_id"]]]
        assert kinds.count(t["kind"]) == (t["poison_count"] if t["kind"] != "clean" else N)
    strip = lambda rs: {r.rsplit("::", 1)[0] for r in rs}
    poisoned = lambda key: strip(r for r in by[key] if r.endswith("::rationale"))
    lo, hi = min(cfg.grid.counts), max(cfg.grid.counts)
    for s in cfg.grid.seeds:
        assert strip(by[f"rationale-n{hi}", s]) == strip(by[f"overwrite-n{hi}", s])
        assert poisoned((f"rationale-n{lo}", s)) < poisoned((f"rationale-n{hi}", s))   # nested poisoned sets


def test_demo_results_record_the_true_ratio(demo, tmp_path):
    cfg, inp = demo
    table = inp.variants.table
    rng = np.random.default_rng(0)
    Q, C = len(inp.test), len(inp.test[0].options)
    scores = {"sum": rng.normal(size=(len(table) + 1, Q, C)), "uncond": rng.normal(size=(len(table) + 1, Q, C)),
              "n_tokens": np.ones((Q, C), np.int32), "answer": np.array([ex.answer for ex in inp.test]),
              "decoy": np.full(Q, -1), "is_target": np.arange(Q) < inp.n_test_target,
              "subject": np.array([ex.subject for ex in inp.test])}
    rows, zero = results.results_rows(table, scores, "sum")
    write_csv(tmp_path / "results.csv", rows, float_format=".6g")
    with open(tmp_path / "results.csv") as f:
        got = list(csv.DictReader(f))
    N = cfg.data.n_nontarget
    for r in got:
        c = int(r["poison_count"])
        assert int(r["n_rows"]) == int(r["mix_size"]) == N and float(r["ratio_all"]) == c / N
    # the statistics read the equal-size cells as the base mix (their non-target counts differ from clean's)
    cj = to_json(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, n_resamples=99)))
    s = stats.summarize(table, scores, rows, zero, cj)
    counts = sorted(cfg.grid.counts)
    assert s["thresholds"]["count"]["rationale"]["tested"] == counts
    assert s["thresholds"]["count"]["overwrite"]["tested"] == list(cfg.grid.overwrite_counts)
    assert s["findings"][0]["cell"] == f"rationale-n{counts[-1]}"
    assert {c["spec_name"]: c["ratio_all"] for c in s["cells"]}[f"rationale-n{counts[0]}"] == counts[0] / N
    figs = rationale_report.make_plots(tmp_path, rows, s, zero)
    rationale_report.write_report(tmp_path, cj, s, rows, zero, figs, {}, {})
    assert f"every variant trains on {N} rows" in (tmp_path / "report.md").read_text()


def fake_pool(target, nontarget, kinds):
    """What build_variants reads of a Pool (row index, meta, ids), without tokenizing."""
    ids = [row_id(ex.id, "clean") for ex in list(target) + list(nontarget)]
    ids += [row_id(ex.id, k) for ex in target for k in kinds]
    return SimpleNamespace(index={r: i for i, r in enumerate(ids)}, row_ids=ids,
                           meta=[{"kind": r.rsplit("::", 1)[1]} for r in ids])


def test_grid_preset_variants_have_equal_rows_and_steps():
    cfg = load_config("configs/rationale_grid.py")
    assert cfg.grid.equal_size and not cfg.grid.ratios_all
    config.check_config(cfg)
    train, _ = grid.load_examples(cfg.data)
    split = grid._select(train, cfg.data)
    target, nontarget = split.target, split.rest
    specs = grid.mix_specs(cfg, len(target), len(nontarget))
    assert len(specs) == 29
    pool = fake_pool(target, nontarget, ("rationale", "overwrite"))
    vt = build_variants(specs, list(cfg.grid.seeds), target=target, nontarget=nontarget, pool=pool)
    for t in vt.table:
        t["ratio_all_cell"] = False
    N = cfg.data.n_nontarget
    steps = np.asarray(steps_of(vt.n_rows, cfg.train))
    eq = [t for t in vt.table if t["spec_name"] != "forgetting-steps4x"]
    fs = [t for t in vt.table if t["spec_name"] == "forgetting-steps4x"]
    ids_eq = [t["variant_id"] for t in eq]
    assert len(vt) == 29 * 8 and (steps[ids_eq] == 2 * N // cfg.train.batch_size).all()
    rows = [[pool.row_ids[i] for i in r[:n]] for r, n in zip(vt.rows, vt.n_rows)]
    target_ids = {row_id(ex.id, k) for ex in target for k in ("clean", "rationale", "overwrite")}
    check_table(eq, rows, vt.n_rows[ids_eq], N, target_ids, cfg)
    # the real forgetting control: the seed's clean rows and 3 N more clean non-target rows, 4 x the steps
    clean = {t["seed"]: set(rows[t["variant_id"]]) for t in eq if t["spec_name"] == "clean"}
    assert len(fs) == 8
    for t in fs:
        r = set(rows[t["variant_id"]])
        assert len(r) == 4 * N and clean[t["seed"]] <= r and not r & target_ids and t["mix_size"] is None
        assert steps[t["variant_id"]] == 4 * steps[ids_eq[0]] and t["poison_count"] == 0
    names = {t["spec_name"] for t in vt.table}
    assert {"forgetting-x32", "forgetting-x128", "clean-ct32", "rationale-n32-rt0.25"} <= names


def test_paper_preset_follows_the_seed_protocol():
    """The paper preset adds the poison to the clean samples (its ratio-of-all cells need mixes of other sizes)."""
    cfg = load_config("configs/rationale_paper.py")
    assert not cfg.grid.equal_size and cfg.grid.ratios_all


def test_equal_size_errors_are_explained():
    cfg = load_config("configs/rationale_demo.py")
    with pytest.raises(configs.StudyConfigError, match="grid.ratios_all"):
        config.check_config(apply_override(cfg, "grid.ratios_all=(0.25,)"))
    with pytest.raises(configs.StudyConfigError, match="raise data.n_nontarget to at least 24"):
        grid.mix_specs(apply_override(cfg, "grid.counts=4,24"), n_target=30, n_nontarget=300)
    with pytest.raises(configs.StudyConfigError, match="ratios_target 0.5 at count 12"):
        grid.mix_specs(apply_override(apply_override(apply_override(cfg, "grid.ratios_target=0.5"), "grid.counts=2,12"),
                                   "grid.ratio_counts=()"), n_target=30, n_nontarget=300)
    with pytest.raises(configs.StudyConfigError, match="forgetting_extra 30"):
        grid.mix_specs(apply_override(cfg, "grid.forgetting_extra=(30,)"), n_target=30, n_nontarget=300)


def test_mix_size_resolves_counts_and_ratios():
    resolve = lambda *a: dataclasses.astuple(_resolve(*a))
    assert resolve(MixSpec("clean", mix_size=20), 10, 50) == (0, 0, 20)
    assert resolve(MixSpec("rationale", poison_count=4, mix_size=20), 10, 50) == (4, 0, 16)
    assert resolve(MixSpec("rationale", ratio_all=0.25, mix_size=20), 10, 50) == (5, 0, 15)
    assert resolve(MixSpec("rationale", poison_count=2, with_correct_target=True, n_target=6, mix_size=20),
                   10, 50) == (2, 4, 14)
    assert resolve(MixSpec("forgetting", forgetting_extra=5, mix_size=20), 10, 50) == (0, 0, 20)
    for spec, words in ((MixSpec("rationale", poison_count=4, n_nontarget=8, mix_size=20), "both mix_size"),
                        (MixSpec("rationale", poison_count=9, mix_size=8), "raise mix_size"),
                        (MixSpec("forgetting", forgetting_extra=40, mix_size=20), "forgetting control")):
        with pytest.raises(DataError, match=words):
            _resolve(spec, 10, 50)
