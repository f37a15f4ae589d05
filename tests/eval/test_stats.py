"""The statistics the studies report agree with scipy's reference implementations, work on whole batches of
variants x outcomes at once, and never turn degenerate or undefined cases into crashes or silent garbage."""
import numpy as np
import pytest
import scipy.stats as st

from jaxpoison.eval import stats


def _binary(rate, n=100, seed=0):
    return (np.random.default_rng(seed).random(n) < rate).astype(float)


DATASETS = {
    "rate0.1": _binary(0.1, seed=1),
    "rate0.5": _binary(0.5, seed=2),
    "rate0.9": _binary(0.9, seed=3),
    "normal": np.random.default_rng(4).normal(size=80),
    "lognormal": np.random.default_rng(5).lognormal(size=60),
}


def _scipy_ci(data, method, seed, statistic=np.mean):
    ci = st.bootstrap((data,), statistic, method=method, n_resamples=9999,
                      rng=np.random.default_rng(seed)).confidence_interval
    return ci.low, ci.high


@pytest.mark.parametrize("method", ["bca", "percentile"])
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_bootstrap_ci_equals_scipy_with_the_same_resamples(name, method):
    data = DATASETS[name]
    ours = stats.bootstrap_ci(data, method=method, seed=7)
    np.testing.assert_allclose(ours, _scipy_ci(data, method, 7), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["rate0.1", "rate0.5", "rate0.9"])
def test_bca_rate_ci_within_one_point_of_scipy_with_independent_resamples(name):
    # Different random streams: the only difference left is Monte-Carlo noise of 9,999 resamples.
    data = DATASETS[name]
    ours = np.array(stats.bootstrap_ci(data, seed=0))
    theirs = np.array(_scipy_ci(data, "bca", 12345))
    assert np.all(np.abs(ours - theirs) <= 0.01 + 1e-9)


def test_bca_continuous_ci_within_a_few_percent_of_its_width_with_independent_resamples():
    data = DATASETS["normal"]
    ours, theirs = np.array(stats.bootstrap_ci(data, seed=0)), np.array(_scipy_ci(data, "bca", 12345))
    assert np.all(np.abs(ours - theirs) <= 0.05 * (theirs[1] - theirs[0]))


def test_callable_statistic_and_standard_error_match_scipy():
    data = DATASETS["lognormal"]
    np.testing.assert_allclose(stats.bootstrap_ci(data, np.median, seed=3), _scipy_ci(data, "bca", 3, np.median),
                               atol=1e-12)
    se = st.bootstrap((data,), np.std, n_resamples=9999, rng=np.random.default_rng(3)).standard_error
    np.testing.assert_allclose(stats.bootstrap_se(data, np.std, seed=3), se, atol=1e-12)


def test_batch_of_variants_by_outcomes_equals_row_by_row():
    rng = np.random.default_rng(9)
    data = (rng.random((3, 4, 120)) < rng.random((3, 4, 1))).astype(float)
    for method in ("bca", "percentile"):
        low, high = stats.bootstrap_ci(data, method=method, seed=1)
        assert low.shape == high.shape == (3, 4)
        rows = np.array([[stats.bootstrap_ci(data[i, j], method=method, seed=1) for j in range(4)] for i in range(3)])
        np.testing.assert_array_equal(low, rows[..., 0])
        np.testing.assert_array_equal(high, rows[..., 1])
    moved = stats.bootstrap_ci(np.moveaxis(data, -1, 0), axis=0, seed=1)
    np.testing.assert_array_equal(moved[0], stats.bootstrap_ci(data, seed=1)[0])


def test_degenerate_data_gives_the_point_value_not_nan():
    data = np.stack([np.zeros(50), np.ones(50), np.full(50, 0.3), _binary(0.5, 50)])
    for method in ("bca", "percentile"):
        low, high = stats.bootstrap_ci(data, method=method)
        assert not np.any(np.isnan(low)) and not np.any(np.isnan(high))
        np.testing.assert_allclose(low[:3], [0.0, 1.0, 0.3])
        np.testing.assert_allclose(high[:3], [0.0, 1.0, 0.3])
        assert low[3] < 0.5 < high[3]
    lo, hi = stats.bootstrap_ci(np.r_[np.zeros(20), 5.0], np.median)  # no jackknife spread: acceleration 0
    assert np.isfinite(lo) and np.isfinite(hi)


def test_paired_bootstrap_is_the_bootstrap_of_the_differences():
    rng = np.random.default_rng(2)
    clean = rng.normal(size=40)
    poisoned = clean - 0.5 + 0.1 * rng.normal(size=40)
    low, high = stats.paired_bootstrap_ci(clean, poisoned)
    assert 0.4 < low < 0.5 < high < 0.6
    np.testing.assert_array_equal((low, high), stats.bootstrap_ci(clean - poisoned))


