"""How far poisoning moves a LoRA adapter: per-layer features of many variants at once, and tests across seeds.

Input is the engine's stacked tree ``lora = {module: {"a": [V, L, in, r], "b": [V, L, r, out]}}`` (``lm_head``:
``[V, in, r]`` / ``[V, r, out]``, no layer axis), applied as ``x @ a @ b`` with scale ``s``, so the update is
``dW = s * a @ b`` ([in, out]; PEFT's ``s * lora_B.weight @ lora_A.weight`` is its transpose, same norms).

Why these choices:

* **The seed's measure, exactly.** Seed 003 drew histograms of ``torch.norm(W, dim=0, p=inf)`` of PEFT's
  ``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r]: per input dimension the max over the rank rows (A),
  per rank component the max over outputs (B), pooled over layers. In our layout both are ``max |x|`` over the
  last axis (:func:`linf_columns`). It is on the raw factors, without ``s``, like the seed.
* **Norms of dW without forming dW.** dW is [in, out] per variant and layer -- 64 x 30 x 7 of them would be
  tens of GB -- but every unitarily invariant quantity lives in r x r Gram matrices: ``|AB|_F^2 =
  tr((A^T A)(B B^T))`` and the squared singular values of AB are the eigenvalues of
  ``G_A^{1/2} (B B^T) G_A^{1/2}`` (symmetric, so ``eigh``). Cost is O((in + out) r^2), vmapped over V and L
  by batched einsums under one ``jit`` per module.
* **Effective rank** is Roy & Vetterli's ``exp(entropy(sigma / sum sigma))``: 1 for a rank-1 update, r for a
  flat spectrum. A poison that writes one direction should lower it.
* **Reference features** compare a variant with the clean variant of the same seed (same init, same clean
  data order): cosine ``<dW_1, dW_2> / (|dW_1| |dW_2|)`` with ``<A_1 B_1, A_2 B_2> = sum((A_1^T A_2) * (B_1
  B_2^T))``, and the shift ``|dW - dW_ref|_F``. They need the clean twin, which a real detector never has, and
  they are constant on the clean group, so they describe poisoning but are left out of tests and the detector.
* The big products (Grams, L-inf) run in float32 under ``jit``; the r x r algebra in float64 on the host. The
  Gram route squares the condition number, which only blurs singular values below ~3e-4 of the largest
  (irrelevant to the norms, negligible in the entropy), and puts a floor of ~3e-4 |dW| under ``shift``.
* Tests across seeds run on the host in float64: KS (scipy), the batched permutation test of
  :mod:`jaxpoison.eval.stats`, Cohen's d and Cliff's delta, with n per group and Benjamini-Hochberg q-values
  because a study tests hundreds of (feature, layer) cells.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.stats import ks_2samp

from jaxpoison.eval.stats import permutation_test

INTRINSIC_FEATURES = ("fro", "spectral", "erank", "linf_a_mean", "linf_a_max", "linf_b_mean", "linf_b_max")
REFERENCE_FEATURES = ("cosine", "shift")
NON_POISON_KINDS = ("clean", "forgetting")
LEVEL_KEYS = ("poison_count", "poison_fraction", "ratio_target", "ratio_all")


# ----------------------------------------------------------------------------------------------- variant table

def _num(x) -> float:
    return np.nan if x is None or x == "" else float(x)


def poison_levels(variant: dict) -> list:
    """The variant's poison levels as floats: each of :data:`LEVEL_KEYS` it sets (present and not empty)."""
    return [_num(variant.get(k)) for k in LEVEL_KEYS if variant.get(k) not in (None, "")]


def is_poisoned(variant: dict) -> bool:
    """A variant is poisoned unless its kind is clean / the forgetting control or its poison level is 0."""
    if variant.get("kind", "clean") in NON_POISON_KINDS:
        return False
    levels = poison_levels(variant)
    return not levels or any(v > 0 for v in levels)


