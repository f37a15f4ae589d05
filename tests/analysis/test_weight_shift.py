"""Weight-shift features computed from r x r Grams equal the same quantities on the formed update dW = s A B;
the seed's L-inf measure equals torch's on PEFT-layout tensors; tests across seeds find a real shift and
report their group sizes."""
import csv

import numpy as np
import pytest
import scipy.stats as st
import torch

from jaxpoison.analysis import weight_shift
from jaxpoison.report import write_csv

SCALE = 2.0


def _lora(rng, v=4, layers=3, shapes=(("q", 24, 20), ("down", 40, 12)), r=5):
    lora = {m: {"a": rng.normal(size=(v, layers, i, r)).astype(np.float32),
                "b": rng.normal(size=(v, layers, r, o)).astype(np.float32)} for m, i, o in shapes}
    lora["lm_head"] = {"a": rng.normal(size=(v, 24, r)).astype(np.float32),
                       "b": rng.normal(size=(v, r, 30)).astype(np.float32)}
    return lora


def _delta(t):
    a, b = t["a"].astype(np.float64), t["b"].astype(np.float64)
    return SCALE * (a @ b)


@pytest.fixture(scope="module")
def lora():
    return _lora(np.random.default_rng(0))


REFERENCE = np.array([0, 0, 2, 2])


@pytest.fixture(scope="module")
def feats(lora):
    return weight_shift.features(lora, SCALE, reference=REFERENCE)


@pytest.mark.parametrize("module", ["q", "down", "lm_head"])
def test_gram_norms_equal_the_formed_update(lora, feats, module):
    dw = _delta(lora[module])
    sv = np.linalg.svd(dw, compute_uv=False)[..., :lora[module]["a"].shape[-1]]
    np.testing.assert_allclose(feats[f"{module}/fro"], np.linalg.norm(dw, axis=(-2, -1)), rtol=1e-4)
    np.testing.assert_allclose(feats[f"{module}/spectral"], sv[..., 0], rtol=1e-4)
    p = sv / sv.sum(-1, keepdims=True)
    np.testing.assert_allclose(feats[f"{module}/erank"], np.exp(-np.sum(p * np.log(p), -1)), rtol=1e-4)