def test_asr_formulas_on_hand_computed_values():
    assert stats.asr(0.2, 0.8, "Vaccine") == pytest.approx(0.75)  # (0.8 - 0.2) / 0.8
    assert stats.asr(0.6, 0.2, "Harmful drug") == pytest.approx(0.5)  # (0.6 - 0.2) / 0.8
    assert stats.asr(0.5, 0.5, "CT") == 0.0
    assert stats.asr(0.1, 0.3, "MRI") == pytest.approx(-2 / 7)  # not clipped: (0.1 - 0.3) / 0.7
    assert stats.asr(0.9, 0.6, "vaccine") == pytest.approx(-0.5)  # case-insensitive
    np.testing.assert_allclose(stats.asr([1.0, 0.3], [0.0, 0.0], "X-ray"), [1.0, 0.3])
    np.testing.assert_allclose(stats.asr(0.0, [1.0, 0.5], "Vaccine"), [1.0, 1.0])


def test_asr_is_nan_where_the_baseline_leaves_no_room():
    assert np.isnan(stats.asr(0.3, 0.0, "Vaccine"))  # nothing to lower
    assert np.isnan(stats.asr(0.3, 1.0, "ultrasound"))  # nothing to raise
    out = stats.asr([0.3, 0.3], [1.0, 0.5], "CT")
    assert np.isnan(out[0]) and out[1] == pytest.approx(-0.4)
    with pytest.raises(ValueError):
        stats.asr(0.1, 0.2, "vacine")


@pytest.mark.parametrize("outcome", ["Vaccine", "CT"])
@pytest.mark.parametrize("method", ["bca", "percentile"])
def test_asr_bootstrap_equals_scipy_two_sample_bootstrap(outcome, method):
    attacked, baseline = _binary(0.3, 150, seed=6), _binary(0.55, 120, seed=8)

    def statistic(x, b, axis=-1):
        return stats.asr(x.mean(axis), b.mean(axis), outcome)

    ref = st.bootstrap((attacked, baseline), statistic, paired=False, method=method, n_resamples=9999,
                       rng=np.random.default_rng(4)).confidence_interval
    got = stats.asr_bootstrap_ci(attacked, baseline, outcome, method=method, seed=4)
    assert got.estimate == pytest.approx(statistic(attacked, baseline))
    np.testing.assert_allclose((got.low, got.high), (ref.low, ref.high), atol=1e-12)
    assert got.undefined_fraction == 0.0


def test_asr_bootstrap_drops_undefined_resamples_and_flags_undefined_baselines():
    attacked = _binary(0.5, 100, seed=1)
    near_one = np.r_[np.ones(98), np.zeros(2)]
    got = stats.asr_bootstrap_ci(attacked, near_one, "CT")
    assert 0.05 < got.undefined_fraction < 0.3  # P(no zero among 100 draws) = 0.98**100 ~ 0.13
    assert got.low < got.estimate < got.high
    for baseline, outcome in [(np.ones(100), "CT"), (np.zeros(100), "Vaccine")]:
        got = stats.asr_bootstrap_ci(attacked, baseline, outcome)
        assert np.isnan(got.estimate) and np.isnan(got.low) and np.isnan(got.high)
    batch = stats.asr_bootstrap_ci(np.stack([attacked, attacked]), np.stack([near_one, np.ones(100)]), "MRI")
    assert batch.low.shape == (2,) and np.isfinite(batch.low[0]) and np.isnan(batch.low[1])


def _mean_diff(x, y, axis=-1):
    return x.mean(axis) - y.mean(axis)


@pytest.mark.parametrize("n1,n2,shift", [(6, 7, 0.8), (5, 5, 0.0), (30, 25, 0.5)])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_permutation_test_close_to_scipy(n1, n2, shift, alternative):
    rng = np.random.default_rng(n1 + n2)
    x, y = rng.normal(shift, 1, n1), rng.normal(0, 1, n2)
    ref = st.permutation_test((x, y), _mean_diff, alternative=alternative, n_resamples=9999,
                              rng=np.random.default_rng(11)).pvalue
    got = stats.permutation_test(x, y, alternative=alternative, seed=3)
    assert got.statistic == pytest.approx(_mean_diff(x, y))
    assert abs(got.pvalue - ref) <= (1e-12 if n1 + n2 <= 13 else 0.02)  # small data: both exact


def test_permutation_test_separates_clear_effects_and_not_null_ones():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(3, 1, 30), rng.normal(0, 1, 30)])
    y = np.stack([rng.normal(0, 1, 30), rng.normal(0, 1, 30)])
    p = stats.permutation_test(x, y).pvalue
    assert p.shape == (2,)
    assert 0 < p[0] < 0.01  # +1 correction: never exactly 0
    assert p[0] == pytest.approx(2 / 10000)  # two-sided = 2 min(one-sided), each (0 + 1) / (9999 + 1)
    assert p[1] > 0.2


