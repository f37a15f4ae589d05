"""The packed head: log-prob sums over set positions only, equal to the full grid's masked sums."""
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import TINY, tiny_base
from jaxpoison.models.heads import PACK, masked_logprob_sums, packed_budget, token_logprobs


def test_packed_sums_equal_the_masked_full_grid():
    base = tiny_base()
    R, N = 7, 9
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(R, N, TINY.hidden_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, TINY.vocab_size, (R, N)), jnp.int32)
    lengths = np.array([0, 1, 9, 8, 5, 9, 9])                        # an empty row, a full row, uneven ones
    mask = np.arange(N)[None] < lengths[:, None]
    mask[4, 0] = False                                              # a hole: not only right padding
    full = np.where(mask, np.asarray(token_logprobs(base, TINY, hidden, targets)), 0.0).sum(-1)
    budget = packed_budget([mask.sum()], R * N)
    assert budget % PACK == 0 and budget >= mask.sum()
    got = np.asarray(masked_logprob_sums(base, TINY, hidden, targets, jnp.asarray(mask), budget))
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    assert got[0] == 0.0
    # 40 set positions: one row of PACK slots drops the last ones, so the sizing rule must hold all of them
    short = np.asarray(masked_logprob_sums(base, TINY, hidden, targets, jnp.asarray(mask), PACK))
    assert not np.allclose(short, full)


def test_packed_budget_rounds_up_and_caps():
    assert packed_budget([1, 40, 33], 1000) == 64
    assert packed_budget([500], 70) == 96             # the cap, rounded to whole rows of PACK
    assert packed_budget([], 10) == PACK


def test_budget_must_be_whole_rows():
    base = tiny_base()
    h = jnp.zeros((2, 4, TINY.hidden_size))
    t = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="multiple of"):
        masked_logprob_sums(base, TINY, h, t, jnp.ones((2, 4), bool), PACK + 1)
