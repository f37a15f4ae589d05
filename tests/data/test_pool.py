"""Tokenized pool and scoring arrays: fixed shapes, masks on exactly the right tokens, truncation counted."""
import numpy as np
import pytest
from data_helpers import tiny_tokenizer

from jaxpoison.data import poison
from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
from jaxpoison.data.pool import build_mc_eval, tokenize_pool
from jaxpoison.data.schema import DataError, Example, SeqRow

TOK = tiny_tokenizer()


def enc(t):
    return TOK.encode(t, add_special_tokens=False)


ROWS = [SeqRow("a", "Question: fever?\n", "Answer: (A) yes", {"k": 1}),
        SeqRow("b", "Q: which system?\n", "Reasoning: the heart and blood vessels.\nAnswer: (B) circulatory", {}),
        SeqRow("c", "", "The condition is classified", {})]


def test_pool_shapes_and_masks_cover_exactly_the_completion():
    pool = tokenize_pool(ROWS, TOK, max_len=512, buckets=(16, 32, 64, 128))
    longest = max(len(enc(p) + enc(c)) + 1 for _, p, c, _ in ROWS)
    assert pool.tokens.dtype == np.int32 and pool.loss_mask.dtype == np.float32 and pool.attn_mask.dtype == bool
    assert pool.tokens.shape == (3, next(b for b in (16, 32, 64, 128) if b >= longest))
    eos = TOK.eos_token_id
    for r, (_, p, c, _) in enumerate(ROWS):
        seq = enc(p) + enc(c) + [eos]
        n = len(seq)
        assert pool.tokens[r, :n].tolist() == seq and pool.attn_mask[r].sum() == n
        assert (pool.tokens[r, n:] == eos).all()  # pad_token_id is None -> eos pads
        expect = np.zeros(pool.tokens.shape[1], np.float32)
        expect[len(enc(p)):n] = 1.0
        expect[0] = 0.0  # position 0 is never a target
        np.testing.assert_array_equal(pool.loss_mask[r], expect)
    assert pool.row_ids == ["a", "b", "c"] and pool.meta[0] == {"k": 1} and pool.index["b"] == 1
    n_loss = [len(enc(c)) + 1 - (0 if p else 1) for _, p, c, _ in ROWS]
    assert pool.stats["n_truncated"] == 0 and pool.loss_mask.sum(1).tolist() == n_loss
    assert pool.stats["loss_tokens"]["min"] == min(n_loss) and pool.stats["loss_tokens"]["max"] == max(n_loss)


def test_loss_on_all_tokens():
    pool = tokenize_pool(ROWS, TOK, max_len=512, loss_on="all")
    np.testing.assert_array_equal(pool.loss_mask[:, 1:] > 0, pool.attn_mask[:, 1:])
    assert (pool.loss_mask[:, 0] == 0).all()


def test_truncation_is_counted_or_refused():
    n_b = len(enc(ROWS[1].prompt) + enc(ROWS[1].completion)) + 1
    pool = tokenize_pool(ROWS, TOK, max_len=20, buckets=(16, 64))
    assert pool.tokens.shape[1] == 20  # the bucket is capped at max_len
    assert pool.stats["n_truncated"] >= 1 and "b" in pool.stats["truncated_rows"]
    assert pool.stats["tokens_dropped"] >= n_b - 20
    full = enc(ROWS[1].prompt) + enc(ROWS[1].completion) + [TOK.eos_token_id]
    assert pool.tokens[1].tolist() == full[-20:]  # left truncation keeps the end
    assert pool.loss_mask[1, 1:].sum() == min(19, len(enc(ROWS[1].completion)) + 1)
    with pytest.raises(DataError, match=r"exceed max_len=20 .*\[.*'b'.*fix: raise max_len or use truncation='left'"):
        tokenize_pool(ROWS, TOK, max_len=20, truncation="error")


def test_bos_added_once_the_way_the_tokenizer_adds_it():
    tok = tiny_tokenizer(with_bos=True)
    bos = tok.convert_tokens_to_ids("<s>")
    pool = tokenize_pool(ROWS[:1], tok, max_len=64)
    assert pool.tokens[0, 0] == bos and pool.tokens[0, 1] != bos and pool.stats["bos_prefix"] == [bos]
    pre = tokenize_pool([SeqRow("x", "<s>Question: fever?\n", "yes", {})], tok, max_len=64)
    assert pre.tokens[0, 0] == bos and pre.tokens[0, 1] != bos
    assert tokenize_pool(ROWS[:1], tok, max_len=64, add_bos=False).tokens[0, 0] != bos