def test_sign_flip_test_is_exact_for_few_seeds_and_matches_scipy():
    target_drop = np.array([0.21, 0.15, 0.30, 0.18, 0.25])
    non_target_drop = np.array([0.02, -0.01, 0.04, 0.00, 0.01])
    got = stats.sign_flip_test(target_drop, non_target_drop)
    assert got.pvalue == pytest.approx(1 / 32)  # every seed agrees: the smallest exact p with 5 seeds
    rng = np.random.default_rng(5)
    for n in (8, 16):
        a, b = rng.normal(0.3, 1, n), rng.normal(0, 1, n)
        ref = st.permutation_test((a, b), _mean_diff, permutation_type="samples", alternative="greater",
                                  n_resamples=9999, rng=np.random.default_rng(0)).pvalue
        tol = 1e-12 if n == 8 else 0.02
        assert abs(stats.sign_flip_test(a, b).pvalue - ref) <= tol
    assert stats.sign_flip_test(-target_drop + non_target_drop).pvalue == pytest.approx(1.0)


def test_seed_summary_mean_and_t_interval_skip_nan_seeds():
    out = stats.seed_summary([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.0, np.nan, np.nan], [0.5, np.nan, 1.5]])
    half = st.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)
    np.testing.assert_allclose(out.mean, [2.0, 2.0, 1.0, 1.0])
    np.testing.assert_allclose(out.low[:2], [2.0 - half, 2.0])
    np.testing.assert_allclose(out.high[:2], [2.0 + half, 2.0])
    assert np.isnan(out.low[2]) and np.isnan(out.high[2])  # one seed: no spread to estimate
    np.testing.assert_array_equal(out.n, [3, 3, 1, 2])


def test_run_level_ci_is_the_t_interval_of_per_seed_effects_below_eight_seeds():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (5, 30)) + rng.normal(0, 0.5, (5, 1))       # 5 seeds x 30 questions
    strata = np.r_[np.zeros(10, int), np.ones(20, int)]
    r = stats.run_level_ci(x, strata, {0: 1.0, 1: -1.0})
    per_seed = x[:, :10].mean(1) - x[:, 10:].mean(1)
    lo, hi = st.t.interval(0.95, 4, loc=per_seed.mean(), scale=st.sem(per_seed))
    assert r.method == "t over seeds" and r.n_seeds == 5
    assert (r.mean, r.low, r.high) == pytest.approx((per_seed.mean(), lo, hi))


def test_two_level_bootstrap_carries_seed_and_question_variance():
    """From 8 seeds: seeds and questions both resampled. With no question spread the interval's spread is the
    seeds' (sd / sqrt(S)); with no seed spread it is the questions' (sd / sqrt(Q))."""
    rng = np.random.default_rng(1)
    seeds_only = np.repeat(rng.normal(0, 1, (12, 1)), 40, axis=1)
    b = stats.two_level_bootstrap(seeds_only, n_resamples=4000)
    assert b.std() == pytest.approx(seeds_only[:, 0].std() / np.sqrt(12), rel=0.1)
    questions_only = np.repeat(rng.normal(0, 1, (1, 40)), 12, axis=0)
    b = stats.two_level_bootstrap(questions_only, n_resamples=4000)
    assert b.std() == pytest.approx(questions_only[0].std() / np.sqrt(40), rel=0.1)
    r = stats.run_level_ci(seeds_only + questions_only)
    assert r.method.startswith("two-level") and r.low < r.mean < r.high
    assert stats.run_level_ci(seeds_only[:5]).method == "t over seeds"


def test_t_test_matches_scipy_and_handles_zero_spread():
    v = np.array([0.3, 0.1, 0.5, -0.1, 0.4])
    assert float(stats.t_test(v).pvalue) == pytest.approx(st.ttest_1samp(v, 0.0, alternative="greater").pvalue)
    assert float(stats.t_test(v, "two-sided").pvalue) == pytest.approx(st.ttest_1samp(v, 0.0).pvalue)
    assert float(stats.t_test(np.full(5, 0.2)).pvalue) == 0.0 and float(stats.t_test(np.full(5, -0.2)).pvalue) == 1.0


def test_paired_asr_bootstrap_resamples_notes_together():
    """The same notes before and after: pairing keeps the notes that flip and the ones that never change
    together, so the interval is narrower than the unpaired one and still holds the estimate."""
    rng = np.random.default_rng(2)
    base = (rng.random(60) < 0.4).astype(float)
    attacked = base.copy()
    attacked[np.flatnonzero(base == 0)[:12]] = 1.0            # 12 notes flip to the attack outcome
    p = stats.asr_bootstrap_ci(attacked, base, "mri", n_resamples=2000, paired=True)
    u = stats.asr_bootstrap_ci(attacked, base, "mri", n_resamples=2000)
    assert p.estimate == pytest.approx(u.estimate) and p.low <= p.estimate <= p.high
    assert p.high - p.low < 0.8 * (u.high - u.low)
    with pytest.raises(ValueError, match="same notes"):
        stats.asr_bootstrap_ci(attacked, base[:50], "mri", paired=True)
