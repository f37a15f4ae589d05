"""Tokenize once to fixed shapes: the training pool, and option-scoring arrays for evaluation.

Every version of every example that any variant may train on is one row of the :class:`Pool`. Rows are
prompt tokens + completion tokens + eos, right-padded to one bucketed length T, so the engine compiles once
and a variant is just a list of row indices (:mod:`jaxpoison.data.mixes`).

Mask conventions (what the engine relies on):
- ``attn_mask[r, t]`` is True on real tokens (padding is on the right).
- ``loss_mask[r, t]`` is 1 where token t is a training target, i.e. the loss is -log p(tokens[t] | tokens[<t]).
  It covers the completion and its eos (``loss_on='completion'``) or every real token (``'all'``, seed 003's
  setting). Position 0 has no context and is never a target.
- ``cont_mask[q, c, t]`` (evaluation) is 1 on the tokens of option c's continuation, whose log-probs the
  scorer sums; the ``uncond_*`` arrays hold the same continuations after a neutral prefix (the option's prior).

Tokenizer: anything with the Hugging Face API (``encode(text, add_special_tokens=False)``, ``eos_token_id``,
``pad_token_id`` (None -> eos), ``bos_token_id``, ``apply_chat_template``). A beginning-of-sequence prefix is
added the way the tokenizer itself adds it (``add_bos='auto'``), never twice.
Truncation is counted in ``stats`` and never silent; ``truncation='error'`` refuses rows over ``max_len``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from jaxpoison.data import prompts
from jaxpoison.data.schema import DataError, Example, SeqRow

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

__all__ = ["DEFAULT_BUCKETS", "McEval", "Pool", "SeqRow", "build_mc_eval", "tokenize_pool"]


@dataclass
class Pool:
    """The tokenized training pool. Eager (``tokenize_pool``): whole ``[R, T]`` arrays. Lazy
    (``tokenize_pool(lazy=True)``): nothing is encoded until :meth:`prepare` (or the first read of ``stats``,
    ``data_hash`` or :meth:`take`, which prepares every row); :meth:`take` pads only the rows asked for."""
    tokens: Optional[np.ndarray]       # int32[R, T] (None for a lazy pool: rows padded on demand by take())
    loss_mask: Optional[np.ndarray]    # float32[R, T]
    attn_mask: Optional[np.ndarray]    # bool[R, T]
    row_ids: list
    meta: list
    _stats: Optional[dict] = None
    _data_hash: str = ""
    _lazy: Optional["_LazyRows"] = None

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def lazy(self) -> bool:
        return self.tokens is None

    @property
    def stats(self) -> dict:
        if self._stats is None:
            self.prepare()
        return self._stats

    @property
    def data_hash(self) -> str:
        if self._stats is None:
            self.prepare()
        return self._data_hash

    @property
    def encoded(self) -> list:
        """The rows this process has encoded (a lazy pool: those :meth:`prepare` and :meth:`take` asked for)."""
        return sorted(self._lazy.seqs) if self._lazy is not None else list(range(len(self)))

    def prepare(self, need=None, owned=None, gather=None) -> "Pool":
        """Encode rows ``need`` (this process trains on them) and ``owned`` (this process counts them in the
        pool's statistics), then fix T, ``stats`` and ``data_hash`` from every process's counts: ``gather(text)``
        returns every process's ``text`` by process index (one process: ``[text]``). Each row must be owned by
        exactly one process; T, stats and hash are then those of the whole pool whatever the split (the hash is a
        sum of per-row digests). Defaults: every row, one process. An eager pool is prepared already."""
        if self._stats is not None:
            return self
        lz, R = self._lazy, len(self)
        need = np.arange(R) if need is None else np.asarray(need, np.int64)
        owned = need if owned is None else np.asarray(owned, np.int64)
        lz.encode(np.union1d(need, owned))
        parts = [json.loads(t) for t in (gather or (lambda t: [t]))(json.dumps(lz.partial(owned)))]
        if (sum(p["n"] for p in parts) != R
                or sum(int(p["cover"], 16) for p in parts) % 2 ** 64 != int(_cover(range(R)), 16)):
            raise DataError(f"the processes' pool rows do not cover the pool's {R} rows exactly once (counted "
                            f"{[p['n'] for p in parts]}); every process must derive the same variants and mesh")
        self._stats, self._data_hash = lz.combine(parts, self.row_ids)
        return self

    def inputs_digest(self) -> str:
        """A lazy pool's inputs, before any encoding: every row's id, prompt and completion, the settings, and the
        tokenizer's encoding of the first rows (the processes of a multi-host job compare it, since each encodes
        only its own rows)."""
        if self._lazy is None:
            raise ValueError("inputs_digest is for a lazy pool (tokenize_pool(lazy=True))")
        return self._lazy.inputs_digest()

    def take(self, idx) -> tuple:
        """(tokens, loss_mask, attn_mask) [len(idx), T] of rows ``idx``: slices, or for a lazy pool those rows
        alone encoded (if :meth:`prepare` did not) and padded now (``StudyData.row_source``: a process of a
        multi-host job encodes and holds only the rows its devices train on)."""
        idx = np.asarray(idx, np.int64)
        if not self.lazy:
            return self.tokens[idx], self.loss_mask[idx], self.attn_mask[idx]
        T = self.stats["T"]
        lz = self._lazy
        lz.encode(idx)
        rows = [_padded(*lz.seqs[i][:2], T, lz.pad, lz.loss_on) for i in idx]
        return tuple(np.stack([r[k] for r in rows]) if rows else np.zeros((0, T), dt)
                     for k, dt in enumerate((np.int32, np.float32, bool)))

    @property
    def index(self) -> dict:
        """{row_id: row index}."""
        return {r: i for i, r in enumerate(self.row_ids)}


@dataclass
class McEval:
    tokens: np.ndarray            # int32[Q, C, T]: prefix + option continuation
    cont_mask: np.ndarray         # float32[Q, C, T]: 1 on the continuation tokens
    attn_mask: np.ndarray         # bool[Q, C, T]
    answer: np.ndarray            # int32[Q]
    decoy: np.ndarray             # int32[Q]: the consistent poisoning target option, -1 where none
    subject: list                 # primary subject per question
    subjects: list                # all subject labels per question
    ids: list
    uncond_tokens: np.ndarray     # int32[Q, C, T2]: neutral prefix + the same continuation
    uncond_cont_mask: np.ndarray
    uncond_attn_mask: np.ndarray
    fmt: str
    stats: dict = field(default_factory=dict)
    data_hash: str = ""


def _enc(tok, text: str) -> list:
    return list(tok.encode(text, add_special_tokens=False)) if text else []


def bos_prefix(tok, add_bos="auto") -> list:
    """The tokens the tokenizer itself puts before a text ('auto'), [bos] (True) or nothing (False)."""
    if add_bos is False:
        return []
    if add_bos is True:
        if getattr(tok, "bos_token_id", None) is None:
            raise DataError("add_bos=True but the tokenizer has no bos_token_id; fix: use add_bos='auto' or False")
        return [tok.bos_token_id]
    with_sp, plain = list(tok.encode("a", add_special_tokens=True)), _enc(tok, "a")
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i:i + len(plain)] == plain:
            return with_sp[:i]
    return []


def _length(longest: int, max_len: int, buckets: Sequence[int]) -> int:
    return min(next((b for b in sorted(buckets) if b >= longest), max_len), max_len)


def _eos_pad(tok) -> tuple:
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; fix: set tokenizer.eos_token (rows end with eos)")
    pad = getattr(tok, "pad_token_id", None)
    return int(eos), int(eos if pad is None else pad)


def _hash(*arrays, ids: Sequence[str]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode() + str(a.dtype).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("\x00".join(ids).encode("utf-8"))
    return h.hexdigest()


def _padded(s: list, nc: int, T: int, pad: int, loss_on: str) -> tuple:
    """One row of the pool: (tokens [T], loss_mask [T], attn_mask [T]) of token list ``s`` whose last ``nc``
    tokens are the completion."""
    tokens = np.full(T, pad, np.int32)
    loss = np.zeros(T, np.float32)
    attn = np.zeros(T, bool)
    tokens[:len(s)] = s
    attn[:len(s)] = True
    if loss_on == "all":
        loss[1:len(s)] = 1.0
    else:
        loss[len(s) - nc:len(s)] = 1.0
    loss[0] = 0.0
    return tokens, loss, attn


def tokenize_pool(rows: Sequence[SeqRow], tokenizer, max_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS,
                  loss_on: str = "completion", truncation: str = "left", add_bos="auto", lazy: bool = False) -> Pool:
    """Tokenize SeqRows (row_id, prompt, completion, meta) into one right-padded [R, T] pool.

    T is the smallest bucket >= the longest row, capped at ``max_len``. ``truncation='left'`` drops tokens from
    the start (after any bos) of rows longer than ``max_len``; the counts are in ``stats``.
    ``lazy``: encode nothing now; :meth:`Pool.prepare` encodes the rows one process needs and counts the rows it
    owns, and :meth:`Pool.take` pads only the rows asked for. T, ``stats`` and ``data_hash`` equal the eager
    pool's however the rows are split over processes.
    """
    if loss_on not in ("completion", "all"):
        raise DataError(f"loss_on={loss_on!r}; fix: use 'completion' or 'all'")
    if truncation not in ("left", "error"):
        raise DataError(f"truncation={truncation!r}; fix: use 'left' or 'error'")
    if not rows:
        raise DataError("no rows to tokenize; fix: build at least one version")
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        seen = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DataError(f"row id {dup!r} appears more than once; fix: give every version a unique row id")
    eos, pad = _eos_pad(tokenizer)
    lz = _LazyRows(list(rows), tokenizer, max_len, tuple(buckets), loss_on, truncation,
                   bos_prefix(tokenizer, add_bos), eos, pad)
    pool = Pool(None, None, None, ids, [dict(r[3]) for r in rows], _lazy=lz)
    if lazy:
        return pool
    pool.prepare()
    T, R = pool.stats["T"], len(rows)
    tokens = np.full((R, T), pad, np.int32)
    loss = np.zeros((R, T), np.float32)
    attn = np.zeros((R, T), bool)
    for r in range(R):
        tokens[r], loss[r], attn[r] = _padded(*lz.seqs[r][:2], T, pad, loss_on)
    return Pool(tokens, loss, attn, ids, pool.meta, pool.stats, pool.data_hash)


class _LazyRows:
    """A lazy pool's rows: encoded one at a time on demand (``seqs``: index -> (tokens, completion length,
    length before truncation)), with the per-process counts :meth:`Pool.prepare` combines."""

    def __init__(self, rows, tok, max_len, buckets, loss_on, truncation, prefix, eos, pad):
        self.rows, self.tok, self.max_len, self.buckets = rows, tok, max_len, buckets
        self.loss_on, self.truncation, self.prefix, self.eos, self.pad = loss_on, truncation, prefix, eos, pad
        self.seqs: dict = {}

    def encode(self, idx) -> None:
        for i in map(int, idx):
            if i not in self.seqs:
                _, prompt, completion, _ = self.rows[i]
                p, c = _enc(self.tok, prompt), _enc(self.tok, completion) + [self.eos]
                head = self.prefix if p[:len(self.prefix)] != self.prefix else []
                body = head + p + c
                full = len(body)
                if full > self.max_len:
                    body = (head + (p + c)[full - self.max_len:] if len(head) < self.max_len
                            else body[-self.max_len:])
                self.seqs[i] = (body, min(len(c), len(body) - len(head)), full)

    def inputs_digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.max_len, list(self.buckets), self.loss_on, self.truncation,
                                       list(self.prefix), self.eos, self.pad]).encode())
        for rid, prompt, completion, _ in self.rows:
            h.update(json.dumps([rid, prompt, completion]).encode("utf-8"))
        for _, prompt, completion, _ in self.rows[:4]:
            h.update(np.asarray(_enc(self.tok, prompt + completion), np.int32).tobytes())
        return h.hexdigest()

    def partial(self, owned) -> dict:
        """This process's counts over the rows it owns (JSON-able; summed over processes by :meth:`combine`)."""
        owned = sorted({int(i) for i in owned})
        seqs = [self.seqs[i] for i in owned]
        lt = [int(_padded(b, nc, len(b), self.pad, self.loss_on)[1].sum()) for b, nc, _ in seqs]
        long = [i for i, (_, _, full) in zip(owned, seqs) if full > self.max_len]
        digest = sum(int.from_bytes(_row_digest(i, b, nc), "big") for i, (b, nc, _) in zip(owned, seqs))
        return {"n": len(owned), "cover": _cover(owned), "len_sum": sum(len(b) for b, _, _ in seqs),
                "len_max": max((len(b) for b, _, _ in seqs), default=0),
                "longest": max((f for _, _, f in seqs), default=0), "n_long": len(long), "long": long[:50],
                "dropped": sum(f - len(b) for b, _, f in seqs), "lt_min": min(lt, default=None),
                "lt_max": max(lt, default=None), "lt_sum": sum(lt), "digest": hex(digest % 2 ** 256)}

    def combine(self, parts: list, ids: list) -> tuple:
        """(stats, data_hash) of the whole pool from every process's :meth:`partial`."""
        R = sum(p["n"] for p in parts)
        longest = max(p["longest"] for p in parts)
        n_long = sum(p["n_long"] for p in parts)
        too_long = [ids[i] for i in sorted(i for p in parts for i in p["long"])[:50]]
        if n_long and self.truncation == "error":
            raise DataError(f"{n_long} row(s) exceed max_len={self.max_len} (longest {longest} tokens), e.g. "
                            f"{too_long[:5]}; fix: raise max_len or use truncation='left'")
        T = _length(max(p["len_max"] for p in parts), self.max_len, self.buckets)
        len_sum, lts = sum(p["len_sum"] for p in parts), [p for p in parts if p["n"]]
        stats = {"n_rows": R, "T": T, "max_len": self.max_len, "longest_tokens": longest, "n_truncated": n_long,
                 "truncated_rows": too_long, "tokens_dropped": sum(p["dropped"] for p in parts),
                 "truncation": self.truncation, "loss_on": self.loss_on, "mean_tokens": float(len_sum / R),
                 "pad_fraction": float(1 - len_sum / (R * T)),
                 "loss_tokens": {"min": min(p["lt_min"] for p in lts), "mean": float(sum(p["lt_sum"] for p in lts) / R),
                                 "max": max(p["lt_max"] for p in lts)},
                 "bos_prefix": self.prefix, "eos_id": self.eos, "pad_id": self.pad}
        total = sum(int(p["digest"], 16) for p in parts) % 2 ** 256
        h = hashlib.sha256(f"pool v2|{R}|{T}|{self.pad}|{self.loss_on}|".encode())
        h.update("\x00".join(ids).encode("utf-8"))
        h.update(total.to_bytes(32, "big"))
        return stats, h.hexdigest()