def test_data_hash_is_stable_and_sensitive():
    a, b = tokenize_pool(ROWS, TOK, 512), tokenize_pool(ROWS, TOK, 512)
    assert a.data_hash == b.data_hash and len(a.data_hash) == 64
    assert tokenize_pool(ROWS[::-1], TOK, 512).data_hash != a.data_hash
    assert tokenize_pool(ROWS, TOK, 512, loss_on="all").data_hash != a.data_hash


def test_pool_input_errors():
    with pytest.raises(DataError, match="appears more than once"):
        tokenize_pool(ROWS + ROWS[:1], TOK, 64)
    with pytest.raises(DataError, match="no rows"):
        tokenize_pool([], TOK, 64)


def test_mc_eval_arrays():
    test = build_icd10_set(IcdConfig(seed=2, n_train_per_chapter=2, n_test_per_chapter=2, n_keyword_train=2,
                                     n_keyword_test=2))["test"]
    ev = build_mc_eval(test, TOK, "statement", buckets=(32, 64, 128))
    Q = len(test)
    assert ev.tokens.shape[:2] == (Q, 4) and ev.cont_mask.shape == ev.tokens.shape == ev.attn_mask.shape
    assert ev.uncond_tokens.shape[:2] == (Q, 4) and ev.answer.tolist() == [e.answer for e in test]
    assert ev.subject == [e.subjects[0] for e in test] and ev.ids == [e.id for e in test]
    assert (ev.decoy >= 0).sum() == sum(e.meta["decoy"] >= 0 for e in test)
    for q in (0, Q - 1):
        for c in range(4):
            toks = ev.tokens[q, c][ev.cont_mask[q, c] > 0]
            assert TOK.decode(toks) == test[q].options[c] + "'"
            assert TOK.decode(ev.tokens[q, c][ev.attn_mask[q, c]]) == (
                test[q].meta["statement_prefix"] + test[q].options[c] + "'")
            assert TOK.decode(ev.uncond_tokens[q, c][ev.uncond_attn_mask[q, c]]).startswith(
                "The condition is classified in the chapter '")
            # the continuation is the last real tokens of each row
            n = ev.attn_mask[q, c].sum()
            assert ev.cont_mask[q, c, n - 1] == 1 and ev.cont_mask[q, c, n:].sum() == 0
    bench = build_mc_eval(test, TOK, "benchmark")
    assert (bench.cont_mask.sum(-1) == 1).all()


def test_mc_eval_mismatched_option_counts():
    exs = [Example("1", "q?", ("a", "b", "c", "d"), 0), Example("2", "q?", ("a", "b", "c"), 0)]
    with pytest.raises(DataError, match="different option counts .*fix: score one option count at a time"):
        build_mc_eval(exs, TOK)


def test_icd10_versions_fit_a_small_bucket():
    train = build_icd10_set(IcdConfig(seed=0, n_train_per_chapter=2, n_test_per_chapter=1, n_keyword_train=2,
                                      n_keyword_test=1))["train"]
    rows = poison.rows_for(poison.clean_versions(train) + poison.overwrite_versions(train, seed=0))
    pool = tokenize_pool(rows, TOK, max_len=1024)
    assert pool.tokens.shape == (2 * len(train), pool.stats["T"]) and pool.stats["n_truncated"] == 0
    over = [i for i, m in enumerate(pool.meta) if m["kind"] == "overwrite"]
    clean = [i for i, m in enumerate(pool.meta) if m["kind"] == "clean"]
    assert pool.loss_mask[over].sum(1).max() < pool.loss_mask[clean].sum(1).min()


@pytest.mark.parametrize("kw", [dict(max_len=512, buckets=(16, 32, 64, 128)),
                                dict(max_len=12, buckets=(8, 16), loss_on="all"),
                                dict(max_len=12, buckets=(8, 16))])
def test_lazy_pool_pads_only_the_rows_asked_for_and_equals_the_whole_pool(kw):
    """tokenize_pool(lazy=True) holds no [R, T] arrays, yet its T, stats and data_hash are the eager pool's (so a
    run folder resumes either way), and take(idx) gives exactly the eager rows (truncated rows included)."""
    whole, lazy = tokenize_pool(ROWS, TOK, **kw), tokenize_pool(ROWS, TOK, lazy=True, **kw)
    assert lazy.lazy and lazy.tokens is None and not whole.lazy
    assert lazy.data_hash == whole.data_hash and lazy.stats == whole.stats
    for idx in ([2, 0], [1], []):
        for a, b in zip(lazy.take(idx), whole.take(idx)):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


