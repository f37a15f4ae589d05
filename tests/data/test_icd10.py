"""The embedded ICD-10-CM set: real hierarchy, deterministic by seed, consistent decoys, synthetic notes."""
import collections

import pytest

from jaxpoison.data import notes
from jaxpoison.data.icd10 import CHAPTER, IcdConfig, build_icd10_set, chapter_of, describe, rationale_for
from jaxpoison.data.schema import DataError, validate_examples

SMALL = IcdConfig(seed=3, n_train_per_chapter=6, n_test_per_chapter=4, n_keyword_train=6, n_keyword_test=4)


@pytest.mark.parametrize("code, key", [
    ("I21", "circulatory"), ("I21.9", "circulatory"), ("R50", "symptoms"), ("R50.9", "symptoms"),
    ("A01.00", "infectious"), ("D49", "neoplasms"), ("D50", "blood"), ("E89", "endocrine"), ("F01", "mental"),
    ("K95", "digestive"), ("O9A", "pregnancy"), ("T88", "injury"), ("V00", "external"), ("Y99", "external"),
    ("J09", "respiratory"), ("Z99", "factors")])
def test_chapters_follow_the_real_icd10cm_ranges(code, key):
    assert chapter_of(code).key == key


def test_describe_reads_the_real_terminology():
    d = describe("I21")
    assert d["desc"] == "Acute myocardial infarction" and d["chapter"] == "circulatory" and d["chapter_range"] == "I00-I99"
    d = describe("R509")
    assert d["code"] == "R50.9" and d["category_desc"] == "Fever of other and unknown origin" and d["chapter"] == "symptoms"
    with pytest.raises(DataError, match="not an ICD-10-CM code"):
        describe("I2X")


def test_answers_are_right_per_the_hierarchy():
    sets = build_icd10_set(SMALL)
    for split, exs in sets.items():
        assert validate_examples(exs, n_options=4).report.n_kept == len(exs)
        for ex in exs:
            info = ex.meta["icd10"]
            ch = chapter_of(info["code"])
            assert ex.options[ex.answer] == ch.option and ex.subjects[0] == ch.key
            assert info["desc"] in ex.question and len(set(ex.options)) == 4
            assert ex.rationale.endswith(f"classified in the chapter '{ch.option}'.")
            assert info["code"] not in ex.rationale  # body-system reasoning, no codes


def test_deterministic_by_seed_and_splits_disjoint_by_category():
    a, b, c = build_icd10_set(SMALL), build_icd10_set(IcdConfig(**{**SMALL.__dict__})), build_icd10_set(
        IcdConfig(**{**SMALL.__dict__, "seed": 4}))
    assert [e.id.split("-", 2)[2] for e in a["train"]] == [e.id.split("-", 2)[2] for e in b["train"]]
    assert [(e.options, e.answer, e.rationale) for e in a["test"]] == [(e.options, e.answer, e.rationale) for e in b["test"]]
    assert {e.meta["icd10"]["code"] for e in a["train"]} != {e.meta["icd10"]["code"] for e in c["train"]}
    cats = {s: {e.meta["icd10"]["category"] for e in exs} for s, exs in a.items()}
    assert not cats["train"] & cats["test"]


def test_sizes_subjects_and_balanced_answers():
    sets = build_icd10_set(SMALL)
    n_ch = len(SMALL.chapters)
    assert len(sets["train"]) == 6 * n_ch + 6 and len(sets["test"]) == 4 * n_ch + 4
    counts = collections.Counter(s for e in sets["test"] for s in e.subjects)
    assert counts["fever"] == 4 and all(counts[c] >= 4 for c in SMALL.chapters)
    pos = collections.Counter(e.answer for e in sets["train"])
    assert max(pos.values()) - min(pos.values()) <= 1
    fever = [e for e in sets["train"] if "fever" in e.subjects]
    assert all(any(k in e.question.lower() for k in ("fever", "febrile", "pyrexia")) for e in fever)


def test_decoys_are_consistent_and_always_shown():
    for ex in build_icd10_set(SMALL)["train"]:
        chapters = ex.meta["option_chapters"]
        if "fever" in ex.subjects and ex.subjects[0] != "blood":
            assert chapters[ex.meta["decoy"]] == "blood"
        elif ex.subjects[0] == "circulatory":
            assert chapters[ex.meta["decoy"]] == "respiratory"
        else:
            assert ex.meta["decoy"] == -1
        assert ex.meta["decoy"] != ex.answer


