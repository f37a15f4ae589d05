"""Asynchronous checkpoints: save returns before the files are written, yet what lands on disk is the state as
it was at save time, even when the caller goes on to change its host arrays, its meta dict or (donated) device
buffers."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxpoison.train.checkpoint import Checkpoints, abstract_like


def test_async_save_keeps_the_state_of_the_moment_it_was_called(tmp_path):
    host = np.arange(200_000, dtype=np.float32)
    dev = jnp.arange(200_000, dtype=jnp.float32) * 3
    meta = {"step": 1}
    ck = Checkpoints(tmp_path, keep_last=2, async_save=True)
    ck.save(1, {"host": host, "dev": dev}, meta)
    host[:] = -1                                  # the trainer writes chunk results into its host state in place
    meta["step"] = 99
    jax.jit(lambda x: x + 1, donate_argnums=0)(dev)   # and donates the device state to the next segment
    ck.close()
    target = {"host": np.zeros_like(host), "dev": jax.ShapeDtypeStruct((200_000,), jnp.float32)}
    step, got, m = Checkpoints(tmp_path, read_only=True).restore(target)
    assert step == 1 and m == {"step": 1}
    np.testing.assert_array_equal(got["host"], np.arange(200_000, dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(got["dev"]), np.arange(200_000, dtype=np.float32) * 3)


def test_a_step_left_half_written_is_cleaned_up_and_the_previous_one_used(tmp_path):
    ck = Checkpoints(tmp_path, keep_last=3)
    ck.save(2, {"x": np.ones(4, np.float32)}, {"step": 2})
    ck.close()
    # what a process killed mid-save leaves: orbax's temporary folder for the next step
    tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    ck = Checkpoints(tmp_path, keep_last=3, async_save=True)
    assert ck.steps() == [2]
    step, got, _ = ck.restore(abstract_like({"x": np.zeros(4, np.float32)}))
    assert step == 2 and np.array_equal(np.asarray(got["x"]), np.ones(4))
    ck.close()                                    # (orbax removes it in the background)
    assert not tmp.exists() and (tmp_path / "checkpoints" / "2").is_dir()
