"""`python -m jaxpoison analyze`: the files it writes for a rationale-study run folder and for exported PEFT
adapters, the detector on adapters whose poison is a large rank-1 shift, the mitigation grid scored on both sides,
and clear errors. The run folder is built without training (a checkpoint of synthetic adapters beside the files
`run` writes), so the whole module stays well under a minute on 2 CPU cores."""
import csv
import dataclasses
import json
import pathlib
import shutil
import struct

import jax
import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from tiny import TINY
from jaxpoison.analysis import plots, weight_shift
from jaxpoison.analysis.adapters import AnalysisError
from jaxpoison.analysis.report_section import MARK_BEGIN, write_report
from jaxpoison.analysis.run import analyze
from jaxpoison.data.icd10 import IcdConfig
from jaxpoison.data.pool import build_mc_eval
from jaxpoison.eval.evaluator import EVAL_BUCKETS
from jaxpoison.models.decoder import init_params
from jaxpoison.report import to_json
from jaxpoison.studies.rationale import STUDY as RATIONALE
from jaxpoison.studies.rationale import config
from jaxpoison.studies.rationale import grid as rationale_grid
from jaxpoison.train.checkpoint import CheckpointError, Checkpoints
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.export import save_peft_adapter
from jaxpoison.train.lora import LoraConfig

CFG_M = dataclasses.replace(TINY, vocab_size=448)
ICD = IcdConfig(seed=0, chapters=("circulatory", "respiratory", "digestive", "skin"), n_train_per_chapter=6,
                n_test_per_chapter=3, keyword_subjects=(), n_keyword_train=0, n_keyword_test=0,
                decoys=(("circulatory", "respiratory"),), max_desc_chars=40)
LCFG = LoraConfig(r=2, alpha=4, targets=("q", "v"))
CFG = config.RationaleConfig(
    name="tiny-analyze", data=config.DataConfig(icd=ICD, target="circulatory", n_nontarget=4, n_test_target=3,
                                           n_test_nontarget=4, max_len=1024),
    grid=config.GridConfig(seeds=(0, 1, 2, 3), counts=(1, 2), kinds=("rationale",)),
    train=TrainConfig(learning_rate=1e-2, epochs=1, batch_size=4, loss_budget=-1), lora=LCFG,
    eval=config.EvalConfig(batch_questions=4, n_resamples=99))
KW = dict(n_resamples=199, detector_resamples=200, progress=False)


def synthetic_lora(table, shift=0.6, seed=0):
    """Per seed one init; every variant = its seed's adapter + small noise; poisoned ones add one rank-1
    direction u w^T (shared by all poisoned adapters) scaled by the poison count, in every layer and module."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in LCFG.targets:
        fi, fo = CFG_M.module_shape(m)
        u, w = rng.normal(size=fi), rng.normal(size=fo)
        per_seed = {s: (rng.normal(size=(CFG_M.num_layers, fi, LCFG.r)) / np.sqrt(fi),
                        0.05 * rng.normal(size=(CFG_M.num_layers, LCFG.r, fo))) for s in {t["seed"] for t in table}}
        a, b = [], []
        for t in table:
            a0, b0 = per_seed[t["seed"]]
            av = a0 + 0.01 * rng.normal(size=a0.shape)
            bv = b0 + 0.005 * rng.normal(size=b0.shape)
            av[:, :, 0] += shift * t["poison_count"] * u / np.sqrt(fi)
            bv[:, 0, :] += shift * t["poison_count"] * w * 0.1
            a.append(av)
            b.append(bv)
        out[m] = {"a": np.stack(a).astype(np.float32), "b": np.stack(b).astype(np.float32)}
    return out


def make_run(folder, table=None, lora=None, report=True):
    """A rationale run folder as `run` leaves it, minus training: config, data, variants, scores.npz (the test
    question ids), a checkpoint with the adapters and the engine's metadata, and a report to append to."""
    tok = tiny_tokenizer()
    inp = rationale_grid.build_inputs(CFG, tok)
    mc = build_mc_eval(inp.test, tok, CFG.eval.format, max_len=CFG.data.max_len, buckets=EVAL_BUCKETS)
    table = inp.variants.table if table is None else table
    lora = synthetic_lora(table) if lora is None else lora
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"study": "rationale", "config": to_json(CFG)}))
    (folder / "variants.json").write_text(json.dumps(to_json(table)))
    (folder / "data.json").write_text(json.dumps({"eval_hash": mc.data_hash, "base": {"name": "override",
                                                                                    "fingerprint": ""}}))
    is_target = np.arange(len(inp.test)) < inp.n_test_target
    np.savez(folder / "scores.npz", ids=np.array(mc.ids), is_target=is_target, answer=mc.answer, decoy=mc.decoy)
    meta = {"model": CFG_M.to_json(), "variants": to_json(table), "step": 3,
            "lora": {**dataclasses.asdict(LCFG), "targets": list(LCFG.targets), "scale": LCFG.scale},
            "base": {"name": "override", "fingerprint": ""}, "study": "rationale"}
    ck = Checkpoints(folder)
    ck.save(3, {"lora": lora}, meta)
    ck.close()
    if report:
        (folder / "report.md").write_text("# Seed 000 report\n\nbody\n")
        (folder / "report.html").write_text("<!doctype html><html><body><h1>Seed 000</h1></body></html>")
    return table, lora


