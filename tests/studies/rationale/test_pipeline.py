"""The seed-000 study's mechanics on a tiny random model: the variant grid, the files a run writes, a report
rebuilt from saved scores, clear errors for bad config values. (Whether the effect shows is a question for the
real model: see the demo's report; nothing here depends on it.)"""
import csv
import dataclasses
import json
import struct

import jax
import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from rationale_tiny import CFG, CFG_M
from jaxpoison.configs import apply_override
from jaxpoison.models.decoder import init_params
from jaxpoison import configs
from jaxpoison.studies.rationale import config
from jaxpoison.studies.rationale import grid as rationale_grid
from jaxpoison.studies.rationale import run

CELLS = ["clean", "rationale-n1", "rationale-n1-rt0.5", "rationale-n2", "rationale-n2-rt0.5", "overwrite-n1",
         "overwrite-n2", "forgetting-steps2x", "decoy-n1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    base = init_params(CFG_M, jax.random.PRNGKey(0))
    assert run.run(CFG, out, progress=False, base_override=(CFG_M, base, tiny_tokenizer())) == 0
    return out


def test_variant_table_crosses_cells_with_seeds(run_dir):
    table = json.loads((run_dir / "variants.json").read_text())
    assert len(table) == len(CELLS) * 2
    assert [t["variant_id"] for t in table] == list(range(len(table)))
    assert sorted({t["spec_name"] for t in table}) == sorted(CELLS)
    for t in table:
        cell = t["spec_name"]
        if cell == "clean":
            assert t["poison_count"] == 0 and t["n_correct_target"] == 0 and t["n_rows"] == 4
        elif cell.startswith(("rationale", "overwrite")):
            n = int(cell.split("-n")[1].split("-")[0])
            assert t["poison_count"] == n
            if cell.endswith("rt0.5"):       # as many correct target samples as poisoned ones
                assert t["with_correct_target"] and t["n_correct_target"] == n and t["ratio_target"] == 0.5
            else:
                assert not t["with_correct_target"] and t["ratio_target"] == 1.0
            assert t["n_rows"] == 4 + t["poison_count"] + t["n_correct_target"]
        elif cell.startswith("decoy"):     # the label-prior control: non-target rows arguing for the decoy
            assert t["kind"] == "decoy" and t["n_rows"] == 5 and t["poison_count"] == 1
        else:          # the forgetting control: clean non-target SFT on 2 x the clean mix's 4 rows (2 x the steps)
            assert t["kind"] == "forgetting" and t["n_rows"] == 8 and t["poison_count"] == 0
            assert t["n_nontarget"] == 8 and t["forgetting_extra"] == 4 and t["n_correct_target"] == 0


def test_results_csv_one_row_per_variant(run_dir):
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(CELLS) * 2
    need = {"variant_id", "kind", "poison_count", "ratio_target", "ratio_all", "seed", "with_correct_target",
            "target_acc", "nontarget_acc", "target_decoy_rate", "target_drop", "nontarget_drop",
            "target_acc_calibrated", "target_nodecoy_acc", "acc_circulatory", "acc_digestive", "final_loss"}
    assert need <= set(rows[0])
    for r in rows:
        assert 0 <= float(r["target_acc"]) <= 1 and 0 <= float(r["nontarget_acc"]) <= 1
        if r["spec_name"] == "clean":
            assert float(r["target_drop"]) == 0 and float(r["nontarget_drop"]) == 0
    # per-subject accuracy agrees with the target accuracy (the target subject is one chapter here)
    for r in rows:
        assert float(r["acc_circulatory"]) == pytest.approx(float(r["target_acc"]))


def test_summary_fields(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert {"cells", "thresholds", "findings", "zero_shot", "seeds", "method", "tests", "timing"} <= set(s)
    assert len(s["cells"]) == len(CELLS) and s["seeds"] == [0, 1]
    for c in s["cells"]:
        for m in ("target_acc", "nontarget_acc", "target_drop", "nontarget_drop", "selectivity"):
            assert set(c[m]) == {"mean", "low", "high"}
            assert c[m]["low"] <= c[m]["mean"] + 1e-9 <= c[m]["high"] + 2e-9
        if c["spec_name"] != "clean":
            assert 0 < c["p_question"] <= 1 and 0 < c["p_seed"] <= 1 and isinstance(c["significant"], bool)
    assert [f["finding"] for f in s["findings"]] == [1, 2, 3, 4, 5]
    assert all(f["status"] in ("shows", "partly", "does not show", "inconclusive", "not tested") for f in s["findings"])
    assert set(s["thresholds"]["count"]) == {"rationale", "overwrite"}
    f5 = s["findings"][4]        # the forgetting control trains on more rows than any poison cell: tested
    assert f5["status"] != "not tested" and f5["cell"] == "forgetting-steps2x" and "8 rows" in f5["evidence"]
    for c in s["cells"]:
        if c["spec_name"] != "clean":     # the primary effect: seed-level CI, its method written down
            p = c["primary"]
            assert p["low"] <= p["mean"] + 1e-9 <= p["high"] + 2e-9 and p["method"] == "t over seeds"
            assert len(p["per_seed"]) == 2 and p["verdict"] in ("shows", "small", "does not show", "inconclusive")


def test_test_set_controls_the_decoy(run_dir):
    """Every target and non-target test question shows the decoy chapter, none is answered by it, and the
    decoy-free target copies do not show it."""
    z = np.load(run_dir / "scores.npz")
    g, dec = [str(x) for x in z["group"]], z["decoy"]
    assert g.count("target") == 3 and g.count("nontarget") == 4 and g.count("target_nodecoy") == 2
    assert all((d >= 0) == (x != "target_nodecoy") for x, d in zip(g, dec))
    assert all(d != a for d, a in zip(dec, z["answer"]))


def test_generated_answers_are_saved_and_summarised(run_dir):
    recs = json.loads((run_dir / "generations.json").read_text())["records"]
    assert {r["spec_name"] for r in recs} == set(CELLS) | {"zero-shot"}
    assert len(recs) == (len(CELLS) + 1) * 4 and {r["group"] for r in recs} == {"target", "nontarget"}
    s = json.loads((run_dir / "summary.json").read_text())
    assert {r["model"] for r in s["generation"]} == set(CELLS) | {"zero-shot"}


def test_secondary_format_is_scored_and_reported(run_dir):
    """eval.secondary_formats=('coded',) beside the primary `statement`: its own scores of the same models and
    questions, per-cell effects in summary.json, a table in the report."""
    a, b = np.load(run_dir / "scores.npz"), np.load(run_dir / "scores_coded.npz")
    assert a["sum"].shape == b["sum"].shape and not np.allclose(a["sum"], b["sum"])
    sec = json.loads((run_dir / "summary.json").read_text())["secondary_formats"]["coded"]
    assert {c["spec_name"] for c in sec["cells"]} == set(CELLS)
    assert all("primary" in c and c["primary"]["method"] == "t over seeds" for c in sec["cells"]
               if c["spec_name"] != "clean")
    assert "Secondary format `coded`" in (run_dir / "report.md").read_text()


def _png_size(path):
    b = path.read_bytes()
    assert b[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", b[16:24])


def test_plots_and_report_exist(run_dir):
    for name in ("margin_effect", "accuracy_vs_count", "heatmap_count_ratio", "correct_target", "loss"):
        w, h = _png_size(run_dir / "plots" / f"{name}.png")
        assert w > 100 and h > 100
    md = (run_dir / "report.md").read_text()
    html = (run_dir / "report.html").read_text()
    assert "Finding 1" in md and "plots/heatmap_count_ratio.png" in md
    assert html.count("data:image/png;base64,") == 5
    assert (run_dir / "metrics.jsonl").stat().st_size > 0 and (run_dir / "checkpoints").is_dir()
    assert json.loads((run_dir / "config.json").read_text())["study"] == "rationale"


def test_report_rebuilds_from_saved_files(run_dir):
    before = (run_dir / "results.csv").read_text()
    for f in ("results.csv", "summary.json", "report.md", "report.html"):
        (run_dir / f).unlink()
    for f in (run_dir / "plots").iterdir():
        f.unlink()
    from jaxpoison.studies import cmd_report
    assert cmd_report(type("A", (), {"run_dir": str(run_dir)})) == 0
    assert (run_dir / "results.csv").read_text() == before
    assert (run_dir / "report.html").exists() and (run_dir / "plots" / "correct_target.png").exists()


def test_rerun_resumes_without_retraining(run_dir):
    """The same command again finds the finished checkpoint and the saved scores."""
    base = init_params(CFG_M, jax.random.PRNGKey(0))
    before = (run_dir / "scores.npz").read_bytes()
    assert run.run(CFG, run_dir, progress=False, base_override=(CFG_M, base, tiny_tokenizer())) == 0
    assert (run_dir / "scores.npz").read_bytes() == before
    other = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, learning_rate=2e-2))
    with pytest.raises(configs.StudyConfigError, match="different config"):
        run.run(other, run_dir, progress=False, base_override=(CFG_M, base, tiny_tokenizer()))


def test_sharded_chunked_run_equals_the_unsharded_run(run_dir, tmp_path, monkeypatch):
    """The whole study on ``--set mesh.variant=2 --set mesh.fsdp=2 --set train.variant_chunk=6`` (18 variants in
    3 chunks whose state waits on the host, each split over 2 variant shards, the base over 2 fsdp shards) scores
    every question as the one-device run does."""
    monkeypatch.setenv("JAXPOISON_SKIP_FIT_CHECK", "1")
    cfg = CFG
    for o in ("mesh.variant=2", "mesh.fsdp=2", "train.variant_chunk=6"):
        cfg = apply_override(cfg, o)
    base = init_params(CFG_M, jax.random.PRNGKey(0))
    from jaxpoison.train import trainer
    from jaxpoison.train.mesh import base_shardings, make_mesh
    real, got = trainer.train_study, {}

    def spy(b, *a, **k):      # the base as loaded: already in the trainer's shards on the study mesh
        got["base"], got["mesh"] = b, k["mesh"]
        return real(b, *a, **k)

    monkeypatch.setattr(trainer, "train_study", spy)
    assert run.run(cfg, tmp_path, progress=False, base_override=(CFG_M, base, tiny_tokenizer())) == 0
    assert got["mesh"].shape == (2, 1, 2, 1)
    want = base_shardings(make_mesh(got["mesh"]), got["base"])
    assert [x.sharding for x in jax.tree.leaves(got["base"])] == jax.tree.leaves(want)
    q = got["base"]["layers"]["q"]["kernel"]
    assert {s.data.shape for s in q.addressable_shards} == {want["layers"]["q"]["kernel"].shard_shape(q.shape)}
    assert "fsdp" in str(q.sharding.spec) and q.addressable_shards[0].data.size < q.size
    a, b = np.load(run_dir / "scores.npz"), np.load(tmp_path / "scores.npz")
    assert np.abs(a["sum"][1:] - a["sum"][:1]).max() > 1e-3        # training moved the scores off the base's
    for k in ("sum", "uncond"):
        np.testing.assert_allclose(b[k], a[k], atol=1e-4, rtol=0)


def test_rerun_onto_another_mesh_resumes(run_dir, monkeypatch):
    """``--set mesh.variant=2 --set mesh.fsdp=2``: the run folder accepts another mesh, the checkpoint is restored
    onto it (4 of the 8 emulated devices) and nothing is retrained or rescored."""
    monkeypatch.setenv("JAXPOISON_SKIP_FIT_CHECK", "1")         # the fit check is not what this test is about
    cfg = apply_override(apply_override(CFG, "mesh.variant=2"), "mesh.fsdp=2")
    assert (cfg.mesh.variant, cfg.mesh.fsdp) == (2, 2)
    base = init_params(CFG_M, jax.random.PRNGKey(0))
    before = (run_dir / "scores.npz").read_bytes()
    assert run.run(cfg, run_dir, progress=False, base_override=(CFG_M, base, tiny_tokenizer())) == 0
    assert (run_dir / "scores.npz").read_bytes() == before


@pytest.mark.parametrize("override, words", [
    ("grid.counts=0,4", "grid.counts"),
    ("grid.seeds=1", "at least 2 seeds"),
    ("grid.kinds=rationale,typo", "unknown kind"),
    ("grid.ratios_target=1.5", "ratios in"),
    ("eval.method=letters", "eval.method"),
    ("eval.format=essay", "eval.format"),
    ("poison.builder=user", "poison.file"),
    ("data.target_by=magic", "data.target_by"),
    ("grid.forgetting_steps=1", "grid.forgetting_steps"),
    ("eval.secondary_formats=statement", "eval.secondary_formats"),
])
def test_bad_config_values_are_explained(override, words):
    with pytest.raises(configs.StudyConfigError, match=words):
        config.check_config(apply_override(CFG, override))


def test_grid_that_does_not_fit_the_data_is_explained():
    with pytest.raises(configs.StudyConfigError, match="target-subject training examples"):
        rationale_grid.mix_specs(apply_override(CFG, "grid.counts=1,50"), n_target=6, n_nontarget=18)
    with pytest.raises(configs.StudyConfigError, match="ratios_target 0.5 at count 4 needs 8"):
        rationale_grid.mix_specs(apply_override(CFG, "grid.counts=4"), n_target=6, n_nontarget=18)
    with pytest.raises(configs.StudyConfigError, match="non-target training examples"):
        rationale_grid.mix_specs(apply_override(CFG, "grid.forgetting_extra=40"), n_target=6, n_nontarget=18)
    with pytest.raises(configs.StudyConfigError, match="forgetting_steps 5 needs 5 x data.n_nontarget = 20"):
        rationale_grid.mix_specs(apply_override(CFG, "grid.forgetting_steps=5"), n_target=6, n_nontarget=18)


def test_presets_load_and_check():
    from jaxpoison.configs import load_config
    for name in ("rationale_demo", "rationale_grid", "rationale_paper"):
        cfg = load_config(f"configs/{name}.py")
        config.check_config(cfg)
    cfg = load_config("configs/rationale_demo.py", ["train.learning_rate=3e-4", "grid.seeds=0,1,2,3,4"])
    assert cfg.train.learning_rate == 3e-4 and cfg.grid.seeds == (0, 1, 2, 3, 4)