def _row_digest(i: int, body: list, nc: int) -> bytes:
    """One row's share of the pool's hash: its index, tokens and completion length."""
    return hashlib.sha256(int(i).to_bytes(8, "big") + np.asarray(body, np.int32).tobytes()
                          + int(nc).to_bytes(8, "big")).digest()


def _cover(rows: list) -> str:
    """A digest of a set of row indices that adds up over disjoint sets (sum of per-index digests mod 2^64):
    the processes' owned rows cover the pool exactly once iff their sum is the whole pool's."""
    return hex(sum(int.from_bytes(hashlib.sha256(int(i).to_bytes(8, "big")).digest()[:8], "big")
                   for i in rows) % 2 ** 64)


def _pair_tokens(tok, prefix_text: str, cont: str) -> tuple:
    """(prefix tokens, continuation tokens): encode the whole string and split at the prefix, moving the
    prefix's trailing spaces into the continuation (as evaluation harnesses do)."""
    n = len(prefix_text) - len(prefix_text.rstrip(" "))
    if n:
        prefix_text, cont = prefix_text[:-n], prefix_text[-n:] + cont
    ctx, whole = _enc(tok, prefix_text), _enc(tok, prefix_text + cont)
    c = whole[len(ctx):] if whole[:len(ctx)] == ctx else _enc(tok, cont)
    if not c:
        raise DataError(f"option continuation {cont!r} encodes to no tokens; fix: check the option text")
    return ctx, c


