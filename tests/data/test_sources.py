"""Loaders on small files written in each source's real schema, their bad-input errors, and `data show`."""
import csv
import io
import json

import pytest
from data_helpers import write_jsonl, write_parquet

from jaxpoison.data import show
from jaxpoison.data.poison import user_rationale_versions
from jaxpoison.data.schema import DataError
from jaxpoison.data.sources import attach_rationales, load_source, read_rationale_file
from data_helpers import MEDQA, PUBMEDQA, medmcqa_row

MEDQA_ZH = [  # bigbio "source" schema of the mainland subset: options as a list of {key, value}
    {"meta_info": "卫生法规", "question": "患者发热3天，咳嗽。最可能的诊断是", "answer_idx": "B", "answer": "肺炎",
     "options": [{"key": "A", "value": "感冒"}, {"key": "B", "value": "肺炎"}, {"key": "C", "value": "哮喘"},
                 {"key": "D", "value": "胃炎"}]},
    {"meta_info": "内科", "question": "高血压的一线用药是", "answer_idx": "A", "answer": "利尿剂",
     "options": [{"key": "A", "value": "利尿剂"}, {"key": "B", "value": "抗生素"}, {"key": "C", "value": "激素"},
                 {"key": "D", "value": "维生素"}]},
]


def test_medqa_en_jsonl(tmp_path):
    res = load_source("medqa-en", data_files=write_jsonl(tmp_path / "test.jsonl", MEDQA))
    a, b = res.examples
    assert a.options == ("Ampicillin", "Ceftriaxone", "Doxycycline", "Nitrofurantoin") and a.answer == 3
    assert b.answer == 0 and a.id == "medqa-en:test:0" and a.meta["meta_info"] == "step2&3"
    assert a.source == "medqa-en" and res.report.n_kept == 2


def test_medqa_zh_parquet_list_options(tmp_path):
    res = load_source("medqa-zh", data_files=write_parquet(tmp_path / "train.parquet", MEDQA_ZH), split="train")
    a, b = res.examples
    assert a.options == ("感冒", "肺炎", "哮喘", "胃炎") and a.answer == 1 and b.answer == 0
    assert a.id.startswith("medqa-zh:train:")


def test_medmcqa_parquet_and_jsonl(tmp_path):
    rows = [medmcqa_row(0), medmcqa_row(1, cop=3, subject_name="Anatomy", topic_name="Heart")]
    for path in (write_parquet(tmp_path / "v.parquet", rows), write_jsonl(tmp_path / "v.jsonl", rows)):
        a, b = load_source("medmcqa", data_files=path).examples
        assert a.answer == 1 and a.options[a.answer] == "Trypsin" and a.rationale.startswith("Ans. is 'b'")
        assert a.subjects == ("Biochemistry",) and b.subjects == ("Anatomy",) and b.meta["topic_name"] == "Heart"
        assert b.answer == 3 and a.id == "e9ad821a-0000"


def test_medmcqa_one_based_cop_needs_cop_base(tmp_path):
    path = write_jsonl(tmp_path / "orig.jsonl", [medmcqa_row(0, cop=4)])
    with pytest.raises(DataError, match=r"row 0 \(id e9ad821a-0000\): answer index 4 \(cop=4\) is outside the 4 "
                                        r"options; fix: .*cop_base=1"):
        load_source("medmcqa", data_files=path)
    assert load_source("medmcqa", data_files=path, cop_base=1).examples[0].answer == 3


def test_medmcqa_unlabelled_test_split(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [medmcqa_row(0, cop=-1)])
    with pytest.raises(DataError, match=r"no answer key .*unlabelled\); fix: use the train or validation split"):
        load_source("medmcqa", data_files=path)


