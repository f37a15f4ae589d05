"""Mix specs and the variant table: counts and ratios as asked, nested subsets, controls without target data."""
import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from jaxpoison.data import poison
from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
from jaxpoison.data.notes import synthetic_notes
from jaxpoison.data.mixes import MixSpec, build_variants, resolve
from jaxpoison.data.pool import tokenize_pool
from jaxpoison.data.schema import DataError
from jaxpoison.data.subjects import select_subject

CFG = IcdConfig(seed=0, n_train_per_chapter=8, n_test_per_chapter=1, n_keyword_train=2, n_keyword_test=1)
TRAIN = build_icd10_set(CFG)["train"]
SPLIT = select_subject(TRAIN, label="circulatory")
T, N = SPLIT.target, SPLIT.rest
VERSIONS = (poison.clean_versions(TRAIN) + poison.rule_rationale_poison(T, seed=0)
            + poison.overwrite_versions(T, seed=0))
POOL = tokenize_pool(poison.rows_for(VERSIONS), tiny_tokenizer(), max_len=1024)


def kinds_of(vt, v):
    return [POOL.meta[i]["kind"] for i in vt.rows[v, :vt.n_rows[v]]]


def ids_of(vt, v):
    return [POOL.meta[i]["example_id"] for i in vt.rows[v, :vt.n_rows[v]]]


def test_counts_and_ratios():
    nt, nn = len(T), len(N)
    assert resolve(MixSpec("rationale", poison_count=4), nt, nn).poison_count == 4
    r = resolve(MixSpec("rationale", ratio_target=0.5, with_correct_target=True, n_target=8), nt, nn)
    assert (r.poison_count, r.n_correct_target) == (4, 4)
    r = resolve(MixSpec("overwrite", ratio_all=0.05, n_nontarget=95), nt, nn)
    assert r.poison_count == 5 and r.poison_count / (r.poison_count + r.n_nontarget) == 0.05
    r = resolve(MixSpec("rationale", ratio_all=0.1, with_correct_target=True, n_target=8, n_nontarget=72), nt, nn)
    assert (r.poison_count, r.n_correct_target, r.n_nontarget) == (8, 0, 72)
    assert resolve(MixSpec("forgetting", n_nontarget=50, forgetting_extra=20), nt, nn).n_nontarget == 70


@pytest.mark.parametrize("spec, words", [
    (MixSpec("rationale"), "exactly one of poison_count"),
    (MixSpec("rationale", poison_count=2, ratio_all=0.1), "exactly one of"),
    (MixSpec("rationale", ratio_target=0.5), "needs correct target samples"),
    (MixSpec("rationale", poison_count=10_000), "only .* target examples are available"),
    (MixSpec("forgetting", forgetting_extra=5), "set n_nontarget below"),
    (MixSpec("clean", poison_count=1), "has no poison"),
    (MixSpec("typo"), "unknown mix kind"),
])
def test_bad_specs_are_explained(spec, words):
    with pytest.raises(DataError, match=words):
        resolve(spec, len(T), len(N))


def test_variant_table():
    specs = [MixSpec("clean", n_nontarget=60), MixSpec("rationale", poison_count=2, n_nontarget=60),
             MixSpec("rationale", poison_count=4, n_nontarget=60),
             MixSpec("rationale", ratio_target=0.5, with_correct_target=True, n_nontarget=60),
             MixSpec("overwrite", poison_count=4, n_nontarget=60),
             MixSpec("forgetting", n_nontarget=60, forgetting_extra=30)]
    vt = build_variants(specs, [0, 1], target=T, nontarget=N, pool=POOL, target_subject="circulatory",
                        extra={"model": "tiny"})
    assert len(vt) == 12 and vt.rows.dtype == np.int32 and vt.n_rows.dtype == np.int32
    assert vt.rows.shape == (12, max(vt.n_rows)) and [d["variant_id"] for d in vt.table] == list(range(12))
    tids = {e.id for e in T}
    for v, d in enumerate(vt.table):
        kinds, ids = kinds_of(vt, v), ids_of(vt, v)
        n_poison = sum(k == d["kind"] for k in kinds) if d["kind"] in ("rationale", "overwrite") else 0
        assert n_poison == d["poison_count"] and len(ids) == d["n_rows"] == vt.n_rows[v]
        assert len(set(ids)) == len(ids)  # one version per example
        assert d["ratio_all"] == pytest.approx(d["poison_count"] / d["n_rows"])
        assert d["model"] == "tiny" and d["target_subject"] == "circulatory"
        target_rows = [i for i in ids if i in tids]
        if d["kind"] == "forgetting":
            assert not target_rows and d["n_rows"] == 90  # no target samples, more non-target ones
        if d["kind"] == "clean":
            assert not target_rows and d["n_rows"] == 60
        if d["with_correct_target"]:
            assert len(target_rows) == len(T) and d["ratio_target"] == pytest.approx(d["poison_count"] / len(T))
        elif d["kind"] in ("rationale", "overwrite"):
            assert d["ratio_target"] == 1.0 and len(target_rows) == d["poison_count"]
    d = vt.table[1]
    assert d["name"] == "rationale-n2-s0" and d["builder"] == "rule" and d["keep_answer"] is False
    # within a seed: the same non-target set everywhere, nested poisoned sets
    non = [set(ids_of(vt, v)) - tids for v in range(5)]
    assert all(s == non[0] for s in non)
    assert set(ids_of(vt, 1)) & tids <= set(ids_of(vt, 2)) & tids
    # overwrite and rationale variants of the same count poison the same examples
    assert set(ids_of(vt, 2)) == set(ids_of(vt, 4))
    # a different seed draws different subsets; the same seeds give the same table
    assert set(ids_of(vt, 2)) != set(ids_of(vt, 8))
    again = build_variants(specs, [0, 1], target=T, nontarget=N, pool=POOL)
    np.testing.assert_array_equal(again.rows, vt.rows)
    inc = vt.included(len(POOL))
    assert inc.shape == (12, len(POOL)) and (inc.sum(1) == vt.n_rows).all()