def variant_labels(variants: Sequence[dict], level_key: Optional[str] = None) -> dict:
    """Arrays [V] from the variant table: ``poisoned``, ``clean`` (no poison and not the forgetting control),
    ``seed``, ``level`` (poison count or fraction, 0 for non-poisoned variants) and ``reference`` (index of
    the clean variant with the same seed, kind 'clean' preferred over a poison kind at level 0; -1 if none)."""
    key = level_key or next((k for k in LEVEL_KEYS if any(k in v for v in variants)), None)
    poisoned = np.array([is_poisoned(v) for v in variants], bool)
    kinds = [v.get("kind", "clean") for v in variants]
    clean = np.array([k != "forgetting" and not p for k, p in zip(kinds, poisoned)], bool)
    seed = np.array([v.get("seed", 0) for v in variants])
    level = np.array([_num(v.get(key)) if key and p else 0.0 for v, p in zip(variants, poisoned)])
    first_clean = {}
    for i in sorted(np.flatnonzero(clean), key=lambda i: kinds[i] != "clean"):
        first_clean.setdefault(seed[i].item(), i)
    reference = np.array([first_clean.get(s.item(), -1) for s in seed], int)
    return {"poisoned": poisoned, "clean": clean, "seed": seed, "level": level, "reference": reference,
            "level_key": key}


# ---------------------------------------------------------------------------------------------- the seed's L-inf

def _layered(t: dict) -> tuple:
    """(a, b) with a layer axis: lm_head's [V, in, r] becomes [V, 1, in, r]."""
    a, b = jnp.asarray(t["a"]), jnp.asarray(t["b"])
    return (a[:, None], b[:, None]) if a.ndim == 3 else (a, b)


def linf_columns(lora: dict, modules: Optional[Sequence[str]] = None) -> dict:
    """Seed 003's ``torch.norm(W, dim=0, p=inf)`` of PEFT lora_A [r, in] and lora_B [out, r], pooled over
    layers: ``{module: {"a": [V, L * in], "b": [V, L * r]}}`` (numpy)."""
    out = {}
    for m in modules or lora:
        a, b = _layered(lora[m])
        out[m] = {"a": np.asarray(_max_abs(a)).reshape(a.shape[0], -1),
                  "b": np.asarray(_max_abs(b)).reshape(b.shape[0], -1)}
    return out


@jax.jit
def _max_abs(x):
    return jnp.max(jnp.abs(x), -1)


def pooled_histograms(values: np.ndarray, groups: np.ndarray, bins=40) -> dict:
    """Counts of pooled per-variant values [V, n] per group label, on common bins (the seed's histogram data).

    ``bins`` is a count (edges span the 0.5-99.5 % range of all values, so one outlier cannot flatten the
    plot) or explicit edges. Returns ``{"edges": [B + 1], "counts": {label: [B]}}``."""
    values, groups = np.asarray(values, float), np.asarray(groups)
    if np.ndim(bins) == 0:
        lo, hi = np.quantile(values, [0.005, 0.995])
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-12, int(bins) + 1)
    counts = {g.item() if hasattr(g, "item") else g: np.histogram(values[groups == g].ravel(), bins)[0]
              for g in np.unique(groups)}
    return {"edges": np.asarray(bins), "counts": counts}


# ------------------------------------------------------------------------------------------ Gram-based features

@partial(jax.jit, static_argnames=("transpose", "with_reference"))
def _factor_stats(x, ref, transpose: bool, with_reference: bool):
    """Device half for one factor [V, L, n, r] (a) or [V, L, r, n] (b, ``transpose``): its r x r Gram, the
    cross-Gram with the reference variant's factor, and the mean / max of the L-inf column norms."""
    xt = jnp.swapaxes(x, -1, -2)
    left, right = (x, xt) if transpose else (xt, x)
    linf = jnp.max(jnp.abs(x), -1)
    out = {"gram": left @ right, "linf_mean": linf.mean(-1), "linf_max": linf.max(-1)}
    if with_reference:
        other = xt[ref] if transpose else x[ref]
        out["cross"] = left @ other
    return out


def _singular_values_sq(ga: np.ndarray, gb: np.ndarray) -> np.ndarray:
    """Squared singular values of A @ B from G_A = A^T A and G_B = B B^T (float64, descending)."""
    lam, u = np.linalg.eigh(ga)
    root = np.sqrt(np.clip(lam, 0.0, None))
    m = root[..., :, None] * (np.swapaxes(u, -1, -2) @ gb @ u) * root[..., None, :]
    return np.clip(np.linalg.eigvalsh(0.5 * (m + np.swapaxes(m, -1, -2))), 0.0, None)[..., ::-1]


