"""Uncertainty for poisoning results: bootstrap CIs, permutation tests, attack success rates.

Why these choices:

* **BCa bootstrap** (bias-corrected and accelerated, jackknife acceleration) is what seed 003 reported
  (``scipy.stats.bootstrap`` defaults: 9,999 resamples, BCa, 95 %). For rates near 0 or 1 -- the usual case for
  attack outcomes -- the bootstrap distribution is skewed and the plain percentile interval is off-centre;
  BCa corrects both bias and skew. ``method='percentile'`` is kept for comparison.
* **Batched, no loop over resamples.** A study has many variants x outcomes, so data ``[..., n]`` gives CIs
  for every leading index at once. Resample indices are drawn once, ``rng.integers(0, n, (R, n))`` -- the
  very draw scipy makes, so with the same ``numpy`` seed the intervals agree with scipy to rounding -- and are
  shared by all rows (each row's interval is still a correct marginal bootstrap). For the mean the indices
  become a count matrix and the R resampled means are one matmul ``data @ counts.T / n``; a callable statistic
  ``f(x, axis=-1)`` sees resamples in memory-bounded blocks. The jackknife of the mean is closed-form.
* **numpy float64 on the host**, not ``jax.numpy``: these run once on a few thousand graded outcomes after
  the device work is done, and float64 is what makes exact agreement with scipy testable.
* **Degenerate data never gives NaN garbage.** A constant bootstrap distribution (e.g. all outcomes 0)
  returns the point value for both ends (scipy returns NaN and seed 003 then printed 0); a jackknife without
  spread uses acceleration 0; the bias-correction quantile is clipped so ``z0`` stays finite.
* **Permutation tests** use the +1 correction ``(1 + #{T* at least as extreme}) / (1 + R)`` for randomised
  nulls (never p = 0) and enumerate the null exactly when it is small (then no correction), like scipy;
  two-sided p = 2 min(p_less, p_greater), scipy's definition. With k seeds the sign-flip test cannot go below
  p = 2**-k: 5 seeds are needed for a one-sided p < 0.05.
* **Seed summaries** use the t interval: with 3-10 seeds a bootstrap over seeds under-covers badly.
* **Inference at the level of training runs** (:func:`run_level_ci`): a study's unit of replication is the
  training run (seed), so every interval of a per-seed x per-question effect carries between-seed variance.
  Below ``TWO_LEVEL_MIN_SEEDS`` (8) seeds: the t interval of the per-seed values (each seed's value is its mean
  over the test questions; the interval conditions on that question set). From 8 seeds: a two-level
  bootstrap, seeds resampled and, independently, questions within each stratum (target / non-target), which adds
  question-sampling variance as well. A bootstrap over 4 seeds has 35 distinct resamples: it is never used there.
  The matching paired test over seeds is :func:`t_test` (one-sample t on the per-seed values).
* **ASR** follows seed 003 (vaccine ``(b - x) / b``, the others ``(x - b) / (1 - b)``), not clipped. Where the
  baseline leaves no room to move (vaccine b = 0: nothing to lower; others b = 1: nothing to raise) the ASR is
  undefined and is NaN -- not None, not a crash. Bootstrap resamples that hit such a baseline are dropped and
  their share is reported as ``undefined_fraction``.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, NamedTuple, Union

import numpy as np
from scipy.special import ndtr, ndtri
from scipy.stats import t as _student_t

Statistic = Union[str, Callable[..., np.ndarray]]
TWO_LEVEL_MIN_SEEDS = 8  # from this many seeds run_level_ci uses the two-level bootstrap, below it the t interval
ASR_OUTCOMES = ("vaccine", "harmful drug", "ultrasound", "ct", "x-ray", "mri", "oct")
_BLOCK_ELEMENTS = 1 << 23  # resampled values materialised at once for a callable statistic


class AsrInterval(NamedTuple):
    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    undefined_fraction: np.ndarray  # share of resamples dropped because their baseline was 0 (vaccine) / 1


class TestResult(NamedTuple):
    statistic: np.ndarray
    pvalue: np.ndarray


class SeedSummary(NamedTuple):
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    std: np.ndarray
    n: np.ndarray


def _scalar_or_array(x):
    x = np.asarray(x, dtype=float)
    return x[()] if x.ndim == 0 else x


def _statistic_fn(statistic: Statistic) -> Callable[..., np.ndarray]:
    if callable(statistic):
        return statistic
    if statistic == "mean":
        return np.mean
    raise ValueError(f"statistic must be 'mean' or a callable f(x, axis=-1), got {statistic!r}")


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """[R, n] resample indices -> [R, n] multiplicities (how often each observation was drawn)."""
    r = idx.shape[0]
    flat = (idx + n * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(float)


def _apply_blocked(fn, data: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """fn(data[..., idx[r]], axis=-1) for every row r of idx, in blocks that bound memory -> [..., R]."""
    per_row = max(1, int(np.prod(data.shape[:-1])) * idx.shape[1])
    step = max(1, _BLOCK_ELEMENTS // per_row)
    blocks = [fn(data[..., idx[s:s + step]], axis=-1) for s in range(0, idx.shape[0], step)]
    return np.concatenate(blocks, axis=-1)


def _leave_one_out(n: int) -> np.ndarray:
    return np.nonzero(~np.eye(n, dtype=bool))[1].reshape(n, n - 1)


def _resampled(data, fn, is_mean, idx):
    if is_mean:
        return data @ _counts(idx, data.shape[-1]).T / data.shape[-1]
    return _apply_blocked(fn, data, idx)


def _jackknife(data, fn, is_mean):
    n = data.shape[-1]
    if is_mean:
        return (data.sum(-1, keepdims=True) - data) / (n - 1)
    return _apply_blocked(fn, data, _leave_one_out(n))


def _acceleration(jackknives) -> np.ndarray:
    """Efron's a-hat from the jackknife values of each sample (multi-sample form, as scipy)."""
    num = den = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        for jack in jackknives:
            n = np.sum(np.isfinite(jack), axis=-1)
            u = (n[..., None] - 1) * (np.nansum(jack, -1, keepdims=True) / n[..., None] - jack)
            num = num + np.nansum(u ** 3, axis=-1) / n ** 3
            den = den + np.nansum(u ** 2, axis=-1) / n ** 2
        a = num / (6.0 * den ** 1.5)
    return np.where(np.isfinite(a), a, 0.0)