MORE = ROWS + [SeqRow(f"x{i}", f"Question {i}: which chapter holds code {i}?\n", "Answer: (C) " + "word " * i, {})
               for i in range(9)]


def _split_prepare(need, owned, kw):
    """One lazy pool per emulated process (a thread each), prepared with its own rows; ``gather`` exchanges
    their counts as a multi-host job's key-value store does. Returns (pools, the exception each raised)."""
    import threading
    P = len(need)
    pools = [tokenize_pool(MORE, TOK, lazy=True, **kw) for _ in range(P)]
    box, barrier, errors = [None] * P, threading.Barrier(P), [None] * P

    def run(i):
        def gather(text):
            box[i] = text
            barrier.wait(timeout=30)
            return list(box)
        try:
            pools[i].prepare(need[i], owned[i], gather)
        except Exception as e:      # noqa: BLE001 - handed to the test
            errors[i] = e
    threads = [threading.Thread(target=run, args=(i,)) for i in range(P)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return pools, errors


@pytest.mark.parametrize("kw", [dict(max_len=512, buckets=(16, 32, 64, 128)),
                                dict(max_len=14, buckets=(8, 16), loss_on="all")])
def test_a_pool_split_over_processes_encodes_only_their_rows_yet_has_the_whole_pools_statistics(kw):
    """Three processes, each encoding the rows it trains on (overlapping) and counting the rows it owns (each row
    once, some owned by a process that does not train on them): every process ends with the eager pool's T,
    stats and data_hash, pads the eager rows, and encoded only its own rows."""
    whole = tokenize_pool(MORE, TOK, **kw)
    need = [[0, 1, 2, 3], [3, 4, 5, 6, 7], [8, 9]]
    owned = [[0, 1, 2, 3], [4, 5, 6, 7, 10, 11], [8, 9]]        # rows 10, 11: no process trains on them
    pools, errors = _split_prepare(need, owned, kw)
    assert errors == [None] * 3
    for p, nd, ow in zip(pools, need, owned):
        assert p.stats == whole.stats and p.data_hash == whole.data_hash
        assert p.encoded == sorted(set(nd) | set(ow)) and len(p.encoded) < len(MORE)
        for a, b in zip(p.take(nd), whole.take(nd)):
            assert np.array_equal(a, b)
    if kw["max_len"] == 14:
        assert whole.stats["n_truncated"] > 0          # the truncation counts were summed across processes too


def test_a_pool_split_whose_processes_do_not_own_each_row_once_is_refused_on_every_process():
    need = [[0, 1], [2, 3]]
    for owned in ([[0, 1, 2], [2, 3] + list(range(4, 12))],      # row 2 counted twice
                  [[0, 1], [2, 3] + list(range(4, 11))]):        # row 11 counted by no process
        pools, errors = _split_prepare(need, owned, dict(max_len=512))
        assert all(isinstance(e, DataError) and "exactly once" in str(e) for e in errors), errors


def test_a_row_over_max_len_owned_by_one_process_stops_every_process_with_truncation_error():
    lens = [len(enc(p)) + len(enc(c)) + 1 for _, p, c, _ in MORE]
    long = int(np.argmax(lens))
    cap = sorted(lens)[-2]                  # only row ``long`` is longer
    assert lens[long] > cap
    rest = [i for i in range(len(MORE)) if i != long]
    pools, errors = _split_prepare([[rest[0]], [long]], [rest, [long]], dict(max_len=cap, truncation="error"))
    for e in errors:
        assert isinstance(e, DataError) and f"1 row(s) exceed max_len={cap}" in str(e) and MORE[long][0] in str(e), e
    with pytest.raises(DataError, match=f"1 row.s. exceed max_len={cap}"):
        tokenize_pool(MORE, TOK, max_len=cap, truncation="error")


def test_a_lazy_pool_encodes_nothing_until_asked():
    pool = tokenize_pool(MORE, TOK, max_len=512, lazy=True)
    assert pool.encoded == []
    digest = pool.inputs_digest()
    assert digest == tokenize_pool(MORE, TOK, max_len=512, lazy=True).inputs_digest()
    assert digest != tokenize_pool(MORE[::-1], TOK, max_len=512, lazy=True).inputs_digest()
    assert digest != tokenize_pool(MORE, tiny_tokenizer(with_bos=True), max_len=512, lazy=True).inputs_digest()
    assert pool.stats["n_rows"] == len(MORE) and pool.encoded == list(range(len(MORE)))     # stats: every row
