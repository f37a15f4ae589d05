"""The matmul floor of the benchmarks does exactly the work the MFU figures count: XLA's own cost analysis of
the compiled floor program equals 4 x matmul params per training token (2 x per scored token, no head)."""
import pytest

from jaxpoison.bench.common import lora_train_flops_per_token
from jaxpoison.bench.floor import compiled_flops, floor_fields, matmul_floor
import dataclasses

from tiny import TINY


@pytest.mark.parametrize("backward,head", [(True, True), (False, False)])
def test_floor_program_does_the_counted_matmul_work(backward, head):
    # XLA's cost analysis counts a loop body once: one layer and one vocabulary block make it the whole program
    cfg = dataclasses.replace(TINY, vocab_size=1536, num_layers=1)
    rows = 64
    got = compiled_flops(cfg, rows, backward=backward, head=head)
    params = cfg.matmul_params() - (0 if head else cfg.hidden_size * cfg.vocab_size)
    want = rows * (lora_train_flops_per_token(cfg) if backward else 2 * params)
    assert got == pytest.approx(want, rel=0.03)


def test_floor_fields_fractions():
    t = matmul_floor(TINY, 32, backward=True, torch_too=True, reps=1)
    assert set(t) == {"jax", "torch"} and all(v > 0 for v in t.values())
    f = floor_fields("dots_", 100, {"jax": 1.0, "torch": 2.0}, {"ours": 50.0, "ref": 40.0}, 1.3, "ref")
    assert f["dots_floor_jax_tok_s"] == 100 and f["dots_floor_torch_tok_s"] == 50
    assert f["ours_frac_floor"] == pytest.approx(0.5) and f["ref_frac_floor"] == pytest.approx(0.4)
    assert f["goal_tok_s"] == pytest.approx(52) and f["goal_frac_floor"] == pytest.approx(0.52)


def test_floor_head_runs_every_vocabulary_block():
    # each block is its own weight array feeding the chained rows, so XLA cannot hoist a block's matmul out of
    # the loop and run it once (the session-3 floor reused one block and its head cost 1/32 of the real one)
    import jax
    import jax.numpy as jnp

    from jaxpoison.bench.floor import _jax_program

    cfg = dataclasses.replace(TINY, vocab_size=3 * 1536, num_layers=1)
    _, run, (w, wh, x) = _jax_program(cfg, 16, backward=True, head=True)
    assert wh.shape[0] == 3
    g = jax.grad(lambda blocks: jnp.sum(run(w, blocks, x) ** 2))(wh)
    assert all(float(jnp.abs(g[b]).sum()) > 0 for b in range(3))
