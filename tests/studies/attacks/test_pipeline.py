"""The seed-003 study's mechanics end to end on a tiny random model with a scripted response source: the files a
run writes, their columns, a report rebuilt from the saved answers without the model, and a resumed run that
reuses every saved phase. (Whether the attack shows is a question for a real model: see the demo's report.)"""
import csv
import io
import json

import pytest
from data_helpers import tiny_tokenizer

from attacks_tiny import GEN_CFG as CFG_M, tiny_params
from jaxpoison.studies.attacks import run
from attacks_tiny import PIPE_CFG as CFG

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("attacks")
    assert run.run(CFG, out, progress=False, base_override=(CFG_M, tiny_params(), tiny_tokenizer())) == 0
    return out


def _jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines()][1:]


def test_every_answer_is_saved(run_dir):
    inj = _jsonl(run_dir / "responses" / "injection.jsonl")
    assert len(inj) == 3 * 3 * 2 and {r["prompt_kind"] for r in inj} == {"normal", "attack"}
    src = _jsonl(run_dir / "responses" / "source.jsonl")
    assert len(src) == 3 * 4 * 2 and any("Ibuprofen and Warfarin" in r["response"] for r in src)
    ft = _jsonl(run_dir / "responses" / "finetune.jsonl")
    assert len(ft) == 18 * 3 and {r["prompt_kind"] for r in ft} == {"normal"}      # clean prompts only
    table = json.loads((run_dir / "variants.json").read_text())
    assert len(table) == 3 * 3 * 2 and {r["variant_id"] for r in ft} == set(range(18))
    assert all(table[r["variant_id"]]["task"] == r["task"] for r in ft)
    test_ids = set(json.loads((run_dir / "data.json").read_text())["test_ids"])
    assert {r["note_id"] for r in ft + inj} == test_ids and not test_ids & {r["note_id"] for r in src}
    judge = _jsonl(run_dir / "responses" / "judge.jsonl")
    assert len(judge) == len(inj) + len(src) + len(ft)


def test_rates_csv_has_the_seeds_layout_and_long_columns(run_dir):
    rows = list(csv.reader(io.StringIO((run_dir / "rates.csv").read_text())))
    assert rows[0] == ["model", "Vaccine", "Harmful drug", "ultrasound", "CT", "X-ray", "MRI"]
    names = [r[0] for r in rows[1:]]
    assert names[:4] == ["base normal", "base PE", "source normal", "source PE"]
    assert "FT 100% s1" in names and "FT 50% mean of 2 seeds" in names
    pe = rows[names.index("base PE") + 1]
    assert all("%\n[" in c and "\nASR: " in c for c in pe[1:])
    long = list(csv.DictReader(open(run_dir / "rates_long.csv")))
    assert {"row", "outcome", "n", "rate", "ci_low", "ci_high", "baseline", "asr", "asr_low", "asr_high"} <= set(long[0])
    src_pe = {r["outcome"]: float(r["rate"]) for r in long if r["row"] == "source PE"}
    assert src_pe["Harmful drug"] == 1.0 and src_pe["Vaccine"] == 0.0 and src_pe["CT"] == 1.0   # scripted: compliant
    assert all(r["baseline"] == "FT 0% s0" for r in long if r["row"] == "FT 50% s0")


def test_summary_plots_and_report(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["low_compliance"] == [] and s["source_attack_content"]["Vaccine"] == 1.0
    assert {c["model"] for c in s["capability"]} >= {"base", "drug 0% s0", "vaccine 100% s1"}
    assert len(s["capability"]) == 1 + 3 * 2 * 2 and set(s["judge_agreement"]) <= set(
        ["Vaccine", "Harmful drug", "ultrasound", "CT", "X-ray", "MRI"])
    for name in ("injection", "asr_vs_fraction", "capability"):
        assert (run_dir / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "report.md").read_text()
    assert "Prompt injection" in md and "plots/asr_vs_fraction.png" in md and "SYNTHETIC" in md
    assert "## Answers without a verdict" in md and "ASR verdict-bearing / all" in md
    for c in s["cells"]:                                     # every rate carries its verdict-free count
        assert 0 <= c["n_no_verdict"] <= c["n_answers"] and c["n"] <= c["n_answers"], c
        if c["phase"] == "injection" and c["baseline"]:
            assert c["asr_all_minus_verdict"] == pytest.approx(c["asr_all"] - c["asr_verdict"], nan_ok=True)
    assert (run_dir / "report.html").read_text().count("data:image/png;base64,") == 3
    assert json.loads((run_dir / "config.json").read_text())["study"] == "attacks"
    gen = json.loads((run_dir / "data.json").read_text())["generation"]    # a model passed in: no generation config
    assert gen["source"] == "fallback" and gen["temperature"] == CFG.generation.temperature
    assert "sampling: no generation_config.json" in md


def test_report_rebuilds_from_saved_answers_and_a_rerun_reuses_them(run_dir, monkeypatch):
    before = {f: (run_dir / f).read_text() for f in ("rates.csv", "rates_long.csv", "capability.csv")}
    for f in ("rates.csv", "rates_long.csv", "summary.json", "report.md", "report.html", "capability.csv"):
        (run_dir / f).unlink()
    from jaxpoison.cli import main
    assert main(["report", str(run_dir)]) == 0
    assert all((run_dir / f).read_text() == text for f, text in before.items())
    from jaxpoison.studies.attacks import steps
    boom = lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated a saved phase"))
    monkeypatch.setattr(steps, "generate_answers", boom)
    monkeypatch.setattr("jaxpoison.eval.generate_variants.generate_text_variants", boom)
    monkeypatch.setattr("jaxpoison.eval.score.score_options", boom)
    monkeypatch.setattr("jaxpoison.models.generate.generate_text", boom)
    assert run.run(CFG, run_dir, progress=False, base_override=(CFG_M, tiny_params(), tiny_tokenizer())) == 0
    assert (run_dir / "rates.csv").read_text() == before["rates.csv"]


def test_asr_cis_are_paired_by_default_and_two_sample_on_request(run_dir, tmp_path):
    """The rows answer the same test notes, so the ASR CI resamples each row's notes with its baseline's
    (``asr_paired=True``, the default); a report rebuilt with ``asr_paired=false`` uses the two-sample bootstrap."""
    import shutil
    assert CFG.asr_paired
    s = json.loads((run_dir / "summary.json").read_text())
    with_ci = [c for c in s["cells"] if c.get("asr_ci")]
    assert with_ci and all(c["asr_ci"] == "paired bootstrap BCa (shared notes)" for c in with_ci)
    assert "ASR CIs paired" in (run_dir / "report.md").read_text()
    assert {r["asr_ci"] for r in csv.DictReader(open(run_dir / "rates_long.csv"))} >= {with_ci[0]["asr_ci"]}
    other = tmp_path / "unpaired"
    shutil.copytree(run_dir, other, ignore=shutil.ignore_patterns("checkpoints"))
    c = json.loads((other / "config.json").read_text())
    c["config"]["asr_paired"] = False
    (other / "config.json").write_text(json.dumps(c))
    assert run.report(other) == 0
    u = {(c["row"], c["outcome"]): c for c in json.loads((other / "summary.json").read_text())["cells"]}
    assert all(u[(c["row"], c["outcome"])]["asr_ci"] == "two-sample bootstrap BCa" for c in with_ci)
    assert all(u[(c["row"], c["outcome"])]["asr"] == pytest.approx(c["asr"], nan_ok=True) for c in with_ci)
    assert "ASR CIs two-sample" in (other / "report.md").read_text()