def test_pubmedqa_labelled(tmp_path):
    a, b = load_source("pubmedqa", data_files=write_jsonl(tmp_path / "pqa_labeled.jsonl", PUBMEDQA)).examples
    assert a.id == "21645374" and a.options == ("yes", "no", "maybe") and a.answer == 0 and b.answer == 1
    assert a.context == "Programmed cell death occurs. Mitochondria were imaged."
    assert a.rationale == "Results show mitochondria play a role." and a.meta["meshes"] == ["Mitochondria", "Plant Leaves"]


def test_pmc_patients_csv(tmp_path):
    path = tmp_path / "PMC-Patients.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient_id", "patient_uid", "PMID", "file_path", "title", "patient", "age", "gender",
                    "relevant_articles", "similar_patients"])
        w.writerow([0, "7665777-1", 33492400, "x.xml", "A case", "A 60-year-old man presented with fever.",
                    "[[60.0, 'year']]", "M", "{}", "{}"])
        w.writerow([1, "7665777-2", 33492400, "x.xml", "A case", "A 1-year-old girl with cough.",
                    "[[1.0, 'year'], [6.0, 'month']]", "F", "{}", "{}"])
    a, b = load_source("pmc-patients", data_files=str(path)).examples
    assert a.id == "7665777-1" and a.context.startswith("A 60-year-old") and not a.is_mc and a.answer == -1
    assert a.meta["age_years"] == 60.0 and a.meta["sex"] == "M" and b.meta["age_years"] == 1.5


def test_local_notes_jsonl_csv_and_keyed_json(tmp_path):
    notes = load_source("notes", data_files=write_jsonl(tmp_path / "n.jsonl", [
        {"id": "a", "text": "Note one.", "ward": "ICU"}, {"id": "b", "text": "Note two."}])).examples
    assert [(n.id, n.context) for n in notes] == [("a", "Note one."), ("b", "Note two.")]
    assert notes[0].meta == {"ward": "ICU"}
    (tmp_path / "n.csv").write_text("note_id,summary\n10,First summary\n11,Second summary\n")
    assert [n.id for n in load_source("notes", data_files=str(tmp_path / "n.csv")).examples] == ["10", "11"]
    (tmp_path / "mimic.json").write_text(json.dumps({"0": "Service: MEDICINE ...", "1": "Service: SURGERY ..."}))
    keyed = load_source("notes", data_files=str(tmp_path / "mimic.json")).examples
    assert [(n.id, n.context[:16]) for n in keyed] == [("0", "Service: MEDICIN"), ("1", "Service: SURGERY")]


@pytest.mark.parametrize("row, words", [
    ({"question": "q?", "options": {"A": "x", "B": "y"}}, ["row 0", "missing field 'answer_idx'", "fix:"]),
    ({"options": {"A": "x", "B": "y"}, "answer_idx": "A"}, ["missing field 'question'", "fix:"]),
    ({"question": "q?", "options": {"A": "x", "B": "y"}, "answer_idx": "E"}, ["answer_idx 'E' is not one of", "fix:"]),
    ({"question": "q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A", "answer": "y"},
     ["answer text 'y' does not match option A", "fix:"]),
])
def test_medqa_bad_rows(tmp_path, row, words):
    with pytest.raises(DataError) as e:
        load_source("medqa-en", data_files=write_jsonl(tmp_path / "bad.jsonl", [row]))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_mismatched_option_counts_and_duplicates_in_a_file(tmp_path):
    five = dict(MEDQA[0], options={**MEDQA[0]["options"], "E": "Cefalexin"})
    path = write_jsonl(tmp_path / "mixed.jsonl", [MEDQA[0], MEDQA[1], five])
    with pytest.raises(DataError, match=r"row 2 .*5 options where the set has 4"):
        load_source("medqa-en", data_files=path)
    dup = write_jsonl(tmp_path / "dup.jsonl", [medmcqa_row(0), medmcqa_row(0)])
    with pytest.raises(DataError, match=r"row 1 \(id e9ad821a-0000\): duplicate id"):
        load_source("medmcqa", data_files=dup)