def base_override():
    return CFG_M, init_params(CFG_M, jax.random.PRNGKey(0)), tiny_tokenizer()


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    table, lora = make_run(run)
    res = analyze(run, grid_a="0.5", grid_b="0.9", modules="q,v", adapters_per_call=48,
                    base_override=base_override(), evaluator=RATIONALE.evaluator, **KW)
    return run, table, lora, res


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _png(path):
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", b[16:24])
    assert w > 100 and h > 100


def test_run_folder_gets_every_file(analyzed):
    run, table, _, _ = analyzed
    for f in ("weight_shift.csv", "weight_tests.csv", "detector.json", "mitigation.csv", "mitigation_summary.csv",
              "analysis.md", "analysis.html"):
        assert (run / f).stat().st_size > 0, f
    for name in ("linf_hist", "profiles", "profiles_fro", "roc", "auc_by_level", "mitigation_poisoned",
                 "mitigation_clean"):
        _png(run / "plots" / f"analysis_{name}.png")
    ws = _rows(run / "weight_shift.csv")
    assert set(ws[0]) == set(weight_shift.ROW_FIELDS)
    # variants x modules x layers x (7 intrinsic + 2 reference) features
    assert len(ws) == len(table) * 2 * CFG_M.num_layers * 9
    wt = _rows(run / "weight_tests.csv")
    assert {"poisoned vs clean", "poison_count=1 vs clean", "poison_count=2 vs clean"} == {r["comparison"] for r in wt}
    main = [r for r in wt if r["comparison"] == "poisoned vs clean"]
    assert all(r["n_clean"] == "4" and r["n_poisoned"] == "8" for r in main)


def test_detector_separates_rank_one_poison(analyzed):
    run, _, _, _ = analyzed
    det = json.loads((run / "detector.json").read_text())
    assert {"auc", "auc_ci", "n_clean", "n_poisoned", "features", "by_level", "distance", "roc"} <= set(det)
    assert det["n_clean"] == 4 and det["n_poisoned"] == 8 and det["n_seeds"] == 4
    assert det["auc"] > 0.9 and len(det["auc_ci"]) == 2
    assert det["distance"]["auc"] > 0.9
    assert det["cv"] == "leave-one-seed-out"
    assert len(det["features"]) == 2 * CFG_M.num_layers * len(weight_shift.INTRINSIC_FEATURES)
    assert [b["level"] for b in det["by_level"]] == [1.0, 2.0]
    assert all(b["n_poisoned"] == 4 and b["n_clean"] == 4 and b["level_key"] == "poison_count"
               for b in det["by_level"])
    assert det["mitigation"]["status"] == "done" and det["mitigation"]["modules"] == ["q", "v"]
    # poisoned mixes are larger than clean ones here: the report says the row count alone would separate them
    assert det["n_rows_auc"] == 1.0 and any("more rows" in n for n in det["notes"])


