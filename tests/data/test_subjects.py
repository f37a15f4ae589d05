"""Target-subject selection: by label, by keywords (fever in English and Chinese), by function; counts."""
import pytest

from jaxpoison.data.schema import DataError, Example
from jaxpoison.data.subjects import (FEVER_KEYWORDS, format_counts, keyword_matcher, select_subject, subject_counts,
                                     tag_subjects)


def ex(i, q, options=("a", "b", "c", "d"), subjects=(), **meta):
    return Example(str(i), q, tuple(options), 0, tuple(subjects), meta=meta)


EN = [ex(1, "A child has a high fever and a rash."), ex(2, "Which drug lowers blood pressure?"),
      ex(3, "A febrile patient with chills."), ex(4, "Persistent pyrexia of unknown origin."),
      ex(5, "Which finding is typical?", options=("Cough", "Fevers at night", "Rash", "Pain")),
      ex(6, "An afebrile man with chest pain."), ex(7, "Feverfew tea is an herbal remedy.")]
ZH = [ex(10, "患者发热3天，伴咳嗽。"), ex(11, "小儿发烧的处理原则是"), ex(12, "高血压的一线用药是"),
      ex(13, "下列哪项是正确的", options=("感冒", "持续发热", "哮喘", "胃炎"))]


def test_fever_keywords_in_english():
    split = select_subject(EN, keywords="fever")
    # word-start matching: 'fevers' and 'feverfew' match 'fever'; 'afebrile' does not match 'febrile'
    assert [e.id for e in split.target] == ["1", "3", "4", "5", "7"]
    assert split.name == "fever" and [e.id for e in split.rest] == ["2", "6"]


def test_fever_keywords_in_chinese():
    split = select_subject(ZH, keywords=FEVER_KEYWORDS, name="发热")
    assert [e.id for e in split.target] == ["10", "11", "13"] and split.name == "发热"


def test_keywords_over_chosen_fields_only():
    m = keyword_matcher(["fever"], fields=("question",))
    assert not m(EN[4]) and keyword_matcher(["fever"])(EN[4])


def test_select_by_label_field_and_function():
    exs = [ex(1, "q", subjects=("Pediatrics",), topic_name="Fever"), ex(2, "q", subjects=("Medicine",)),
           ex(3, "q", subjects=("Pediatrics",))]
    assert [e.id for e in select_subject(exs, label="Pediatrics").target] == ["1", "3"]
    assert [e.id for e in select_subject(exs, label="Fever", label_field="topic_name").target] == ["1"]
    assert [e.id for e in select_subject(exs, fn=lambda e: e.id == "2").target] == ["2"]


def test_empty_selection_and_ambiguous_choice_are_errors():
    exs = [ex(1, "q", subjects=("Medicine",))]
    with pytest.raises(DataError, match=r"target subject 'Pediatrcs' .* selects no example out of 1; fix: .*Medicine"):
        select_subject(exs, label="Pediatrcs")
    with pytest.raises(DataError, match="exactly one of"):
        select_subject(exs, label="Medicine", keywords=["x"])
    with pytest.raises(DataError, match="unknown keyword subject"):
        select_subject(exs, keywords="cough")
    assert select_subject(exs, label="x", allow_empty=True).target == []


def test_counts_per_subject_and_split():
    train = tag_subjects([ex(1, "fever", subjects=("Medicine",)), ex(2, "q", subjects=("Medicine",)), ex(3, "q")])
    test = tag_subjects([ex(4, "发烧", subjects=("Pediatrics",))])
    counts = subject_counts({"train": train, "test": test})
    assert counts == {"Medicine": {"train": 2, "test": 0}, "fever": {"train": 1, "test": 1},
                      "(none)": {"train": 1, "test": 0}, "Pediatrics": {"train": 0, "test": 1}}
    table = format_counts(counts)
    assert table.splitlines()[0].split() == ["subject", "train", "test"] and "fever" in table