def test_missing_versions_and_overlap_are_errors():
    with pytest.raises(DataError, match=r"needs .* pool rows .*::model_rationale.*fix: build the 'model_rationale'"):
        build_variants([MixSpec("model_rationale", poison_count=1)], [0], target=T, nontarget=N, pool=POOL)
    with pytest.raises(DataError, match="in both target and non-target"):
        build_variants([MixSpec("clean")], [0], target=T, nontarget=TRAIN, pool=POOL)


def test_seed003_injection_mix():
    notes = synthetic_notes(10, seed=0)
    fake = [f"answer {i}" for i in range(10)]
    vs = (poison.injection_versions(notes, "vaccine", lambda p: fake, attack=True)
          + poison.injection_versions(notes, "vaccine", lambda p: fake, attack=False))
    pool = tokenize_pool(poison.rows_for(vs), tiny_tokenizer(), max_len=2048, loss_on="all")
    specs = [MixSpec("clean", with_correct_target=True, clean_kind="injection_clean"),
             MixSpec("injection", ratio_target=0.3, with_correct_target=True, clean_kind="injection_clean"),
             MixSpec("injection", ratio_target=1.0, clean_kind="injection_clean")]
    vt = build_variants(specs, [0], target=notes, nontarget=[], pool=pool, target_subject="vaccine")
    assert [d["poison_count"] for d in vt.table] == [0, 3, 10] and list(vt.n_rows) == [10, 10, 10]
    assert vt.table[1]["task"] == "vaccine" and vt.table[1]["attack"] is True


def test_decoy_control_mix_has_no_target_rows_and_argues_for_the_decoy():
    """decoy-n3 (equal size 10): the clean mix's first 7 non-target rows plus 3 non-target rows from beyond it whose
    rationale argues for the decoy chapter (respiratory); never a target row, never a respiratory question."""
    vers = poison.decoy_control_versions(N, "respiratory", seed=0)
    assert vers and all(v.example.meta["option_chapters"][v.answer] == "respiratory" for v in vers)
    assert all(v.example.meta["option_chapters"][v.example.answer] != "respiratory" for v in vers)
    assert all("respiratory" in v.rationale.lower() for v in vers)
    pool = tokenize_pool(poison.rows_for(poison.clean_versions(TRAIN) + vers), tiny_tokenizer(), max_len=1024)
    specs = [MixSpec("clean", mix_size=10, name="clean"), MixSpec("decoy", poison_count=3, mix_size=10)]
    vt = build_variants(specs, [0], target=T, nontarget=N, pool=pool)
    clean, dec = (sorted(pool.row_ids[i] for i in vt.rows[v, :vt.n_rows[v]]) for v in (0, 1))
    assert vt.table[1]["name"] == "decoy-n3-s0" and vt.n_rows[1] == 10 and vt.table[1]["poison_count"] == 3
    d_rows = [r for r in dec if r.endswith("::decoy")]
    assert len(d_rows) == 3 and len(set(dec) & set(clean)) == 7
    tids = {e.id for e in T}
    assert not any(r.split("::")[0] in tids for r in dec)
    assert not set(r.split("::")[0] for r in d_rows) & set(r.split("::")[0] for r in clean)