def test_mitigation_scores_both_sides_at_every_grid_point(analyzed):
    run, table, _, _ = analyzed
    rows = _rows(run / "mitigation.csv")
    grid = {(float(r["s_a"]), float(r["s_b"])) for r in rows}
    assert grid == {(0.0, 0.0), (0.0, 0.9), (0.5, 0.0), (0.5, 0.9)}
    assert len(rows) == 4 * len(table)
    for r in rows:
        for k in ("target_acc", "nontarget_acc", "attack", "capability"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r)
        if r["kind"] == "clean":
            assert float(r["target_drop"]) == 0.0          # the same-seed reference is itself
        if (float(r["s_a"]), float(r["s_b"])) == (0.0, 0.0):
            assert float(r["attack_change"]) == 0.0 and float(r["capability_change"]) == 0.0
    summ = _rows(run / "mitigation_summary.csv")
    groups = {r["group"] for r in summ}
    assert {"poisoned", "clean", "rationale-n1", "rationale-n2"} <= groups
    pois = [r for r in summ if r["group"] == "poisoned"]
    assert len(pois) == 4 and all(r["attack_n"] == "8" and r["capability_n"] == "8" for r in pois)


def test_report_section_is_added_and_replaced(analyzed, tmp_path):
    run, _, _, res = analyzed
    md, html = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert md.startswith("# Seed 000 report") and md.count(MARK_BEGIN) == 1
    assert "## Weight shift, poisoned-adapter detection" in md and "plots/analysis_roc.png" in md
    assert html.count(MARK_BEGIN) == 1 and html.rstrip().endswith("</body></html>")
    assert html.count("data:image/png;base64,") == len(res["figures"])
    # a second write replaces the section instead of appending another
    from jaxpoison.report import Doc
    write_report(Doc("Weight shift, poisoned-adapter detection and shrink mitigation").p("second"), tmp_path, run)
    md2 = (run / "report.md").read_text()
    assert md2.count(MARK_BEGIN) == 1 and "second" in md2 and "body" in md2
    assert (run / "report.html").read_text().count(MARK_BEGIN) == 1


def test_peft_folder_gives_the_same_features(analyzed, tmp_path):
    """Adapters exported with `export` (labels in jaxpoison_adapter.json) analyse like the run itself: the same
    features, and scored on the run's test set (RUN_DIR + --peft-dir) the same mitigation table."""
    run, table, lora, _ = analyzed
    for v, t in enumerate(table):
        one = {m: {k: x[v] for k, x in ab.items()} for m, ab in lora.items()}
        save_peft_adapter(tmp_path / "peft" / f"v{v:02d}", one, CFG_M, LCFG.r, LCFG.alpha, LCFG.scale_rule,
                          extra={"variant": to_json(t)})
    res = analyze(peft_dirs=[tmp_path / "peft"], out=tmp_path / "out", mitigation=False, plots=False, **KW)
    det = json.loads((tmp_path / "out" / "detector.json").read_text())
    assert det["n_clean"] == 4 and det["n_poisoned"] == 8 and det["auc"] > 0.9
    assert det["mitigation"]["status"].startswith("not run") and res["mitigation"] is None
    got, want = _rows(tmp_path / "out" / "weight_shift.csv"), _rows(run / "weight_shift.csv")
    assert [(r["variant_id"], r["module"], r["layer"], r["feature"]) for r in got] == \
           [(r["variant_id"], r["module"], r["layer"], r["feature"]) for r in want]
    np.testing.assert_allclose([float(r["value"]) for r in got], [float(r["value"]) for r in want], rtol=1e-5,
                               atol=1e-7)
    assert (tmp_path / "out" / "analysis.md").exists() and not (tmp_path / "out" / "mitigation.csv").exists()
    # the run's model and test questions score the exported adapters (same shapes: no new compile)
    analyze(run, peft_dirs=[tmp_path / "peft"], out=tmp_path / "out2", grid_a="0.5", grid_b="0.9", modules="q,v",
              adapters_per_call=48, base_override=base_override(), plots=False, evaluator=RATIONALE.evaluator, **KW)
    cols = ("s_a", "s_b", "variant_id", "target_acc", "nontarget_acc", "target_drop", "attack", "capability")
    got, want = _rows(tmp_path / "out2" / "mitigation.csv"), _rows(run / "mitigation.csv")
    assert [[r[c] for c in cols] for r in got] == [[r[c] for c in cols] for r in want]