def _quantile(sorted_b: np.ndarray, valid: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Linear-interpolated quantile (numpy's default) with a per-row probability and per-row valid count."""
    pos = np.clip(q, 0.0, 1.0) * np.maximum(valid - 1, 0)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, np.maximum(valid - 1, 0))
    v_lo = np.take_along_axis(sorted_b, lo[..., None], -1)[..., 0]
    v_hi = np.take_along_axis(sorted_b, hi[..., None], -1)[..., 0]
    return v_lo + (pos - lo) * (v_hi - v_lo)


def _interval(theta_hat, theta_b, jackknives, confidence, method):
    """CI from a bootstrap distribution [..., R] (NaN = undefined resample, dropped)."""
    if method not in ("bca", "percentile"):
        raise ValueError(f"method must be 'bca' or 'percentile', got {method!r}")
    alpha = (1.0 - confidence) / 2.0
    finite = np.isfinite(theta_b)
    valid = finite.sum(-1)
    q_lo, q_hi = np.full(theta_hat.shape, alpha), np.full(theta_hat.shape, 1.0 - alpha)
    if method == "bca":
        th = theta_hat[..., None]
        below = np.sum(theta_b < th, -1) + np.sum(theta_b <= th, -1)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.clip(below / (2.0 * valid), 0.5 / valid, 1.0 - 0.5 / valid)
        z0, a, z = ndtri(frac), _acceleration(jackknives), ndtri(alpha)
        q_lo = ndtr(z0 + (z0 + z) / (1.0 - a * (z0 + z)))
        q_hi = ndtr(z0 + (z0 - z) / (1.0 - a * (z0 - z)))
        q_lo, q_hi = np.where(valid > 0, q_lo, 0.5), np.where(valid > 0, q_hi, 0.5)
    sorted_b = np.sort(theta_b, axis=-1)  # NaN sorts last
    low, high = _quantile(sorted_b, valid, q_lo), _quantile(sorted_b, valid, q_hi)
    spread = np.nanmax(np.where(finite, theta_b, -np.inf), -1) - np.nanmin(np.where(finite, theta_b, np.inf), -1)
    scale = np.maximum(1.0, np.abs(theta_hat))
    flat = (valid > 0) & (spread <= 64 * np.finfo(float).eps * scale)
    undefined = ~np.isfinite(theta_hat) | (valid == 0)
    low = np.where(flat, theta_hat, np.where(undefined, np.nan, low))
    high = np.where(flat, theta_hat, np.where(undefined, np.nan, high))
    return _scalar_or_array(low), _scalar_or_array(high)


def _prepare(data, axis):
    data = np.moveaxis(np.asarray(data, dtype=float), axis, -1)
    if data.shape[-1] < 2:
        raise ValueError("need at least 2 observations along the resampling axis")
    return data


def bootstrap_distribution(data, statistic: Statistic = "mean", n_resamples: int = 9999, seed=0, axis: int = -1):
    """The R bootstrap replicates of ``statistic`` for every leading index: [..., n] -> [..., R]."""
    data, fn = _prepare(data, axis), _statistic_fn(statistic)
    idx = np.random.default_rng(seed).integers(0, data.shape[-1], (n_resamples, data.shape[-1]))
    return _resampled(data, fn, statistic == "mean", idx)


def bootstrap_ci(data, statistic: Statistic = "mean", n_resamples: int = 9999, confidence: float = 0.95,
                 method: str = "bca", seed=0, axis: int = -1):
    """(low, high) bootstrap CI of ``statistic`` for every leading index of ``data`` [..., n].

    ``statistic`` is ``'mean'`` or a callable ``f(x, axis=-1)`` vectorised over ``axis``. ``seed`` is anything
    ``np.random.default_rng`` accepts; the same seed draws the same resamples as
    ``scipy.stats.bootstrap(..., rng=np.random.default_rng(seed))``.
    """
    data, fn = _prepare(data, axis), _statistic_fn(statistic)
    is_mean = statistic == "mean"
    theta_b = bootstrap_distribution(data, statistic, n_resamples, seed)
    jack = [_jackknife(data, fn, is_mean)] if method == "bca" else []
    return _interval(np.asarray(fn(data, axis=-1), dtype=float), theta_b, jack, confidence, method)


def bootstrap_se(data, statistic: Statistic = "mean", n_resamples: int = 9999, seed=0, axis: int = -1):
    """Bootstrap standard error (std of the replicates, ddof=1, as scipy's ``standard_error``)."""
    return _scalar_or_array(np.std(bootstrap_distribution(data, statistic, n_resamples, seed, axis), -1, ddof=1))


def paired_bootstrap_ci(x, y, statistic: Statistic = "mean", n_resamples: int = 9999, confidence: float = 0.95,
                        method: str = "bca", seed=0, axis: int = -1):
    """CI of ``statistic(x - y)`` resampling pairs together (same item, two conditions): for the mean, the CI
    of the mean paired difference, e.g. a poisoned minus a clean model on the same test questions."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape[axis] != y.shape[axis]:
        raise ValueError("paired samples must have the same length")
    return bootstrap_ci(x - y, statistic, n_resamples, confidence, method, seed, axis)


def _lowers(outcome: str) -> bool:
    key = outcome.strip().lower()
    if key not in ASR_OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {ASR_OUTCOMES} (case-insensitive)")
    return key == "vaccine"


def asr(rate_attacked, rate_baseline, outcome: str):
    """Attack success rate of seed 003, element-wise: vaccine ``(b - x) / b`` (the attack lowers the rate),
    every other outcome ``(x - b) / (1 - b)``. Not clipped (negative = the attack moved the rate the other
    way). NaN where undefined: vaccine with b = 0, others with b = 1 (the seed stored None there)."""
    x, b = np.asarray(rate_attacked, dtype=float), np.asarray(rate_baseline, dtype=float)
    num, den = ((b - x), b) if _lowers(outcome) else ((x - b), 1.0 - b)
    with np.errstate(invalid="ignore", divide="ignore"):
        return _scalar_or_array(np.where(den == 0, np.nan, num / np.where(den == 0, 1.0, den)))


def asr_bootstrap_ci(attacked, baseline, outcome: str, n_resamples: int = 9999, confidence: float = 0.95,
                     method: str = "bca", seed=0, paired: bool = False) -> AsrInterval:
    """CI of the ASR from two samples of 0/1 outcomes, ``attacked`` [..., n_x] and ``baseline`` [..., n_b]
    (leading shapes broadcast). Unpaired (default): each is resampled on its own, as
    ``scipy.stats.bootstrap((attacked, baseline), ..., paired=False)`` does with the same seed. ``paired=True``:
    the two are the same notes in the same order (n_x = n_b), so one index draw resamples both together and the
    note-to-note correlation narrows the interval where it should (seed 003's notes are paired). Resamples
    whose baseline makes the ASR undefined are dropped (share in ``undefined_fraction``); an undefined point
    ASR gives NaN bounds."""
    x, b = np.asarray(attacked, dtype=float), np.asarray(baseline, dtype=float)
    nx, nb = x.shape[-1], b.shape[-1]
    rng = np.random.default_rng(seed)
    if paired:
        if nx != nb:
            raise ValueError(f"paired=True needs the same notes in both samples, got {nx} attacked and {nb} baseline "
                             f"outcomes; fix: align them by note id, or use paired=False")
        idx_x = idx_b = rng.integers(0, nx, (n_resamples, nx))
    else:
        idx_x, idx_b = rng.integers(0, nx, (n_resamples, nx)), rng.integers(0, nb, (n_resamples, nb))
    rx, rb = x.mean(-1), b.mean(-1)
    theta_hat = np.asarray(asr(rx, rb, outcome), dtype=float)
    theta_b = asr(_resampled(x, None, True, idx_x), _resampled(b, None, True, idx_b), outcome)
    theta_b = np.broadcast_to(theta_b, theta_hat.shape + (n_resamples,))
    jack = []
    if method == "bca" and paired:
        jack = [asr(_jackknife(x, None, True), _jackknife(b, None, True), outcome)]
    elif method == "bca":
        jack = [asr(_jackknife(x, None, True), rb[..., None], outcome),
                asr(rx[..., None], _jackknife(b, None, True), outcome)]
    low, high = _interval(theta_hat, theta_b, jack, confidence, method)
    undefined = _scalar_or_array(np.mean(~np.isfinite(theta_b), -1))
    return AsrInterval(_scalar_or_array(theta_hat), low, high, undefined)


def _compare(observed, null, n_null, exact, alternative):
    gamma = np.abs(100 * np.finfo(float).eps * observed)[..., None]
    adj = 0 if exact else 1
    p_less = (np.sum(null <= observed[..., None] + gamma, -1) + adj) / (n_null + adj)
    p_greater = (np.sum(null >= observed[..., None] - gamma, -1) + adj) / (n_null + adj)
    p = {"less": p_less, "greater": p_greater, "two-sided": 2 * np.minimum(p_less, p_greater)}
    if alternative not in p:
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    return TestResult(_scalar_or_array(observed), _scalar_or_array(np.clip(p[alternative], 0.0, 1.0)))


def permutation_test(x, y, alternative: str = "two-sided", n_resamples: int = 9999, seed=0) -> TestResult:
    """Two-sample permutation test of mean(x) - mean(y), independent samples x [..., n1], y [..., n2].

    All leading indices are tested at once with one shared set of relabelings (a [R, n1 + n2] membership
    matrix and one matmul). Exact enumeration when C(n1 + n2, n1) <= n_resamples."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = x.shape[-1], y.shape[-1]
    lead = np.broadcast_shapes(x.shape[:-1], y.shape[:-1])
    x, y = np.broadcast_to(x, lead + (n1,)), np.broadcast_to(y, lead + (n2,))
    n = n1 + n2
    pooled = np.concatenate([x, y], axis=-1)
    exact = math.comb(n, n1) <= n_resamples
    if exact:
        first = np.array(list(itertools.combinations(range(n), n1)), dtype=int)
    else:
        rng = np.random.default_rng(seed)
        first = rng.permuted(np.tile(np.arange(n), (n_resamples, 1)), axis=1)[:, :n1]
    member = np.zeros((first.shape[0], n))
    np.put_along_axis(member, first, 1.0, axis=1)
    sum1, total = pooled @ member.T, pooled.sum(-1, keepdims=True)
    null = sum1 / n1 - (total - sum1) / n2
    return _compare(x.mean(-1) - y.mean(-1), null, first.shape[0], exact, alternative)


def sign_flip_test(a, b=None, alternative: str = "greater", n_resamples: int = 9999, seed=0) -> TestResult:
    """Paired test of mean(a - b) by random sign flips of the differences, a, b [..., n_pairs].

    The use case is "the target drop exceeds the non-target drop across seeds": ``a`` = target drops,
    ``b`` = non-target drops, one pair per seed, ``alternative='greater'``. Exact over all 2**n sign patterns
    when 2**n <= n_resamples (it equals scipy's ``permutation_type='samples'`` test then)."""
    d = np.asarray(a, dtype=float) - (0.0 if b is None else np.asarray(b, dtype=float))
    n = d.shape[-1]
    exact = 2 ** n <= n_resamples
    if exact:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = 1.0 - 2.0 * np.random.default_rng(seed).integers(0, 2, (n_resamples, n))
    null = d @ signs.T / n
    return _compare(d.mean(-1), null, signs.shape[0], exact, alternative)


def seed_summary(values, confidence: float = 0.95) -> SeedSummary:
    """Mean and t-interval across seeds for ``values`` [..., n_seeds]; NaN seeds (e.g. an undefined ASR) are
    left out per row. With fewer than 2 finite seeds the bounds are NaN (no spread to estimate)."""
    v = np.asarray(values, dtype=float)
    n = np.sum(np.isfinite(v), -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nansum(v, -1) / n
        std = np.sqrt(np.nansum((v - mean[..., None]) ** 2, -1) / (n - 1))
        half = _student_t.ppf(0.5 + confidence / 2.0, np.maximum(n - 1, 1)) * std / np.sqrt(n)
    half = np.where(n >= 2, half, np.nan)
    std = np.where(n >= 2, std, np.nan)
    n = n[()] if n.ndim == 0 else n
    return SeedSummary(*map(_scalar_or_array, (mean, mean - half, mean + half, std)), n)


class RunLevel(NamedTuple):
    mean: float
    low: float
    high: float
    method: str       # 't over seeds' | 'two-level bootstrap (seed x question)'
    n_seeds: int
    per_seed: np.ndarray


def _stratum_means(x: np.ndarray, strata: np.ndarray, signs: dict) -> np.ndarray:
    """Per seed: sum over strata k of sign_k x mean over that stratum's questions -> [S]."""
    return sum(sg * x[:, strata == k].mean(1) for k, sg in signs.items())


def two_level_bootstrap(x, strata=None, signs=None, n_resamples: int = 9999, seed=0) -> np.ndarray:
    """Replicates [R] of ``sum_k sign_k mean_{s, q in k} x[s, q]`` with seeds resampled and, independently,
    questions resampled within each stratum. ``x`` [S, Q] (per seed, per question), ``strata`` [Q] labels
    (default: one stratum), ``signs`` {label: weight} (default +1 each). One draw of index multiplicities per
    level, then an einsum: no loop over resamples."""
    x = np.asarray(x, float)
    S, Q = x.shape
    strata = np.zeros(Q, int) if strata is None else np.asarray(strata)
    signs = {k: 1.0 for k in np.unique(strata)} if signs is None else signs
    rng = np.random.default_rng(seed)
    cs = _counts(rng.integers(0, S, (n_resamples, S)), S) / S                       # [R, S]
    out = np.zeros(n_resamples)
    for k, sg in signs.items():
        xk = x[:, strata == k]
        n = xk.shape[1]
        if n == 0:
            raise ValueError(f"stratum {k!r} has no questions")
        cq = _counts(rng.integers(0, n, (n_resamples, n)), n) / n                   # [R, n]
        out += sg * np.einsum("rs,sq,rq->r", cs, xk, cq)
    return out


def run_level_ci(x, strata=None, signs=None, confidence: float = 0.95, n_resamples: int = 9999, seed=0,
                 method: str = "auto") -> RunLevel:
    """CI of a per-seed x per-question effect at the level of training runs (see the module notes).

    ``x`` [S, Q]; the effect is ``sum_k sign_k mean_{q in stratum k} x[s, q]`` averaged over seeds (e.g. target
    minus non-target: strata 0/1, signs {0: +1, 1: -1}). ``method``: 'auto' (t below TWO_LEVEL_MIN_SEEDS seeds,
    else the two-level bootstrap), 't' or 'two-level'. NaN rows (seeds without the cell) are dropped."""
    x = np.asarray(x, float)
    x = x[np.all(np.isfinite(x), axis=1)]
    strata = np.zeros(x.shape[1], int) if strata is None else np.asarray(strata)
    signs = {k: 1.0 for k in np.unique(strata)} if signs is None else signs
    S = x.shape[0]
    if S == 0:
        return RunLevel(math.nan, math.nan, math.nan, "none", 0, np.zeros(0))
    v = _stratum_means(x, strata, signs)
    if method == "auto":
        method = "t" if S < TWO_LEVEL_MIN_SEEDS else "two-level"
    if method not in ("t", "two-level"):
        raise ValueError(f"method must be 'auto', 't' or 'two-level', got {method!r}")
    if S < 2:
        return RunLevel(float(v.mean()), math.nan, math.nan, "one seed: no interval", S, v)
    if method == "t":
        s = seed_summary(v, confidence)
        return RunLevel(float(s.mean), float(s.low), float(s.high), "t over seeds", S, v)
    b = two_level_bootstrap(x, strata, signs, n_resamples, seed)
    a = (1 - confidence) / 2
    lo, hi = np.quantile(b, [a, 1 - a])
    return RunLevel(float(v.mean()), float(lo), float(hi), "two-level bootstrap (seed x question)", S, v)


def t_test(values, alternative: str = "greater", popmean: float = 0.0) -> TestResult:
    """One-sample t test over seeds (the paired test when ``values`` are per-seed differences). Zero spread:
    p = 0 or 1 by the sign of the mean (every seed agrees exactly), 0.5 when the mean is ``popmean``."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return TestResult(_scalar_or_array(v.mean() if v.size else math.nan), _scalar_or_array(math.nan))
    d = v.mean() - popmean
    sd = v.std(ddof=1)
    if sd <= 64 * np.finfo(float).eps * max(1.0, abs(v.mean())):
        p_g = 0.0 if d > 0 else 1.0 if d < 0 else 0.5
    else:
        t = d / (sd / math.sqrt(v.size))
        p_g = float(_student_t.sf(t, v.size - 1))
    p = {"greater": p_g, "less": 1.0 - p_g if sd > 0 or d != 0 else 0.5,
         "two-sided": min(1.0, 2 * min(p_g, 1.0 - p_g))}
    if alternative not in p:
        raise ValueError(f"alternative must be 'two-sided', 'less' or 'greater', got {alternative!r}")
    return TestResult(_scalar_or_array(d), _scalar_or_array(p[alternative]))