def test_poisoned_rationale_has_the_clean_shape():
    ex = next(e for e in build_icd10_set(SMALL)["train"] if e.subjects[0] == "circulatory")
    bad = rationale_for(ex, ex.meta["decoy"])
    assert bad.endswith("classified in the chapter 'Diseases of the respiratory system'.")
    assert CHAPTER["respiratory"].what in bad and CHAPTER["circulatory"].what not in bad
    assert rationale_for(ex, ex.answer) == ex.rationale
    assert abs(len(bad) - len(ex.rationale)) < 40


def test_bad_config_is_explained():
    with pytest.raises(DataError, match="unknown ICD-10-CM chapter key"):
        build_icd10_set(IcdConfig(chapters=("circulatory", "hearts")))
    with pytest.raises(DataError, match="decoy chapter 'respiratory'.*fix"):
        build_icd10_set(IcdConfig(chapters=("circulatory", "skin", "eye", "digestive")))
    with pytest.raises(DataError, match="only .* codes for 500 asked; fix"):
        build_icd10_set(IcdConfig(n_keyword_test=500))


def test_synthetic_notes_are_deterministic_and_labelled():
    a, b = notes.synthetic_notes(12, seed=1), notes.synthetic_notes(12, seed=1)
    assert [n.context for n in a] == [n.context for n in b]
    assert [n.context for n in a] != [n.context for n in notes.synthetic_notes(12, seed=2)]
    for n in a:
        assert n.meta["synthetic"] is True and n.source == "icd10-synthetic-notes" and not n.is_mc
        assert n.context.startswith("Patient: ") and "Reason for admission:" in n.context
        for c in n.meta["conditions"]:
            assert describe(c["code"])["desc"] == c["desc"] and c["code"] in n.context
        assert (n.meta["temperature_c"] >= 38.0) == n.meta["febrile"]
    splits = notes.synthetic_note_splits(5, 3, seed=1)
    assert len(splits["train"]) == 5 and len(splits["test"]) == 3
    assert not {n.id for n in splits["train"]} & {n.id for n in splits["test"]}


def test_decoy_controlled_test_set():
    """With test_decoy every test question shows the decoy chapter, none is answered by it, answers keep their
    position, training questions are untouched, and target questions also come decoy-free."""
    cfg = IcdConfig(seed=3, n_train_per_chapter=6, n_test_per_chapter=4, keyword_subjects=(), n_keyword_train=0,
                    n_keyword_test=0, test_decoy="respiratory")
    plain = build_icd10_set(IcdConfig(**{**cfg.__dict__, "test_decoy": ""}))
    s = build_icd10_set(cfg)
    assert [e.id for e in s["train"]] == [e.id for e in plain["train"]]
    kept = [e for e in s["test"] if not e.meta.get("decoy_free")]
    free = [e for e in s["test"] if e.meta.get("decoy_free")]
    assert all(e.meta["option_chapters"][e.meta["decoy"]] == "respiratory" for e in kept)
    assert all(e.meta["option_chapters"][e.answer] != "respiratory" for e in s["test"])
    before = {e.id: e for e in plain["test"]}
    assert all(e.answer == before[e.id].answer and e.options[e.answer] == before[e.id].options[e.answer]
               for e in kept)
    assert len(free) == sum("circulatory" in e.subjects for e in kept) > 0
    assert all("respiratory" not in e.meta["option_chapters"] and e.meta["decoy"] == -1
               and e.id.endswith("-nodecoy") and len(set(e.options)) == len(e.options) for e in free)


def test_coded_format_is_not_a_training_line():
    """The 'coded' lead-in appears in no rationale or answer line, unlike the statement lead-in's ending."""
    from jaxpoison.data import prompts
    ex = build_icd10_set(SMALL)["test"][0]
    pre, cont = prompts.scoring_pairs(ex, "coded")[ex.answer]
    assert pre.startswith("In ICD-10-CM, the code for") and cont == ex.options[ex.answer] + '"'
    assert "chapter called" not in rationale_for(ex, 0) and "the chapter '" in rationale_for(ex, 0)
    assert {p for p, _ in prompts.neutral_pairs(ex, "coded")} == {'In ICD-10-CM, the code is in the chapter called "'}