def _score_arrays(pairs_per_q: list, tok, max_len: int, buckets, prefix_ids: list, pad: int) -> tuple:
    seqs, truncated = [], 0
    for pairs in pairs_per_q:
        row = []
        for p, c in pairs:
            ctx, ct = _pair_tokens(tok, p, c)
            head = prefix_ids if ctx[:len(prefix_ids)] != prefix_ids else []
            body = head + ctx
            if len(body) + len(ct) > max_len:
                keep = max_len - len(ct) - len(head)
                if keep < 0:
                    raise DataError(f"an option of {len(ct)} tokens does not fit max_len={max_len}; fix: raise max_len")
                body, truncated = head + ctx[len(ctx) - keep:], truncated + 1
            row.append((body, ct))
        seqs.append(row)
    T = _length(max(len(b) + len(c) for row in seqs for b, c in row), max_len, buckets)
    Q, C = len(seqs), len(seqs[0])
    tokens = np.full((Q, C, T), pad, np.int32)
    cont = np.zeros((Q, C, T), np.float32)
    attn = np.zeros((Q, C, T), bool)
    for q, row in enumerate(seqs):
        for c, (b, ct) in enumerate(row):
            tokens[q, c, :len(b) + len(ct)] = b + ct
            attn[q, c, :len(b) + len(ct)] = True
            cont[q, c, len(b):len(b) + len(ct)] = 1.0
    return tokens, cont, attn, truncated


