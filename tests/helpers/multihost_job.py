"""One process of a multi-process job, started by test_distributed.py with its place in the job given only by
environment variables (JAXPOISON_* or SLURM_*), as a launcher would. ``python multihost_job.py MODE OUT``.

MODE ``sum``: join, check the shared folder, run a jitted computation over a mesh of every process's devices,
then the start-up checks that must fail (differing inputs, unshared folders); write ``OUT/p<index>.json``.
``die``: join, then process ``JOB_VICTIM`` kills itself while the others keep computing. ``ckpt``: two
asynchronous multi-process checkpoints of a state split over every device, the second overlapping the next
computation, which reuses the donated buffers.
"""
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np

from jaxpoison import distributed


def _global_sum(x):
    """sum over rows of x @ x.T with x split by rows over every device of every process."""
    import jax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Auto,))
    rows = x.shape[0] // jax.process_count()
    local = x[jax.process_index() * rows:(jax.process_index() + 1) * rows]
    g = jax.make_array_from_process_local_data(NamedSharding(mesh, P("x")), local, x.shape)
    y = jax.jit(lambda a: (a @ a.T).sum(axis=1), out_shardings=NamedSharding(mesh, P()))(g)
    return np.asarray(y)


def main(mode, out):
    out = pathlib.Path(out)
    lc = distributed.initialize()
    import jax
    me = jax.process_index()
    rec = {"launch": {"num_processes": lc.num_processes, "process_id": lc.process_id, "source": lc.source},
           "process_index": me, "process_count": jax.process_count(), "device_count": jax.device_count(),
           "local_device_count": jax.local_device_count(), "writer": distributed.is_writer()}
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 10
    if mode == "sum":
        distributed.check_shared_folder(out)
        distributed.agree("inputs", {"x": x.tolist()})
        rec["sum"] = _global_sum(x).tolist()
        for name, fn in (("agree", lambda: distributed.agree("variant table", {"table": [0, 1, 2], "seeds": [me]})),
                         ("shared", lambda: distributed.check_shared_folder(out / f"own-{me}", timeout_s=1))):
            try:
                fn()
                rec[name] = "no error"
            except distributed.DistributedError as e:
                rec[name] = str(e)
    elif mode == "ckpt":
        from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
        from jaxpoison.train.checkpoint import Checkpoints
        mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Auto,))
        split = NamedSharding(mesh, P("x"))
        state = {"w": jax.device_put(np.arange(8 * 6, dtype=np.float32).reshape(8, 6), split),
                 "n": jax.device_put(np.zeros(8, np.int32), split)}
        step = jax.jit(lambda s: {"w": s["w"] * 2 + 1, "n": s["n"] + 1}, donate_argnums=0)
        ck = Checkpoints(out / "run", keep_last=3, async_save=True)
        for i in (1, 2):
            state = step(state)
            ck.save(i, state, {"step": i, "writer": me})
        state = step(state)             # runs while step 2 is written; its input buffers are donated
        ck.close()
        rec["final_w0"] = float(jax.jit(lambda w: w[0, 0], out_shardings=NamedSharding(mesh, P()))(state["w"]))
    elif mode == "die":
        _global_sum(x)
        distributed.barrier("before-death")
        if me == int(os.environ["JOB_VICTIM"]):
            (out / "victim-died-at").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        t0 = time.time()
        while time.time() - t0 < 120:          # the runtime must stop this loop long before the test's limit
            _global_sum(x)
            time.sleep(0.2)
        rec["survived"] = True
    (out / f"p{me}.json").write_text(json.dumps(rec))
    distributed.finish()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
