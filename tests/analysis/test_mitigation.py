"""Seed 003's shrink is applied element-wise as written, over the whole (s_A, s_B) grid in one stacked tree;
the mitigation table weighs the attack against general capability at every point."""
import numpy as np
import pytest

from jaxpoison.analysis import mitigation


@pytest.fixture(scope="module")
def lora():
    rng = np.random.default_rng(0)
    return {"q": {"a": 0.01 * rng.normal(size=(2, 3, 8, 4)).astype(np.float32),
                  "b": 0.01 * rng.normal(size=(2, 3, 4, 6)).astype(np.float32)},
            "v": {"a": rng.normal(size=(2, 3, 8, 4)).astype(np.float32),
                  "b": rng.normal(size=(2, 3, 4, 5)).astype(np.float32)}}


def test_shrink_is_the_seed_formula():
    w = np.linspace(-3, 3, 13)
    np.testing.assert_allclose(mitigation.shrink(w, 0.16), w * (1 - 0.16 * np.exp(-np.abs(w))), rtol=1e-6)
    assert float(mitigation.shrink(0.01, 0.16) / 0.01) == pytest.approx(0.8416, abs=1e-4)  # the seed's "0.840-0.842"


def test_shrink_grid_stacks_every_grid_point_in_s_a_major_order(lora):
    out = mitigation.shrink_grid(lora, mitigation.SEED_S_A, mitigation.SEED_S_B, modules=mitigation.SEED_MODULES)
    grid = mitigation.grid_points()
    assert grid.shape == (9, 2) and grid[1].tolist() == [0.02, 0.08] and grid[3].tolist() == [0.04, 0.04]
    for m, t in out.items():
        for k, v in t.items():
            assert v.shape == (9,) + lora[m][k].shape
    for g, (s_a, s_b) in enumerate(grid):
        a, b = lora["q"]["a"], lora["q"]["b"]
        np.testing.assert_allclose(out["q"]["a"][g], a * (1 - s_a * np.exp(-np.abs(a))), rtol=1e-6)
        np.testing.assert_allclose(out["q"]["b"][g], b * (1 - s_b * np.exp(-np.abs(b))), rtol=1e-6)
        np.testing.assert_array_equal(out["v"]["a"][g], lora["v"]["a"])
    kept = mitigation.shrink_grid(lora, [0.0], [0.1], modules=["q"], repeat_rest=False)
    assert kept["v"]["a"].shape == lora["v"]["a"].shape
    np.testing.assert_array_equal(kept["q"]["a"][0], lora["q"]["a"])
    with pytest.raises(ValueError, match="not in the adapter"):
        mitigation.shrink_grid(lora, [0.1], [0.1], modules=["gate"])


def test_mitigation_table_pairs_attack_with_capability_and_marks_the_pareto_front():
    grid = mitigation.grid_points([0.0, 0.1], [0.0, 0.2])
    attack = np.array([[0.9, 0.8], [0.5, 0.6], [0.4, 0.3], [0.2, 0.1]])    # [G, seeds]
    capability = np.array([0.70, 0.60, 0.69, 0.50])                          # [G]
    rows = mitigation.mitigation_table(grid, attack, capability)
    assert [r["attack"] for r in rows] == pytest.approx([0.85, 0.55, 0.35, 0.15])
    assert rows[0]["attack_n"] == 2 and rows[0]["attack_low"] < 0.85 < rows[0]["attack_high"]
    assert rows[2]["attack_change"] == pytest.approx(-0.5) and rows[3]["capability_change"] == pytest.approx(-0.2)
    assert [r["pareto"] for r in rows] == [True, False, True, True]
    s_a, s_b, heat = mitigation.as_heatmap(rows, "attack")
    assert heat.shape == (2, 2) and heat[1, 0] == pytest.approx(0.35)
