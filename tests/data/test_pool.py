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
