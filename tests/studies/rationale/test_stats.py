"""The seed-000 findings follow from the primary metric, checked on hand-made option scores: a pure shift towards
the decoy chapter is not a target-specific effect, a real target-specific drop is one, and a drop that only some
seeds show is inconclusive. No model runs here."""
import numpy as np
import pytest

from jaxpoison.studies.rationale.results import results_rows
from jaxpoison.studies.rationale.stats import calibrated_margins, summarize

SEEDS = (0, 1, 2, 3, 4)
N_T, N_N, C = 32, 64, 4
EV = {"method": "calibrated", "alpha": 0.05, "n_resamples": 999, "stealth_margin": 0.05, "min_effect": 0.5}


def _table(cells):
    """Cells (name, kind, count[, rows]): 20-row mixes unless rows says otherwise (a forgetting control at k x the
    steps trains on k x 20 clean rows)."""
    table = []
    for s in SEEDS:
        for name, kind, count, *rows in cells:
            n = rows[0] if rows else 20
            table.append({"variant_id": len(table), "name": f"{name}-s{s}", "spec_name": name, "kind": kind,
                          "seed": s, "poison_count": count, "ratio_target": 1.0 if count else 0.0,
                          "ratio_all": count / n, "with_correct_target": False, "n_correct_target": 0,
                          "n_nontarget": n - count, "forgetting_extra": n - 20 if kind == "forgetting" else 0,
                          "n_rows": n, "mix_size": 20 if n == 20 else None, "ratio_all_cell": False})
    return table


def _scores(cells, effect):
    """Base option scores (answer 0, decoy 1), the same score pattern on target and non-target questions (each
    non-target question repeats a target one, twice), so only what ``effect`` does differs between the groups.
    ``effect(name, seed, sum, uncond, is_target)`` edits a variant's [Q, C] arrays in place."""
    rng = np.random.default_rng(0)
    pat = rng.normal(0, 1.0, (N_T, C))
    pat[:, 0] += 1.5                                     # the base mostly right
    base = np.concatenate([pat, pat, pat])               # Q = 32 target + 64 non-target
    prior = np.tile(rng.normal(-8, 0.5, (1, C)), (base.shape[0], 1))
    is_target = np.arange(base.shape[0]) < N_T
    table = _table(cells)
    sums, unconds = [base + prior], [prior.copy()]
    for t in table:
        noise = np.random.default_rng(100 + t["variant_id"]).normal(0, 0.05, base.shape)
        s, u = base + prior + noise, prior.copy()
        effect(t["spec_name"], t["seed"], s, u, is_target)
        sums.append(s)
        unconds.append(u)
    Q = base.shape[0]
    scores = {"sum": np.stack(sums), "uncond": np.stack(unconds), "n_tokens": np.ones((Q, C), np.int32),
              "answer": np.zeros(Q, np.int32), "decoy": np.ones(Q, np.int32), "is_target": is_target,
              "group": np.where(is_target, "target", "nontarget"),
              "subject": np.where(is_target, "circulatory", "digestive")}
    return table, scores


def _findings(cells, effect):
    table, scores = _scores(cells, effect)
    rows, zero = results_rows(table, scores, EV["method"])
    for r in rows:
        r["final_loss"] = float("nan")
    s = summarize(table, scores, rows, zero, {"eval": EV})
    return {f["finding"]: f for f in s["findings"]}, {c["spec_name"]: c for c in s["cells"]}


CELLS = [("clean", "clean", 0), ("rationale-n8", "rationale", 8)]


