"""`compare` builds seed 003's cross-model table and ASR grid from run folders (summary.json made here from
hand-graded cells, no model)."""
import csv
import json

import pytest

from attacks_cells import cell_of as _cell, graded as _graded
from jaxpoison.cli import main
from jaxpoison.studies.attacks import compare
from jaxpoison.studies.attacks import metrics


def _run(tmp_path, name, model, seeds=True):
    recs, grades = _graded()
    if not seeds:
        keep = [i for i, r in enumerate(recs) if r.get("seed") in (None, 0)]
        recs, grades = [recs[i] for i in keep], [grades[i] for i in keep]
    cells = metrics.cell_stats(metrics.build_rows(recs, grades), n_resamples=199)
    cells += metrics.seed_means(cells)
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"study": "attacks", "config": {"model": model, "name": name}}))
    (d / "summary.json").write_text(json.dumps({"cells": cells, "grader": "rule"}, default=float))
    return d, cells


def test_one_row_per_model_and_columns_per_outcome_and_attack(tmp_path):
    a, cells_a = _run(tmp_path, "a", "llama-2-7b", seeds=True)
    b, cells_b = _run(tmp_path, "b", "llama-3-70b", seeds=False)
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"llama-2-7b", "llama-3-70b"}
    pe = next(r for r in rows if r["model"] == "llama-2-7b" and r["attack"] == "PE" and r["outcome"] == "Vaccine")
    want = _cell(cells_a, "base PE", "Vaccine")
    assert float(pe["asr"]) == pytest.approx(want["asr"]) and float(pe["asr_low"]) == pytest.approx(want["asr_low"])
    ft_a = next(r for r in rows if r["model"] == "llama-2-7b" and r["attack"] == "FT" and r["outcome"] == "Harmful drug")
    ft_b = next(r for r in rows if r["model"] == "llama-3-70b" and r["attack"] == "FT" and r["outcome"] == "Harmful drug")
    assert ft_a["row"] == "FT 100% mean of 2 seeds" and ft_b["row"] == "FT 100% s0"          # seeds pooled when many
    assert float(ft_b["asr"]) == pytest.approx((0.75 - 0.05) / 0.95)
    md = (out / "compare.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| llama")]
    assert len(table) == 2 and "Vaccine PE" in md and "Harmful drug FT" in md
    assert (out / "asr_grid.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_errors_name_the_fix(tmp_path):
    d = tmp_path / "r"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"study": "attacks", "config": {"model": "m", "name": "r"}}))
    with pytest.raises(FileNotFoundError, match="jaxpoison report"):
        compare.compare([d], tmp_path / "o")
    (d / "config.json").write_text(json.dumps({"study": "rationale", "config": {}}))
    with pytest.raises(ValueError, match="attacks runs"):
        compare.compare([d], tmp_path / "o")


def test_paraphrase_attacks_get_their_own_columns(tmp_path):
    from attacks_cells import paraphrase_rec as _rec
    pairs = []
    for i in range(10):
        n = f"n{i}"
        pairs += [_rec("injection", "normal", n, 1.0), _rec("injection", "attack", n, float(i < 5)),
                  _rec("injection", "attack_para", n, float(i < 8)),
                  _rec("finetune", "normal", n, 1.0, v=0, fraction=0.0, seed=0),
                  _rec("finetune", "normal", n, float(i < 2), v=1, fraction=1.0, seed=0),
                  _rec("finetune", "normal", n, float(i < 6), v=3, fraction=1.0, seed=0, paraphrase=True)]
    recs, grades = zip(*pairs)
    cells = metrics.cell_stats(metrics.build_rows(list(recs), list(grades)), n_resamples=99)
    got = compare.attack_cells({"cells": cells})
    assert got[("PE para", "Vaccine")]["row"] == "base PE para" and got[("FT para", "Vaccine")]["row"] == "FT 100% s0 para"
    assert got[("FT", "Vaccine")]["asr"] == pytest.approx(0.8) and got[("FT para", "Vaccine")]["asr"] == pytest.approx(0.4)
    d = tmp_path / "p"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"study": "attacks", "config": {"model": "m", "name": "p"}}))
    (d / "summary.json").write_text(json.dumps({"cells": cells, "grader": "rule"}, default=float))
    compare.compare([d], tmp_path / "o")
    assert "Vaccine PE para" in (tmp_path / "o" / "compare.md").read_text()