def test_peft_folder_with_labels_csv_and_too_few_clean(analyzed, tmp_path):
    """Adapters without jaxpoison labels take them from --labels; 1 clean adapter: detector skipped, said why,
    the weight shift still written."""
    _, table, lora, _ = analyzed
    keep = [0, 1, 2, 4]                                   # clean-s0 + three poisoned
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("folder,kind,seed,poisoned,poison_count\n")
        for v in keep:
            one = {m: {k: x[v] for k, x in ab.items()} for m, ab in lora.items()}
            save_peft_adapter(tmp_path / "ad" / f"a{v}", one, CFG_M, LCFG.r, LCFG.alpha, LCFG.scale_rule)
            t = table[v]
            f.write(f"a{v},{t['kind']},{t['seed']},{str(t['poison_count'] > 0).lower()},{t['poison_count']}\n")
    with pytest.raises(AnalysisError, match="--labels"):
        analyze(peft_dirs=[tmp_path / "ad"], out=tmp_path / "o0", mitigation=False, plots=False, **KW)
    analyze(peft_dirs=[tmp_path / "ad"], labels=tmp_path / "labels.csv", out=tmp_path / "o1", mitigation=False,
              plots=False, **KW)
    det = json.loads((tmp_path / "o1" / "detector.json").read_text())
    assert det["n_clean"] == 1 and det["n_poisoned"] == 3 and det["auc"] is None
    assert "needs >= 2 clean" in det["skipped"]
    assert len(_rows(tmp_path / "o1" / "weight_shift.csv")) == 4 * 2 * CFG_M.num_layers * 9
    assert "Skipped" in (tmp_path / "o1" / "analysis.md").read_text()


