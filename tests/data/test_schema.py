"""The example schema: bad rows give a clear error naming the row and the fix, or are skipped with a report."""
import pytest

from jaxpoison.data.schema import DataError, Example, validate_examples


def mc(i, options=("a", "b", "c", "d"), answer=0, **kw):
    return Example(str(i), f"question {i}?", tuple(options), answer, **kw)


def test_good_examples_pass_and_keep_order():
    res = validate_examples([mc(1), mc(2, answer=3), Example("n1", "", (), -1, context="a note")])
    assert [e.id for e in res.examples] == ["1", "2", "n1"]
    assert res.report.n_kept == 3 and not res.report.skipped


@pytest.mark.parametrize("bad, words", [
    (mc(7, answer=4), ["row 0", "id 7", "answer index 4 is outside the 4 options", "fix:"]),
    (mc(7, answer=-1), ["outside", "fix:"]),
    (mc(7, options=("a",)), ["only 1 option", "fix:"]),
    (mc(7, options=("a", "  ")), ["option B is empty", "fix:"]),
    (Example("7", "  ", ("a", "b"), 0), ["empty question", "fix:"]),
    (Example("", "q", ("a", "b"), 0), ["empty id", "fix:"]),
    (Example("n", "", (), -1), ["no text", "fix:"]),
])
def test_bad_row_is_named_with_a_fix(bad, words):
    with pytest.raises(DataError) as e:
        validate_examples([bad], source="mine")
    for w in words:
        assert w in str(e.value)


def test_duplicate_ids_are_caught():
    with pytest.raises(DataError, match=r"row 2 \(id 1\): duplicate id '1' \(first seen at row 0\).*fix:"):
        validate_examples([mc(1), mc(2), mc(1)])


def test_mismatched_option_counts_are_caught():
    with pytest.raises(DataError, match=r"row 1 .*5 options where the set has 4.*fix: pass n_options=5"):
        validate_examples([mc(1), mc(2, options="abcde"), mc(3)])
    # an explicit expected count wins over the majority
    with pytest.raises(DataError, match="4 options where the set has 5"):
        validate_examples([mc(1)], n_options=5)


def test_skip_policy_reports_every_skipped_row():
    rows = [mc(1), mc(2, answer=9), mc(1), mc(3, options="abcde"), mc(4)]
    res = validate_examples(rows, policy="skip")
    assert [e.id for e in res.examples] == ["1", "4"]
    assert [(r, i) for r, i, _ in res.report.skipped] == [(1, "2"), (2, "1"), (3, "3")]
    assert res.report.n_read == 5 and res.report.n_kept == 2
    text = res.report.summary()
    assert "skipped 3" in text and "duplicate id" in text and "outside" in text and "5 options" in text


def test_unknown_policy_is_an_error():
    with pytest.raises(DataError, match="unknown error policy"):
        validate_examples([mc(1)], policy="ignore")


def test_json_record_has_the_show_fields():
    rec = mc(1, answer=2, subjects=("Medicine",), rationale="because").to_json()
    assert {k: rec[k] for k in ("id", "question", "options", "answer", "subject", "rationale")} == {
        "id": "1", "question": "question 1?", "options": ["a", "b", "c", "d"], "answer": 2, "subject": "Medicine",
        "rationale": "because"}
    assert rec["answer_letter"] == "C"