def test_a_pure_shift_towards_the_decoy_everywhere_does_not_show():
    def decoy_prior(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[:, 1] += 2.0                               # the decoy likelier on every question, target or not
    f, cells = _findings(CELLS, decoy_prior)
    assert cells["rationale-n8"]["target_margin_drop"]["low"] > 0.3      # target questions do suffer ...
    assert cells["rationale-n8"]["target_acc"]["mean"] < cells["clean"]["target_acc"]["mean"]
    assert f[1]["status"] == "does not show"                              # ... but not specifically


def test_a_target_specific_drop_on_every_seed_shows():
    def specific(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[is_target, 0] -= 3.0
    f, cells = _findings(CELLS + [("decoy-n8", "decoy", 8)], specific)
    assert cells["rationale-n8"]["primary"]["low"] > 2.0 and cells["rationale-n8"]["primary"]["p_seed"] < 0.01
    assert f[1]["status"] == "shows"


def test_a_drop_that_only_some_seeds_show_is_inconclusive():
    def some(name, seed, s, u, is_target):
        if name == "rationale-n8" and seed in (0, 1):
            s[is_target, 0] -= 3.0
    f, cells = _findings(CELLS, some)
    p = cells["rationale-n8"]["primary"]
    assert p["mean"] > 0.5 and p["low"] < 0 and p["method"] == "t over seeds"
    assert f[1]["status"] == "inconclusive"


def test_a_decoy_control_that_hurts_target_questions_as_much_caps_finding_1():
    """Target-specific against the comparison questions, but the control (no target rows at all) does the same
    to target questions: a label prior is not ruled out."""
    def both(name, seed, s, u, is_target):
        if name in ("rationale-n8", "decoy-n8"):
            s[is_target, 0] -= 3.0
    f, _ = _findings(CELLS + [("decoy-n8", "decoy", 8)], both)
    assert f[1]["status"] == "partly" and "label prior" in f[1]["evidence"]


def test_overwrite_without_effect_beside_a_rationale_effect_shows_finding_3():
    def eff(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[is_target, 0] -= 3.0
    f, _ = _findings(CELLS + [("overwrite-n8", "overwrite", 8)], eff)
    assert f[3]["status"] == "shows" and "paired by seed" in f[3]["evidence"]


def test_count_threshold_is_an_interval_between_a_ruled_out_and_a_reached_count():
    def dose(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[is_target, 0] -= 3.0
    cells = CELLS + [("rationale-n2", "rationale", 2)]
    table, scores = _scores(cells, dose)
    rows, zero = results_rows(table, scores, EV["method"])
    s = summarize(table, scores, rows, zero, {"eval": EV})
    th = s["thresholds"]["count"]["rationale"]
    assert th["ruled_out_at"] == 2 and th["reached_at"] == 8 and th["estimate"] == "in (2, 8]"


def test_calibrated_margin_is_right_minus_best_wrong_after_removing_priors():
    scores = {"sum": np.array([[[1.0, 3.0, 2.0]]]), "uncond": np.array([[[-1.0, 2.0, 0.0]]]),
              "answer": np.array([0])}
    assert calibrated_margins(scores)[0, 0] == pytest.approx(2.0 - 2.0)      # 2 - max(1, 2)


def test_a_consistent_but_small_drop_is_only_partly_shown():
    """Every seed drops the target margin by 0.2 nats: an effect exists (CI above 0), but one of min_effect
    (0.5 nats) is ruled out, so finding 1 says 'partly', not 'shows'."""
    def small(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[is_target, 0] -= 0.2
    f, cells = _findings(CELLS, small)
    assert cells["rationale-n8"]["primary"]["verdict"] == "small"
    assert f[1]["status"] == "partly" and "small" in f[1]["evidence"]


FORGET4 = ("forgetting-steps4x", "forgetting", 0, 80)      # clean non-target SFT on 80 rows: 4 x the steps


def test_a_poison_beside_a_forgetting_control_that_hurts_everything_less_shows_finding_5():
    """Forgetting at 4x the steps lowers every margin a little (target and comparison alike); the poison lowers
    target margins a lot: more efficient (more target margin lost with a quarter of the steps) and more confined."""
    def eff(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[is_target, 0] -= 3.0
        if name == "forgetting-steps4x":
            s[:, 0] -= 0.5
    f, cells = _findings(CELLS + [FORGET4], eff)
    assert cells["forgetting-steps4x"]["target_margin_drop"]["low"] > 0.3       # it does forget ...
    assert abs(cells["forgetting-steps4x"]["primary"]["mean"]) < 0.1             # ... everywhere
    assert f[5]["status"] == "shows" and f[5]["cell"] == "forgetting-steps4x"
    assert "4x the rows and optimiser steps" in f[5]["evidence"] and "target accuracy drop" in f[5]["evidence"]


def test_a_forgetting_control_that_does_what_the_poison_does_fails_finding_5():
    def same(name, seed, s, u, is_target):
        if name in ("rationale-n8", "forgetting-steps4x"):
            s[is_target, 0] -= 3.0
    f, _ = _findings(CELLS + [FORGET4], same)
    assert f[5]["status"] == "does not show"


def test_a_same_size_forgetting_swap_does_not_test_finding_5():
    def eff(name, seed, s, u, is_target):
        if name == "rationale-n8":
            s[is_target, 0] -= 3.0
    f, _ = _findings(CELLS + [("forgetting-x8", "forgetting", 0)], eff)
    assert f[5]["status"] == "not tested" and "swap rows within the same steps" in f[5]["evidence"]
    f, _ = _findings(CELLS, eff)
    assert f[5]["status"] == "not tested" and "grid.forgetting_steps" in f[5]["evidence"]