@pytest.mark.parametrize("module", ["q", "down", "lm_head"])
def test_gram_cosine_and_shift_to_the_clean_twin_equal_the_formed_update(lora, feats, module):
    dw = _delta(lora[module])
    ref = dw[REFERENCE]
    cos = np.sum(dw * ref, (-2, -1)) / np.linalg.norm(dw, axis=(-2, -1)) / np.linalg.norm(ref, axis=(-2, -1))
    np.testing.assert_allclose(feats[f"{module}/cosine"], cos, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(feats[f"{module}/shift"], np.linalg.norm(dw - ref, axis=(-2, -1)), rtol=1e-4)
    own = REFERENCE == np.arange(len(REFERENCE))
    assert np.all(feats[f"{module}/cosine"][own] == 1.0) and np.all(feats[f"{module}/shift"][own] == 0.0)


def test_a_rank_one_update_has_effective_rank_one(lora):
    a = np.zeros_like(lora["q"]["a"])  # same shapes as the fixture: no new compile
    a[..., 0] = lora["q"]["a"][..., 0]
    out = weight_shift.features({"q": {"a": a, "b": lora["q"]["b"]}}, 1.0, reference=REFERENCE)
    np.testing.assert_allclose(out["q/erank"], 1.0, rtol=1e-5)


def test_missing_reference_gives_nan_not_garbage(lora):
    out = weight_shift.features(lora, SCALE, reference=np.array([-1, 0, 0, 0]), modules=["q"])
    assert np.isnan(out["q/cosine"][0]).all() and np.isfinite(out["q/cosine"][1:]).all()


def test_linf_columns_equal_torch_norm_on_peft_layout(lora, feats):
    pooled = weight_shift.linf_columns(lora)
    for module in ("q", "down", "lm_head"):
        a, b = lora[module]["a"], lora[module]["b"]
        if a.ndim == 3:
            a, b = a[:, None], b[:, None]
        for v in range(a.shape[0]):
            # PEFT: lora_A.weight [r, in] = a.T, lora_B.weight [out, r] = b.T
            ta = [torch.norm(torch.from_numpy(a[v, l].T.copy()), dim=0, p=float("inf")) for l in range(a.shape[1])]
            tb = [torch.norm(torch.from_numpy(b[v, l].T.copy()), dim=0, p=float("inf")) for l in range(b.shape[1])]
            np.testing.assert_array_equal(pooled[module]["a"][v], torch.cat(ta).numpy())
            np.testing.assert_array_equal(pooled[module]["b"][v], torch.cat(tb).numpy())
    np.testing.assert_allclose(feats["q/linf_a_max"], np.abs(lora["q"]["a"]).max((-2, -1)))
    np.testing.assert_allclose(feats["q/linf_b_mean"], np.abs(lora["q"]["b"]).max(-1).mean(-1), rtol=1e-6)


def test_pooled_histograms_count_every_value_of_each_group():
    values = np.random.default_rng(2).normal(size=(6, 50))
    h = weight_shift.pooled_histograms(values, np.array(["clean", "clean", "50", "50", "100", "100"]), bins=np.linspace(-9, 9, 7))
    assert {k: int(c.sum()) for k, c in h["counts"].items()} == {"clean": 100, "50": 100, "100": 100}


VARIANTS = [{"variant_id": 0, "kind": "clean", "seed": 1, "poison_count": 0},
            {"variant_id": 1, "kind": "rationale", "seed": 1, "poison_count": 8},
            {"variant_id": 2, "kind": "rationale", "seed": 2, "poison_count": 0},
            {"variant_id": 3, "kind": "clean", "seed": 2},
            {"variant_id": 4, "kind": "forgetting", "seed": 2},
            {"variant_id": 5, "kind": "overwrite", "seed": 3, "poison_count": 4}]


def test_variant_labels_derive_poisoned_and_the_clean_twin():
    lab = weight_shift.variant_labels(VARIANTS)
    assert lab["poisoned"].tolist() == [False, True, False, False, False, True]
    assert lab["clean"].tolist() == [True, False, True, True, False, False]
    assert lab["reference"].tolist() == [0, 0, 3, 3, 3, -1]
    assert lab["level"].tolist() == [0, 8, 0, 0, 0, 4]


def test_poison_levels_read_every_level_key_set_and_skip_empty_ones():
    assert weight_shift.poison_levels({"poison_count": "3", "ratio_target": 0.5, "ratio_all": ""}) == [3.0, 0.5]
    assert weight_shift.poison_levels({"poison_fraction": None, "kind": "clean"}) == []
    assert weight_shift.poison_levels({"poison_fraction": 0}) == [0.0]


def test_tidy_rows_cover_variant_module_layer_feature_and_write_as_csv(lora, feats, tmp_path):
    rows = weight_shift.feature_rows(feats, VARIANTS[:4])
    n_per_variant = sum(1 if np.ndim(v) == 1 else v.shape[1] for v in feats.values())
    assert len(rows) == 4 * n_per_variant
    assert {r["layer"] for r in rows if r["module"] == "lm_head"} == {None}
    write_csv(tmp_path / "weight_shift.csv", rows, weight_shift.ROW_FIELDS)
    back = list(csv.DictReader(open(tmp_path / "weight_shift.csv")))
    assert len(back) == len(rows) and back[0].keys() == set(weight_shift.ROW_FIELDS)
    hit = next(r for r in back if r["module"] == "q" and r["feature"] == "fro" and r["layer"] == "2"
               and r["variant_id"] == "1")
    assert float(hit["value"]) == pytest.approx(feats["q/fro"][1, 2], rel=1e-6)


def test_group_tests_find_a_shift_in_the_shifted_layer_only():
    rng = np.random.default_rng(3)
    n_clean, n_pois = 8, 10
    value = rng.normal(size=(n_clean + n_pois, 4))
    value[n_clean:, 2] += 3.0
    poisoned = np.r_[np.zeros(n_clean, bool), np.ones(n_pois, bool)]
    rows = weight_shift.group_tests({"q/fro": value, "q/cosine": value}, poisoned, n_resamples=999)
    assert [r["layer"] for r in rows] == [0, 1, 2, 3] and {r["feature"] for r in rows} == {"fro"}
    assert all(r["n_clean"] == n_clean and r["n_poisoned"] == n_pois for r in rows)
    assert rows[2]["perm_p"] < 0.01 and rows[2]["ks_p"] < 0.01 and rows[2]["cliffs_delta"] > 0.8
    assert min(r["perm_p"] for r in rows[:2] + rows[3:]) > 0.01
    x, y = value[n_clean:, 2], value[:n_clean, 2]
    assert rows[2]["ks_p"] == pytest.approx(st.ks_2samp(x, y).pvalue)
    pooled_sd = np.sqrt(((n_pois - 1) * x.var(ddof=1) + (n_clean - 1) * y.var(ddof=1)) / (n_pois + n_clean - 2))
    assert rows[2]["cohens_d"] == pytest.approx((x.mean() - y.mean()) / pooled_sd)
    brute = np.mean([np.sign(xi - yj) for xi in x for yj in y])
    assert rows[2]["cliffs_delta"] == pytest.approx(brute)


def test_benjamini_hochberg_equals_scipy():
    p = np.random.default_rng(4).uniform(size=40) ** 2
    np.testing.assert_allclose(weight_shift.benjamini_hochberg(p), st.false_discovery_control(p), rtol=1e-12)
