"""Training mixes and the variant table: which version of which example each variant trains on.

A :class:`MixSpec` says how much poison a variant gets, by count or by ratio, and whether correct
target-subject samples stay in:

- ``poison_count``: the number of poisoned target-subject samples;
- ``ratio_target``: poisoned / target-subject samples in the mix (needs ``with_correct_target=True`` below 1:
  the other target samples are the correct ones);
- ``ratio_all``: poisoned / all samples in the mix;
- ``with_correct_target``: keep the remaining target-subject examples (up to ``n_target``) with their clean
  version (seed 000 finding 2: correct same-subject samples mitigate the attack);
- ``kind='forgetting'``: the catastrophic-forgetting control, no target samples at all and
  ``forgetting_extra`` more non-target samples;
- ``kind='clean'``: no poison (with or without the correct target samples);
- ``kind='decoy'``: the label-prior control, ``poison_count`` *non-target* samples whose rationale argues for the
  decoy chapter (:func:`jaxpoison.data.poison.decoy_control_versions`), taken from beyond the clean mix in the
  seed's non-target order (the first ones that have a 'decoy' row in the pool), no target samples;
- ``mix_size``: equal-size mixes (below).

Subsets come from one seeded permutation per seed, so within a seed the poisoned sets are nested (the first
4 of the 8) and every variant shares the same non-target samples: variants differ only in the poison.
:func:`build_variants` crosses specs with seeds and returns the engine's :class:`VariantTable`.

Equal-size mixes (``mix_size=N``). By default the poisoned, correct-target and forgetting-extra samples are
*added* to the ``n_nontarget`` clean non-target samples, so a poisoned mix has more rows than the clean one and
trains for more optimiser steps (an adapter's weight shift then counts steps as well as poison). With
``mix_size=N`` every such mix has exactly N rows: the additions *replace* the last non-target samples of the
seed's non-target order, i.e. a mix with p poisoned and c correct target samples keeps the first N - p - c
non-target samples of the N that the seed's clean mix (``mix_size=N``, no target samples) trains on; the
forgetting control keeps the first N - x and swaps in x non-target samples from beyond the clean mix's N.
So every mix of a seed shares as many rows with that seed's clean mix as its additions allow (a paired
comparison), the poison count keeps its meaning (poisoned samples in the mix), and the ratios keep theirs
(``ratio_all`` = poisoned / all rows = p / N; ``ratio_target`` = p / (p + c)): a ``ratio_all`` spec asks for
round(ratio_all * N) poisoned samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from jaxpoison.data.poison import CLEAN_KINDS, POISON_KINDS, forgetting_control, row_id, seeded_order
from jaxpoison.data.schema import DataError, Example

MIX_KINDS = ("clean", "forgetting") + POISON_KINDS
RECORDED_PARAMS = ("builder", "method", "keep_answer", "builder_seed", "use_decoy", "generator", "template", "task",
                   "attack", "prompt_version", "file")


@dataclass(frozen=True)
class MixSpec:
    kind: str = "clean"                   # 'clean' | 'forgetting' | a poison kind ('rationale', 'overwrite', ...)
    poison_count: Optional[int] = None
    ratio_target: Optional[float] = None
    ratio_all: Optional[float] = None
    with_correct_target: bool = False
    n_target: Optional[int] = None        # target-subject examples the mix draws on (default: all)
    n_nontarget: Optional[int] = None     # clean non-target samples (default: all)
    forgetting_extra: int = 0             # 'forgetting' only: extra non-target samples
    mix_size: Optional[int] = None        # equal-size mixes: exactly this many rows, non-target samples fill up
    clean_kind: str = "clean"             # version of the correct samples ('injection_clean' for seed 003)
    name: str = ""


@dataclass(frozen=True)
class Resolved:
    poison_count: int
    n_correct_target: int
    n_nontarget: int


def _target_ratio_count(spec, mt: int) -> int:
    """Poisoned samples of a ``ratio_target`` mix: round(ratio x target samples), checked."""
    r = spec.ratio_target
    if not 0 <= r <= 1:
        raise DataError(f"ratio_target={r}; fix: use a value in [0, 1]")
    if not spec.with_correct_target and r != 1:
        raise DataError(f"ratio_target={r} < 1 needs correct target samples (otherwise every target sample in "
                        f"the mix is poisoned); fix: with_correct_target=True, or use poison_count")
    return round(r * mt)


def resolve(spec: MixSpec, n_target: int, n_nontarget: int) -> Resolved:
    """Counts of poisoned, correct-target and non-target samples for one spec; errors say how to fix it."""
    if spec.kind not in MIX_KINDS:
        raise DataError(f"unknown mix kind {spec.kind!r}; fix: use one of {MIX_KINDS}")
    if spec.clean_kind not in CLEAN_KINDS:
        raise DataError(f"clean_kind {spec.clean_kind!r}; fix: use one of {CLEAN_KINDS}")
    mt = n_target if spec.n_target is None else spec.n_target
    if spec.mix_size is not None:
        return _resolve_sized(spec, mt, n_target, n_nontarget)
    n = n_nontarget if spec.n_nontarget is None else spec.n_nontarget
    if mt > n_target or n > n_nontarget:
        raise DataError(f"mix {spec} asks for {mt} target / {n} non-target examples but {n_target} / {n_nontarget} "
                        f"exist; fix: lower n_target / n_nontarget")
    given = [x is not None for x in (spec.poison_count, spec.ratio_target, spec.ratio_all)]
    if spec.kind == "decoy":
        return _resolve_decoy(spec, n, n_nontarget, n)
    if spec.kind in ("clean", "forgetting"):
        if any(given):
            raise DataError(f"a {spec.kind!r} mix has no poison; fix: drop poison_count/ratio_* from {spec}")
        if spec.kind == "forgetting":
            if spec.with_correct_target:
                raise DataError("the forgetting control has no target samples; fix: with_correct_target=False")
            if n + spec.forgetting_extra > n_nontarget:
                raise DataError(f"the forgetting control needs {n} + {spec.forgetting_extra} non-target examples but "
                                f"{n_nontarget} exist; fix: set n_nontarget below {n_nontarget} on every spec so "
                                f"extra samples remain, or lower forgetting_extra")
            return Resolved(0, 0, n + spec.forgetting_extra)
        return Resolved(0, mt if spec.with_correct_target else 0, n)
    if sum(given) != 1:
        raise DataError(f"a poisoned mix needs exactly one of poison_count, ratio_target, ratio_all; fix: set one "
                        f"in {spec}")
    if spec.poison_count is not None:
        p = spec.poison_count
    elif spec.ratio_target is not None:
        p = _target_ratio_count(spec, mt)
    else:
        r = spec.ratio_all
        if not 0 <= r < 1:
            raise DataError(f"ratio_all={r}; fix: use a value in [0, 1)")
        p = round(r * (mt + n)) if spec.with_correct_target else round(r * n / (1 - r))
    if not 0 <= p <= mt:
        raise DataError(f"mix {spec} needs {p} poisoned target samples but only {mt} target examples are available; "
                        f"fix: lower the count/ratio, or use more target examples")
    return Resolved(p, mt - p if spec.with_correct_target else 0, n)


def _resolve_sized(spec: MixSpec, mt: int, n_target: int, n_nontarget: int) -> Resolved:
    """:func:`resolve` for an equal-size mix: poisoned, correct-target and forgetting-extra samples replace
    non-target ones so that the mix has exactly ``spec.mix_size`` rows."""
    N = spec.mix_size
    if not isinstance(N, int) or N < 1:
        raise DataError(f"mix_size={N!r}; fix: a positive number of rows")
    if spec.n_nontarget is not None:
        raise DataError(f"mix {spec} sets both mix_size and n_nontarget; fix: drop n_nontarget (with mix_size the "
                        f"non-target samples fill the mix up to mix_size)")
    if mt > n_target:
        raise DataError(f"mix {spec} asks for {mt} target examples but {n_target} exist; fix: lower n_target")
    given = [x is not None for x in (spec.poison_count, spec.ratio_target, spec.ratio_all)]
    if spec.kind == "decoy":
        return _resolve_decoy(spec, N - (spec.poison_count or 0), n_nontarget, N)
    if spec.kind == "forgetting":
        x = spec.forgetting_extra
        if any(given) or spec.with_correct_target:
            raise DataError(f"the forgetting control has no target samples; fix: drop poison_count/ratio_*/"
                            f"with_correct_target from {spec}")
        if not 0 <= x <= N or N + x > n_nontarget:
            raise DataError(f"the equal-size forgetting control swaps {x} of the clean mix's {N} non-target samples "
                            f"for {x} others, so it needs 0 <= forgetting_extra <= mix_size and {N + x} non-target "
                            f"examples ({n_nontarget} exist); fix: lower forgetting_extra or mix_size")
        return Resolved(0, 0, N)
    if spec.kind == "clean":
        if any(given):
            raise DataError(f"a 'clean' mix has no poison; fix: drop poison_count/ratio_* from {spec}")
        p, c = 0, (mt if spec.with_correct_target else 0)
    else:
        if sum(given) != 1:
            raise DataError(f"a poisoned mix needs exactly one of poison_count, ratio_target, ratio_all; fix: set "
                            f"one in {spec}")
        if spec.ratio_all is not None:
            if not 0 <= spec.ratio_all <= 1:
                raise DataError(f"ratio_all={spec.ratio_all}; fix: use a value in [0, 1]")
            p = round(spec.ratio_all * N)
        elif spec.ratio_target is not None:
            p = _target_ratio_count(spec, mt)
        else:
            p = spec.poison_count
        if not 0 <= p <= mt:
            raise DataError(f"mix {spec} needs {p} poisoned target samples but only {mt} target examples are "
                            f"available; fix: lower the count/ratio, or use more target examples")
        c = mt - p if spec.with_correct_target else 0
    n = N - p - c
    if n < 0:
        raise DataError(f"mix {spec} has {p} poisoned + {c} correct target samples, more than mix_size={N} rows; "
                        f"fix: raise mix_size to at least {p + c} or lower the count")
    if n > n_nontarget:
        raise DataError(f"mix {spec} needs {n} non-target examples to fill mix_size={N} but {n_nontarget} exist; "
                        f"fix: lower mix_size")
    return Resolved(p, c, n)


def _resolve_decoy(spec: MixSpec, n: int, n_nontarget: int, clean_n: int) -> Resolved:
    """The decoy control: p non-target samples arguing for the decoy chapter beside n clean ones (the clean mix
    has ``clean_n``; the decoy samples come from beyond it)."""
    p = spec.poison_count
    if not isinstance(p, int) or p < 1 or spec.ratio_target is not None or spec.ratio_all is not None \
            or spec.with_correct_target:
        raise DataError(f"the decoy control needs a positive poison_count and no ratio or correct target samples; "
                        f"got {spec}")
    if n < 0 or clean_n + p > n_nontarget:
        raise DataError(f"the decoy control needs {clean_n} clean + {p} more non-target examples ({n_nontarget} "
                        f"exist, and p <= mix size); fix: lower the count or the mix size")
    return Resolved(p, 0, n)


def decoy_control_ids(nontarget_ids: Sequence[str], seed: int, clean_n: int, count: int, eligible) -> list:
    """The non-target examples a seed's decoy control argues for: the first ``count`` ids in ``eligible`` beyond
    the clean mix's ``clean_n`` in the seed's non-target order (the order :func:`forgetting_control` uses)."""
    order = seeded_order(list(nontarget_ids), seed, "nontarget")
    return [i for i in order[clean_n:] if i in eligible][:count]


@dataclass
class VariantTable:
    rows: np.ndarray          # int32[V, M]: pool row indices of each variant's training set, padded with 0
    n_rows: np.ndarray        # int32[V]: how many entries of rows[v] are valid
    table: list               # one dict per variant (the results CSV columns)
    row_ids: list = field(default_factory=list)  # per variant, the pool row ids (for inspection)

    def __len__(self) -> int:
        return len(self.table)

    def included(self, n_pool: int) -> np.ndarray:
        """bool[V, R]: whether pool row r is in variant v's training set."""
        out = np.zeros((len(self.table), n_pool), bool)
        for v, (r, n) in enumerate(zip(self.rows, self.n_rows)):
            out[v, r[:n]] = True
        return out


