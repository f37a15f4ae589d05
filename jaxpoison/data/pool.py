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
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from jaxpoison.data import prompts
from jaxpoison.data.schema import DataError, Example, SeqRow

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

__all__ = ["DEFAULT_BUCKETS", "McEval", "Pool", "SeqRow", "build_mc_eval", "tokenize_pool"]


@dataclass
class Pool:
    tokens: Optional[np.ndarray]       # int32[R, T] (None for a lazy pool: rows padded on demand by take())
    loss_mask: Optional[np.ndarray]    # float32[R, T]
    attn_mask: Optional[np.ndarray]    # bool[R, T]
    row_ids: list
    meta: list
    stats: dict
    data_hash: str
    _seqs: Optional[list] = None       # a lazy pool's (token list, loss positions) per row
    _fill: tuple = ()                  # a lazy pool's (T, pad id, loss_on)

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def lazy(self) -> bool:
        return self.tokens is None

    def take(self, idx) -> tuple:
        """(tokens, loss_mask, attn_mask) [len(idx), T] of rows ``idx``: slices, or for a lazy pool
        (``tokenize_pool(lazy=True)``) those rows alone padded now (``StudyData.row_source``: a process of a
        multi-host job holds only the rows its devices train on)."""
        idx = np.asarray(idx, np.int64)
        if not self.lazy:
            return self.tokens[idx], self.loss_mask[idx], self.attn_mask[idx]
        T, pad, loss_on = self._fill
        rows = [_padded(*self._seqs[i], T, pad, loss_on) for i in idx]
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
    ``lazy``: keep each row's tokens and pad only the rows asked for (:meth:`Pool.take`); T, ``stats`` and
    ``data_hash`` are those of the whole pool, computed row by row without the [R, T] arrays.
    """
    if loss_on not in ("completion", "all"):
        raise DataError(f"loss_on={loss_on!r}; fix: use 'completion' or 'all'")
    if truncation not in ("left", "error"):
        raise DataError(f"truncation={truncation!r}; fix: use 'left' or 'error'")
    if not rows:
        raise DataError("no rows to tokenize; fix: build at least one version")
    ids = [r[0] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"row id {dup!r} appears more than once; fix: give every version a unique row id")
    eos, pad = _eos_pad(tokenizer)
    prefix = bos_prefix(tokenizer, add_bos)
    seqs, n_loss, too_long, dropped, longest = [], [], [], 0, 0
    for rid, prompt, completion, _ in rows:
        p, c = _enc(tokenizer, prompt), _enc(tokenizer, completion) + [eos]
        head = prefix if p[:len(prefix)] != prefix else []
        body = head + p + c
        longest = max(longest, len(body))
        if len(body) > max_len:
            too_long.append(rid)
            dropped += len(body) - max_len
            body = head + (p + c)[len(body) - max_len:] if len(head) < max_len else body[-max_len:]
        nc = min(len(c), len(body) - len(head))
        seqs.append(body)
        n_loss.append(nc)
    if too_long and truncation == "error":
        raise DataError(f"{len(too_long)} row(s) exceed max_len={max_len} (longest {longest} tokens), e.g. "
                        f"{too_long[:5]}; fix: raise max_len or use truncation='left'")
    T = _length(max(len(s) for s in seqs), max_len, buckets)
    R = len(seqs)
    if lazy:
        return _lazy_pool(rows, ids, seqs, n_loss, T, pad, loss_on, longest, too_long, dropped, truncation,
                          max_len, prefix, eos)
    tokens = np.full((R, T), pad, np.int32)
    loss = np.zeros((R, T), np.float32)
    attn = np.zeros((R, T), bool)
    for r, (s, nc) in enumerate(zip(seqs, n_loss)):
        tokens[r, :len(s)] = s
        attn[r, :len(s)] = True
        if loss_on == "all":
            loss[r, 1:len(s)] = 1.0
        else:
            loss[r, len(s) - nc:len(s)] = 1.0
    loss[:, 0] = 0.0
    lens, lt = attn.sum(1), loss.sum(1)
    stats = {"n_rows": R, "T": T, "max_len": max_len, "longest_tokens": longest, "n_truncated": len(too_long),
             "truncated_rows": too_long[:50], "tokens_dropped": dropped, "truncation": truncation, "loss_on": loss_on,
             "mean_tokens": float(lens.mean()), "pad_fraction": float(1 - attn.mean()),
             "loss_tokens": {"min": int(lt.min()), "mean": float(lt.mean()), "max": int(lt.max())},
             "bos_prefix": prefix, "eos_id": eos, "pad_id": pad}
    return Pool(tokens, loss, attn, ids, [dict(r[3]) for r in rows], stats, _hash(tokens, loss, attn, ids=ids))


def _lazy_pool(rows, ids, seqs, n_loss, T, pad, loss_on, longest, too_long, dropped, truncation, max_len, prefix,
               eos) -> Pool:
    """tokenize_pool's Pool without its [R, T] arrays: the same T, stats and data_hash (the hash streamed row by
    row, as _hash reads the whole arrays)."""
    R = len(seqs)
    lens = np.array([len(s) for s in seqs])
    lt = np.array([_padded(s, nc, T, pad, loss_on)[1].sum() for s, nc in zip(seqs, n_loss)])
    h = hashlib.sha256()
    for k, dt in enumerate((np.int32, np.float32, bool)):
        h.update(str((R, T)).encode() + str(np.dtype(dt)).encode())
        for s, nc in zip(seqs, n_loss):
            h.update(_padded(s, nc, T, pad, loss_on)[k].tobytes())
    h.update("\x00".join(ids).encode("utf-8"))
    stats = {"n_rows": R, "T": T, "max_len": max_len, "longest_tokens": longest, "n_truncated": len(too_long),
             "truncated_rows": too_long[:50], "tokens_dropped": dropped, "truncation": truncation, "loss_on": loss_on,
             "mean_tokens": float(lens.mean()), "pad_fraction": float(1 - lens.sum() / (R * T)),
             "loss_tokens": {"min": int(lt.min()), "mean": float(lt.mean()), "max": int(lt.max())},
             "bos_prefix": prefix, "eos_id": eos, "pad_id": pad}
    return Pool(None, None, None, ids, [dict(r[3]) for r in rows], stats, h.hexdigest(),
                [(s, nc) for s, nc in zip(seqs, n_loss)], (T, pad, loss_on))


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