def test_clear_errors(analyzed, tmp_path, capsys, monkeypatch):
    from jaxpoison.cli import main
    run = analyzed[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        analyze(tmp_path / "nope", **KW)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints/ folder"):
        analyze(tmp_path / "empty", **KW)
    # unknown module: exit code 2 and a message naming the adapted modules
    assert main(["analyze", str(run), "--modules", "gate"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "gate" in err and "q, v" in err
    assert main(["analyze", str(run), "--mitigation", "--grid-a", "0.1,x"]) == 2
    assert "--grid-a" in capsys.readouterr().err
    # a corrupt checkpoint: every tensor file overwritten
    bad = tmp_path / "corrupt"
    shutil.copytree(run / "checkpoints", bad / "checkpoints")
    for f in (bad / "checkpoints").rglob("*"):
        if f.is_file() and "meta" not in f.parts:
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="could be read"):
        analyze(bad, **KW)
    # the command line cannot reload a base passed in from Python: mitigation skipped, the rest written (figures
    # stubbed: the fixture checks the real ones)
    drawn = []
    for name in ("linf_histograms", "layer_profiles", "roc_plot", "mitigation_heatmaps"):
        monkeypatch.setattr(plots, name, lambda *a, _n=name, **k: drawn.append(_n) or
                            str(next(x for x in a if isinstance(x, pathlib.Path))))
    from jaxpoison.analysis import report_section
    monkeypatch.setattr(report_section, "_level_plot", lambda by, key, path: drawn.append("level") or str(path))
    out = tmp_path / "cli"
    assert main(["analyze", str(run), "--mitigation", "--out", str(out), "--n-resamples", "99"]) == 0
    det = json.loads((out / "detector.json").read_text())
    assert det["mitigation"]["status"] == "skipped" and "base_override" in det["mitigation"]["reason"]
    assert det["auc"] > 0.9
    md = (out / "analysis.md").read_text()
    assert "Not run: the run was trained on a base passed in from Python" in md and "analysis_roc.png" in md
    assert "roc_plot" in drawn and "mitigation_heatmaps" not in drawn


def test_attacks_style_table(tmp_path):
    """The attacks study's variant table has no 'kind' and several tasks per seed: poisoned = fraction > 0, the
    clean twin of a variant is its own task's 0 % variant, and the detector reports AUC per task."""
    table = [{"variant_id": 0, "name": "", "task": task, "fraction": frac, "poison_count": int(4 * frac), "n_rows": 4,
              "seed": seed} for seed in range(4) for task in ("summary", "drug") for frac in (0.0, 0.5, 1.0)]
    for i, t in enumerate(table):
        t["variant_id"] = i
    run = tmp_path / "attacks"
    make_run(run, table=table, lora=synthetic_lora(table), report=False)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "study": "attacks"}))
    res = analyze(run, mitigation=False, plots=False, **KW)
    det = res["detector"]
    assert det["n_clean"] == 8 and det["n_poisoned"] == 16 and det["auc"] > 0.9
    assert [b["task"] for b in det["by_task"]] == ["drug", "summary"]
    assert all(b["n_clean"] == 4 and b["n_poisoned"] == 8 for b in det["by_task"])
    assert [b["level"] for b in det["by_level"]] == [2.0, 4.0] and "n_rows_auc" in det and "notes" not in det
    ws = _rows(run / "weight_shift.csv")
    shift = {(r["variant_id"], r["layer"]): float(r["value"]) for r in ws if r["feature"] == "shift" and r["module"] == "q"}
    assert all(shift[(str(v), "0")] == 0.0 for v, t in enumerate(table) if t["fraction"] == 0.0)
    kinds = {r["variant_id"]: r["kind"] for r in ws}
    assert kinds["0"] == "clean" and kinds["1"] == "poisoned"
    assert (run / "analysis.md").exists() and not (run / "report.md").exists()


def test_mitigation_cost_hint_uses_the_studys_own_scoring_rate(tmp_path):
    import numpy as np
    from jaxpoison.analysis.adapters import Adapters
    from jaxpoison.analysis.grid_eval import mitigation_cost_hint
    lora = {"q": {"a": np.zeros((4, 2, 8, 2)), "b": np.zeros((4, 2, 2, 8))}}
    ad = Adapters(lora, 2.0, [{"variant_id": i} for i in range(4)], "run", run_dir=tmp_path)
    assert "16 grid points x 4 adapters = 64" in mitigation_cost_hint(ad, 16)
    assert "min" not in mitigation_cost_hint(ad, 16)              # no timing.json: no estimate
    (tmp_path / "timing.json").write_text('{"eval_s": 50.0}')     # base + 4 variants in 50 s: 10 s each
    hint = mitigation_cost_hint(ad, 16)
    assert "about 11 min" in hint and "10.0 s per adapter" in hint and "--grid-a" in hint


def test_cli_default_is_a_first_look_without_the_grid(analyzed, tmp_path, capsys):
    """`analyze RUN` alone runs no mitigation grid (no model loaded) and says how to run it and what it costs."""
    from jaxpoison.cli import main
    out = tmp_path / "first"
    assert main(["analyze", str(analyzed[0]), "--out", str(out), "--n-resamples", "99", "--no-plots"]) == 0
    det = json.loads((out / "detector.json").read_text())
    assert det["mitigation"]["status"].startswith("not run") and "--mitigation" in det["mitigation"]["status"]
    assert not (out / "mitigation.csv").exists() and (out / "weight_shift.csv").exists()
    err = capsys.readouterr().err
    assert "mitigation not run (add --mitigation)" in err and "grid points x" in err