def _params_of(pool_meta: list, index: dict, rid: Optional[str]) -> dict:
    if rid is None:
        return {}
    m = pool_meta[index[rid]]
    return {k: m[k] for k in RECORDED_PARAMS if k in m}


def build_variants(specs: Sequence[MixSpec], seeds: Sequence[int], *, target: Sequence[Example],
                   nontarget: Sequence[Example], pool, target_subject: str = "", extra: Optional[dict] = None
                   ) -> VariantTable:
    """Cross mix specs with seeds into a VariantTable over ``pool`` (a :class:`jaxpoison.data.pool.Pool`).

    Row ids are ``'<example id>::<kind>'``: poisoned samples use the spec's kind, correct target samples its
    ``clean_kind``, non-target samples 'clean'. A missing row is an error naming it and the builder to run.
    """
    if not specs or not seeds:
        raise DataError("no mix specs or no seeds; fix: give at least one of each")
    tids, nids = [ex.id for ex in target], [ex.id for ex in nontarget]
    if set(tids) & set(nids):
        raise DataError(f"examples in both target and non-target sets, e.g. {sorted(set(tids) & set(nids))[:3]}; "
                        f"fix: split with jaxpoison.data.subjects.select_subject")
    index, rows, table, all_ids = pool.index, [], [], []
    for seed in seeds:
        t_order = seeded_order(tids, seed, "target")
        for spec in specs:
            res = resolve(spec, len(tids), len(nids))
            if spec.kind == "forgetting" and spec.mix_size is not None:
                # equal size: the clean mix's first N - x non-target samples + x from beyond its N
                n, x = res.n_nontarget, spec.forgetting_extra
                order = [ex.id for ex in forgetting_control(nontarget, n_base=n, n_extra=x, seed=seed)]
                non = order[:n - x] + order[n:]
            else:
                base_n = res.n_nontarget - (spec.forgetting_extra if spec.kind == "forgetting" else 0)
                non = [ex.id for ex in forgetting_control(nontarget, n_base=base_n,
                                                            n_extra=res.n_nontarget - base_n, seed=seed)]
            poisoned = t_order[:res.poison_count]
            correct = t_order[res.poison_count:res.poison_count + res.n_correct_target]
            if spec.kind == "decoy":
                clean_n = spec.mix_size if spec.mix_size is not None else res.n_nontarget
                has = {i for i in nids if row_id(i, "decoy") in index}
                poisoned = decoy_control_ids(nids, seed, clean_n, res.poison_count, has)
                if len(poisoned) < res.poison_count:
                    raise DataError(f"variant {spec.name or 'decoy'} (seed {seed}) needs {res.poison_count} decoy "
                                    f"rows beyond the clean mix but the pool has {len(poisoned)}; fix: build the "
                                    f"'decoy' versions (jaxpoison.data.poison.decoy_control_versions) of those "
                                    f"non-target examples")
            ids = ([row_id(i, spec.kind) for i in poisoned] + [row_id(i, spec.clean_kind) for i in correct]
                   + [row_id(i, "clean") for i in non])
            missing = [i for i in ids if i not in index]
            if missing:
                kind = missing[0].rsplit("::", 1)[1]
                raise DataError(f"variant {spec.name or spec.kind} (seed {seed}) needs {len(missing)} pool rows that "
                                f"are not in the pool, e.g. {missing[:3]}; fix: build the {kind!r} versions of those "
                                f"examples (jaxpoison.data.poison) and tokenize them into the pool")
            if not ids:
                raise DataError(f"variant {spec} (seed {seed}) has no training samples; fix: include some examples")
            total = len(ids)
            p, c = res.poison_count, res.n_correct_target
            name = spec.name or (f"{spec.kind}" + (f"-n{p}" if spec.kind in POISON_KINDS else "")
                                 + ("-ct" if spec.with_correct_target else "")
                                 + (f"-x{spec.forgetting_extra}" if spec.kind == "forgetting" else ""))
            table.append({
                "variant_id": len(table), "name": f"{name}-s{seed}", "spec_name": name, "kind": spec.kind,
                "seed": seed, "target_subject": target_subject, "poison_count": p, "n_correct_target": c,
                "n_nontarget": res.n_nontarget, "forgetting_extra": spec.forgetting_extra, "n_rows": total,
                "mix_size": spec.mix_size,
                "ratio_target": p / (p + c) if p + c and spec.kind != "decoy" else 0.0, "ratio_all": p / total,
                "with_correct_target": spec.with_correct_target, "clean_kind": spec.clean_kind,
                "requested_count": spec.poison_count, "requested_ratio_target": spec.ratio_target,
                "requested_ratio_all": spec.ratio_all,
                **_params_of(pool.meta, index, row_id(poisoned[0], spec.kind) if poisoned else None),
                **(extra or {})})
            rows.append(sorted(index[i] for i in ids))
            all_ids.append([pool.row_ids[i] for i in rows[-1]])
    M = max(len(r) for r in rows)
    arr = np.zeros((len(rows), M), np.int32)
    for v, r in enumerate(rows):
        arr[v, :len(r)] = r
    return VariantTable(arr, np.array([len(r) for r in rows], np.int32), table, all_ids)