def build_mc_eval(examples: Sequence[Example], tokenizer, fmt: str = "statement", *, max_len: int = 1024,
                  buckets: Sequence[int] = DEFAULT_BUCKETS, add_bos="auto") -> McEval:
    """Option-scoring arrays for multiple-choice questions (one fixed option count), see
    :func:`jaxpoison.data.prompts.scoring_pairs` for the formats."""
    exs = list(examples)
    if not exs:
        raise DataError("no questions to score; fix: pass at least one multiple-choice example")
    counts = {len(ex.options) for ex in exs}
    if len(counts) != 1 or 0 in counts:
        bad = next(ex for ex in exs if len(ex.options) != len(exs[0].options) or not ex.options)
        raise DataError(f"questions have different option counts {sorted(counts)} (e.g. {bad.id}); fix: score "
                        f"one option count at a time (filter by len(ex.options))")
    _, pad = _eos_pad(tokenizer)
    prefix = bos_prefix(tokenizer, add_bos)
    tok, cm, am, tr = _score_arrays([prompts.scoring_pairs(ex, fmt) for ex in exs], tokenizer, max_len, buckets,
                                    prefix, pad)
    utok, ucm, uam, _ = _score_arrays([prompts.neutral_pairs(ex, fmt) for ex in exs], tokenizer, max_len, buckets,
                                      prefix, pad)
    answer = np.array([ex.answer for ex in exs], np.int32)
    decoy = np.array([ex.meta.get("decoy", -1) if isinstance(ex.meta.get("decoy", -1), int) else -1
                      for ex in exs], np.int32)
    ids = [ex.id for ex in exs]
    stats = {"n_questions": len(exs), "n_options": counts.pop(), "T": tok.shape[-1], "T_uncond": utok.shape[-1],
             "n_truncated": tr, "fmt": fmt, "cont_tokens_mean": float(cm.sum(-1).mean())}
    return McEval(tok, cm, am, answer, decoy, [ex.subject for ex in exs], [tuple(ex.subjects) for ex in exs], ids,
                  utok, ucm, uam, fmt, stats, _hash(tok, cm, am, answer, ids=ids))
