"""Seed 003's MIMIC-III preparation on synthetic rows in the NOTEEVENTS schema that the test writes (no real
notes): the 'Service:' cut, the truncation at 'discharge instructions', bracket cleaning, the 1000-character and
token filters, the 1201-note stop, summarisation through the chat client (stub server on 127.0.0.1) and the CLI."""
import csv
import json

import pytest

from chat_stub import KEY, Stub
from jaxpoison.cli import main
from jaxpoison.data import mimic
from jaxpoison.data.schema import DataError
from jaxpoison.data.sources import _note

BODY = "Chief Complaint: chest pain. [**Hospital1 18**] Medications: aspirin.  Imaging: CT normal.\n" * 20  # ~1.4k chars


def _row(i, text, category="Discharge summary"):
    return {"ROW_ID": str(100 + i), "SUBJECT_ID": str(7 + i), "HADM_ID": str(5000 + i), "CHARTDATE": "2150-01-01",
            "CHARTTIME": "", "STORETIME": "", "CATEGORY": category, "DESCRIPTION": "Report", "CGID": "", "ISERROR": "",
            "TEXT": text}


def _write(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


ROWS = [
    _row(0, "Admission Date: [**2150-1-1**]\nService: MEDICINE\n" + BODY + "Discharge Instructions:\nTake ###### !!"),
    _row(1, "No service line here. " + BODY),                                        # no 'Service:' -> skipped
    _row(2, "Service: SURGERY\nshort note. DISCHARGE INSTRUCTIONS: " + BODY),        # < 1000 chars once cut
    _row(3, "Service: CARDIOLOGY\n" + BODY + "Service: second section is cut off by split", category="Echo"),
]


def test_seed_cuts_cleaning_and_filters():
    kept, counts = mimic.prepare(iter(ROWS))
    assert [k["row"] for k in kept] == [0, 3] and [k["id"] for k in kept] == ["0", "1"]
    assert counts | {} == {**counts, "rows": 4, "no_service": 1, "too_short": 1, "kept": 2}
    text = kept[0]["text"]
    seed = lambda t: mimic.re.sub(r'\s+', ' ', mimic.re.sub(r'\[.*?\]', ' ', t))            # the notebook's shorten_text
    raw = ROWS[0]["TEXT"].split('Service:')[1]
    assert text == seed(raw[:len(raw.lower().split('DISCHARGE INSTRUCTIONS'.lower())[0])])
    assert "[**" not in text and "######" not in text and "  " not in text and text.startswith(" MEDICINE ")
    assert "second section" not in kept[1]["text"] and kept[1]["category"] == "Echo"
    # the token filter (the seed: < 1000 Llama-2 tokens) and the stop after max_notes
    kept, counts = mimic.prepare(iter(ROWS), count_tokens=lambda t: len(t.split()), max_tokens=100)
    assert counts["too_many_tokens"] == 2 and kept == []
    kept, _ = mimic.prepare(iter(ROWS * 3), max_notes=3)
    assert [k["id"] for k in kept] == ["0", "1", "2"]


def test_cli_writes_notes_the_notes_source_reads_and_summarises_through_the_api(tmp_path, monkeypatch, capsys):
    src = _write(tmp_path / "NOTEEVENTS.csv", ROWS)
    out = tmp_path / "notes.jsonl"
    assert main(["data", "prepare-mimic", str(src), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["kept"] == 2 and report["length_filter"].startswith("off")
    notes = [_note(json.loads(l), i, source="notes", split="train") for i, l in enumerate(out.read_text().splitlines())]
    assert [n.id for n in notes] == ["0", "1"] and notes[0].context.startswith("MEDICINE Chief Complaint")
    assert notes[1].meta["hadm_id"] == "5003"                       # what the 'notes' source makes of each line
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Stub(reply=lambda b: "Summary  [**x**] of: " + b["messages"][1]["content"][-20:]) as stub:
        assert main(["data", "prepare-mimic", str(src), "--out", str(out), "--summarise", "openai:gpt-4",
                     "--api-base", stub.url]) == 0
        assert len(stub.requests) == 2
        # requests run concurrently: find the one for the first note by its text, not by arrival order
        msgs = next(r["body"]["messages"] for r in stub.requests if "MEDICINE" in r["body"]["messages"][1]["content"])
        assert msgs[0] == {"role": "system", "content": "You are a medical assistant, skilled in patient note "
                                                        "organizing and text cleaning."}
        assert msgs[1]["content"].startswith("Shorten the following patient note without losing information and "
                                             "section structures. Include all the medication, imaging results, test "
                                             "and examination results, even when the result is unremarkable:  MEDICINE")
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines[0]["text"].startswith("Summary of: ") and "[**" not in lines[0]["text"]


def test_bad_inputs_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="NOTEEVENTS"):
        list(mimic.read_noteevents(tmp_path / "missing.csv"))
    other = _write(tmp_path / "other.csv", [{"a": "1", "b": "2"}])
    with pytest.raises(DataError, match="no TEXT column"):
        list(mimic.read_noteevents(other))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        mimic.token_counter(tmp_path / "nope")