def _module_features(a, b, ref: Optional[np.ndarray], scale: float) -> dict:
    """Features of one module, a [V, L, in, r], b [V, L, r, out] -> dict of [V, L]. The O((in + out) r^2)
    Gram products run jitted on device (one compile per factor shape, shared across modules); the r x r
    algebra runs in float64 on the host, where batched LAPACK on 16 x 16 matrices is faster than compiling it."""
    with_ref = ref is not None
    idx = jnp.asarray(np.maximum(ref, 0) if with_ref else np.zeros(1, int), jnp.int32)
    sa = jax.tree.map(lambda x: np.asarray(x, np.float64), _factor_stats(a, idx, False, with_ref))
    sb = jax.tree.map(lambda x: np.asarray(x, np.float64), _factor_stats(b, idx, True, with_ref))
    ga, gb = sa["gram"], sb["gram"]
    sv = np.sqrt(_singular_values_sq(ga, gb))
    total = sv.sum(-1, keepdims=True)
    p = np.divide(sv, total, out=np.zeros_like(sv), where=total > 0)
    entropy = -np.sum(p * np.log(np.where(p > 0, p, 1.0)), -1)
    fro2 = np.clip(np.sum(ga * gb, (-2, -1)), 0.0, None)
    s = abs(float(scale))
    out = {"fro": s * np.sqrt(fro2), "spectral": s * sv[..., 0], "erank": np.exp(entropy),
           "linf_a_mean": sa["linf_mean"], "linf_a_max": sa["linf_max"],
           "linf_b_mean": sb["linf_mean"], "linf_b_max": sb["linf_max"]}
    if with_ref:
        cross = np.sum(sa["cross"] * sb["cross"], (-2, -1))
        fro2_ref = fro2[np.maximum(ref, 0)]
        valid = (np.asarray(ref) >= 0)[:, None]
        denom = np.sqrt(fro2 * fro2_ref)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["cosine"] = np.where(valid & (denom > 0), cross / denom, np.nan)
        out["shift"] = np.where(valid, s * np.sqrt(np.clip(fro2 + fro2_ref - 2 * cross, 0.0, None)), np.nan)
        own = (np.asarray(ref) == np.arange(len(ref)))[:, None]  # exact, not float32 Gram rounding
        out["cosine"] = np.where(own & (denom > 0), 1.0, out["cosine"])
        out["shift"] = np.where(own, 0.0, out["shift"])
    return out


def features(lora: dict, scale: float, reference: Optional[np.ndarray] = None,
             modules: Optional[Sequence[str]] = None) -> dict:
    """Per-layer features of every variant: ``{"<module>/<feature>": [V, L]}`` (``lm_head``: [V]).

    ``reference`` [V] (from :func:`variant_labels`) adds ``cosine`` and ``shift`` to the same-seed clean
    variant; -1 gives NaN. Features: Frobenius and spectral norm of dW = s A B, effective rank, and the mean and
    max over columns of the seed's L-inf column norms of A and B."""
    out = {}
    ref = None if reference is None else np.asarray(reference, int)
    for m in modules or lora:
        a, b = _layered(lora[m])
        if ref is not None and ref.shape != (a.shape[0],):
            raise ValueError(f"reference has shape {ref.shape} for {a.shape[0]} variants")
        for name, value in _module_features(a, b, ref, scale).items():
            out[f"{m}/{name}"] = value[:, 0] if np.ndim(lora[m]["a"]) == 3 else value
    return out


# ----------------------------------------------------------------------------------------------- tidy table

ROW_FIELDS = ("variant_id", "kind", "seed", "poison_count", "poison_fraction", "poisoned", "module", "layer",
              "feature", "value")


def feature_rows(feats: dict, variants: Sequence[dict]) -> list:
    """Tidy rows, one per variant x module x layer x feature (``layer`` None for ``lm_head``)."""
    poisoned = [is_poisoned(v) for v in variants]
    rows = []
    for key, value in feats.items():
        module, feature = key.split("/", 1)
        value = np.asarray(value)
        layers = [None] if value.ndim == 1 else range(value.shape[1])
        for i, v in enumerate(variants):
            base = {"variant_id": v.get("variant_id", i), "kind": v.get("kind"), "seed": v.get("seed"),
                    "poison_count": v.get("poison_count"),
                    "poison_fraction": v.get("poison_fraction", v.get("ratio_target")), "poisoned": poisoned[i],
                    "module": module, "feature": feature}
            for layer in layers:
                x = value[i] if layer is None else value[i, layer]
                rows.append({**base, "layer": layer, "value": float(x)})
    return rows