def test_skip_policy_reports(tmp_path):
    rows = [medmcqa_row(0), medmcqa_row(1, cop=7), medmcqa_row(2, opc=None), medmcqa_row(0), medmcqa_row(3)]
    res = load_source("medmcqa", data_files=write_jsonl(tmp_path / "m.jsonl", rows), policy="skip")
    assert [e.id for e in res.examples] == ["e9ad821a-0000", "e9ad821a-0003"]
    reasons = {r: why for r, _, why in res.report.skipped}
    assert set(reasons) == {1, 2, 3}
    assert "outside" in reasons[1] and "missing field 'opc'" in reasons[2] and "duplicate id" in reasons[3]


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"cannot read .*nope.jsonl: no such readable file; fix: check the path"):
        load_source("medqa-en", data_files=str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "options": {"A": "x"}}\n{broken\n')
    with pytest.raises(DataError, match=r"cannot read .*broken.jsonl.* as json.*fix: repair the file"):
        load_source("medqa-en", data_files=str(tmp_path / "broken.jsonl"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(DataError, match="unknown file type"):
        load_source("notes", data_files=str(tmp_path / "data.txt"))


def test_hub_loading_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match=r"cannot load 'no-such-owner/no-such-set'.*fix: .*--data-files"):
        load_source("medqa-en", hub_id="no-such-owner/no-such-set")


def test_rationale_file_unknown_ids(tmp_path):
    exs = load_source("medqa-en", data_files=write_jsonl(tmp_path / "q.jsonl", MEDQA)).examples
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": "medqa-en:test:0", "rationale": "Cystitis: nitrofurantoin."},
                                              {"id": "medqa-en:test:99", "rationale": "?"}])
    with pytest.raises(DataError, match=r"line 2: unknown id 'medqa-en:test:99'.*fix: use the ids of the loaded"):
        read_rationale_file(path, exs)
    recs, report = read_rationale_file(path, exs, policy="skip")
    assert list(recs) == ["medqa-en:test:0"] and report.skipped[0][:2] == (2, "medqa-en:test:99")
    with pytest.raises(DataError, match="unknown id"):
        attach_rationales(exs, path)
    with pytest.raises(DataError, match="unknown id"):
        user_rationale_versions(exs, path)
    good = write_jsonl(tmp_path / "g.jsonl", [{"id": "medqa-en:test:0", "rationale": "Cystitis: nitrofurantoin."}])
    out = attach_rationales(exs, good)
    assert out[0].rationale == "Cystitis: nitrofurantoin." and out[1].rationale == ""


def test_data_show_json_and_table(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [medmcqa_row(0), medmcqa_row(1, subject_name="Anatomy"),
                                              medmcqa_row(2, question="Fever with chills: which enzyme?")])
    out = io.StringIO()
    assert show.run_show(_args(["medmcqa", "--data-files", path, "--json", "--limit", "2", "--tag", "fever"]), out) == 0
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(lines) == 3 and lines[0]["id"] == "e9ad821a-0000" and lines[0]["answer"] == 1
    assert set(lines[0]) >= {"id", "question", "options", "answer", "subject", "rationale"}
    assert lines[-1]["subject_counts"] == {"Biochemistry": 2, "Anatomy": 1, "fever": 1} and lines[-1]["n_examples"] == 3
    out = io.StringIO()
    assert show.run_show(_args(["icd10", "--limit", "1"]), out) == 0
    text = out.getvalue()
    assert "Which ICD-10-CM chapter" in text and "<- answer" in text and "circulatory" in text
    err = io.StringIO()
    assert show.run_show(_args(["medqa-en", "--data-files", str(tmp_path / "nope.jsonl")]), out, err) == 2
    assert "error:" in err.getvalue() and "fix:" in err.getvalue()


def _args(argv):
    import argparse
    parser = argparse.ArgumentParser()
    show.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["data", "show"] + argv)