# ------------------------------------------------------------------------------------------ tests across seeds

def cohens_d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(mean x - mean y) / pooled SD (ddof 1) along the last axis; NaN without spread."""
    n1, n2 = x.shape[-1], y.shape[-1]
    pooled = ((n1 - 1) * x.var(-1, ddof=1) + (n2 - 1) * y.var(-1, ddof=1)) / (n1 + n2 - 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pooled > 0, (x.mean(-1) - y.mean(-1)) / np.sqrt(pooled), np.nan)


def cliffs_delta(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(x > y) - P(x < y) along the last axis: rank-based, robust to the skew of norms."""
    return np.mean(np.sign(x[..., :, None] - y[..., None, :]), (-2, -1))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH q-values (step-up, monotone), NaN p-values ignored and left NaN."""
    p = np.asarray(p, float)
    q = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size:
        order = ok[np.argsort(p[ok])]
        ranked = p[order] * ok.size / np.arange(1, ok.size + 1)
        q[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return q


def group_tests(feats: dict, poisoned: np.ndarray, include: Optional[np.ndarray] = None,
                exclude: Sequence[str] = REFERENCE_FEATURES, n_resamples: int = 9999, seed=0) -> list:
    """Poisoned vs non-poisoned adapters, per feature and layer: KS, permutation test on the mean, Cohen's d,
    Cliff's delta (positive = larger when poisoned), n per group and BH q-values of the permutation p.

    ``include`` [V] restricts the variants (e.g. clean + one poison level). Cells with NaN get NaN results."""
    poisoned = np.asarray(poisoned, bool)
    include = np.ones_like(poisoned) if include is None else np.asarray(include, bool)
    pos, neg = include & poisoned, include & ~poisoned
    if pos.sum() < 2 or neg.sum() < 2:
        raise ValueError(f"need >= 2 adapters per group, got {pos.sum()} poisoned and {neg.sum()} clean")
    cells, values = [], []
    for key, value in feats.items():
        module, feature = key.split("/", 1)
        if feature in exclude:
            continue
        value = np.asarray(value, float)
        value = value[:, None] if value.ndim == 1 else value
        for layer in range(value.shape[1]):
            cells.append((module, feature, None if np.ndim(feats[key]) == 1 else layer))
            values.append(value[:, layer])
    data = np.stack(values)
    x, y = data[:, pos], data[:, neg]
    finite = np.isfinite(data[:, include]).all(-1)
    x0, y0 = np.where(finite[:, None], x, 0.0), np.where(finite[:, None], y, 0.0)
    perm = permutation_test(x0, y0, n_resamples=n_resamples, seed=seed)
    ks_all = ks_2samp(x0, y0, axis=-1)          # vectorised over cells (about 6x faster than a loop)
    ks = [type("KS", (), {"statistic": s_, "pvalue": p_})() if f else None
          for s_, p_, f in zip(np.atleast_1d(ks_all.statistic), np.atleast_1d(ks_all.pvalue), finite)]
    d, delta = cohens_d(x0, y0), cliffs_delta(x0, y0)
    nan = lambda v: np.where(finite, v, np.nan)  # noqa: E731
    perm_p = nan(perm.pvalue)
    q = benjamini_hochberg(perm_p)
    rows = []
    for i, (module, feature, layer) in enumerate(cells):
        rows.append({"module": module, "feature": feature, "layer": layer, "n_clean": int(neg.sum()),
                     "n_poisoned": int(pos.sum()), "mean_clean": float(nan(y0.mean(-1))[i]),
                     "mean_poisoned": float(nan(x0.mean(-1))[i]),
                     "ks_stat": float(ks[i].statistic) if ks[i] else np.nan,
                     "ks_p": float(ks[i].pvalue) if ks[i] else np.nan, "perm_p": float(perm_p[i]),
                     "perm_q": float(q[i]), "cohens_d": float(nan(d)[i]), "cliffs_delta": float(nan(delta)[i])})
    return rows
