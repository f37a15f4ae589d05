"""Multi-process jobs on this machine: two processes on 127.0.0.1 with 4 CPU devices each, joined by jax's
runtime, started the way launchers start them (JAXPOISON_* variables, or a SLURM step's own variables), and
the failures that must stop with a clear message instead of hanging."""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxpoison import distributed

from multiproc import HELPERS, ROOT, free_port, job_env, slurm_env

JOB = HELPERS / "multihost_job.py"
LIMIT = 120          # no child may live longer than this, whatever happens






def _start(mode, out, envs):
    out.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([sys.executable, str(JOB), mode, str(out)], env=e, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for e in envs]


def _finish(procs, timeout=LIMIT):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return outs


def _explicit(n=2, **extra):
    addr = f"127.0.0.1:{free_port()}"
    return [job_env(JAXPOISON_COORDINATOR=addr, JAXPOISON_NUM_PROCESSES=n, JAXPOISON_PROCESS_ID=i, **extra)
            for i in range(n)]




def _expected():
    x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6) / 10
    return (x.astype(np.float64) @ x.T.astype(np.float64)).sum(axis=1)


@pytest.mark.parametrize("launcher", ["local_multiprocess.sh", "slurm"])
def test_two_processes_join_compute_the_single_process_answer_and_check_inputs(tmp_path, launcher):
    if launcher == "slurm":
        procs = _start("sum", tmp_path, slurm_env())
        outs = _finish(procs)
        assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    else:       # the launcher sets JAXPOISON_* and 4 devices per process over the caller's 8
        env = job_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", LOG_DIR=tmp_path / "logs",
                   DEVICES_PER_PROCESS=4)
        p = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", "--exec", sys.executable, str(JOB), "sum",
                            str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT)
        assert p.returncode == 0, p.stderr[-3000:] + (tmp_path / "logs" / "p1.log").read_text()[-3000:]
    recs = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(recs):
        assert r["process_index"] == i and r["process_count"] == 2
        assert r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["writer"] == (i == 0)
        np.testing.assert_allclose(r["sum"], _expected(), rtol=1e-5)
    if launcher == "slurm":
        assert recs[1]["launch"]["source"].startswith("SLURM job")
    assert not (tmp_path / distributed.SHARED_CHECK_FILE).exists()      # the check cleans up after itself
    # the start-up checks that must fail, on every process, naming what differs
    for i, r in enumerate(recs):
        assert "disagree on the variant table" in r["agree"] and "seeds differs on process 1" in r["agree"]
        assert "table" not in r["agree"].replace("variant table", "")
        assert "is not shared by all hosts" in r["shared"] and "process 1 on" in r["shared"]
        assert f"own-{i}" in r["shared"]


def test_unreachable_coordinator_fails_in_time_naming_the_address(tmp_path):
    port = free_port()
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "jaxpoison", "run", "no-such-config.py", "--out", str(tmp_path / "r"),
                        "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "1",
                        "--init-timeout", "3"], env=job_env(), capture_output=True, text=True, timeout=LIMIT)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"could not reach the coordinator at 127.0.0.1:{port}" in p.stderr
    assert time.time() - t0 < 3 + 30          # the timeout plus python and jax start-up


def test_missing_process_stops_the_others_at_the_init_timeout(tmp_path):
    procs = _start("sum", tmp_path, _explicit(JAXPOISON_INIT_TIMEOUT=4)[:1])      # process 1 never starts
    out, = _finish(procs)
    assert procs[0].returncode == 3, out[-2000:]
    assert "not all 2 processes joined within 4 s" in out and "127.0.0.1:" in out


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_survivor_within_the_heartbeat_bound(tmp_path, victim):
    procs = _start("die", tmp_path, _explicit(JOB_VICTIM=victim))
    outs = _finish(procs)
    died = float((tmp_path / "victim-died-at").read_text())
    survivor = procs[1 - victim]
    assert procs[victim].returncode == -9
    assert survivor.returncode != 0 and not (tmp_path / f"p{1 - victim}.json").exists(), outs[1 - victim][-2000:]
    # heartbeat timeout 5 s (set in _env): the survivor is gone well within 5 s + slack, not after 120 s
    assert (tmp_path / "victim-died-at").stat().st_mtime <= time.time()
    assert time.time() - died < 5 + 25, outs[1 - victim][-2000:]
    assert "another task died" in outs[1 - victim] or "unhealthy" in outs[1 - victim]


def test_plan_reads_flags_env_and_slurm_and_leaves_single_runs_alone():
    assert not distributed.plan(env={}).multi
    assert not distributed.plan(env={"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
                                     "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}).multi
    lc = distributed.plan(env={distributed.ENV_COORDINATOR: "10.0.0.1:1234", distributed.ENV_NUM_PROCESSES: "4",
                               distributed.ENV_PROCESS_ID: "3"})
    assert (lc.coordinator, lc.num_processes, lc.process_id) == ("10.0.0.1:1234", 4, 3)
    slurm = {"SLURM_JOB_ID": "100", "SLURM_STEP_NODELIST": "gpu[007-009],x1", "SLURM_NTASKS": "3",
             "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    old = {k: os.environ.get(k) for k in slurm}
    os.environ.update(slurm)            # jax's own detection reads os.environ
    try:
        lc = distributed.plan(env=slurm)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (lc.coordinator, lc.num_processes, lc.process_id) == (f"gpu007:{61440 + 100}", 3, 2)
    assert not distributed.plan(env={**slurm, distributed.ENV_DISTRIBUTED: "off"}).multi
    with pytest.raises(distributed.DistributedError, match="missing --process-id"):
        distributed.plan(env={distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2"})
    with pytest.raises(distributed.DistributedError, match="HOST:PORT"):
        distributed.plan(env={distributed.ENV_COORDINATOR: "h", distributed.ENV_NUM_PROCESSES: "2",
                              distributed.ENV_PROCESS_ID: "0"})
    with pytest.raises(distributed.DistributedError, match=r"0\.\.1"):
        distributed.plan(env={distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "2",
                              distributed.ENV_PROCESS_ID: "2"})


def test_multi_process_async_checkpoints_restore_into_one_process_and_another_sharding(tmp_path):
    procs = _start("ckpt", tmp_path, _explicit())
    outs = _finish(procs)
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxpoison.train.checkpoint import Checkpoints
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [1, 2]
    # every process wrote its own shards; the primary wrote meta
    assert {p.name for p in (ck / "2" / "state").glob("ocdbt.process_*")} == {"ocdbt.process_0", "ocdbt.process_1"}
    assert json.loads((ck / "2" / "meta" / "metadata").read_text()) == {"step": 2, "writer": 0}
    # one process, 8 devices, the rows split over 4 and the columns over 2 (another mesh than the writers')
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    target = {"w": jax.ShapeDtypeStruct((8, 6), np.float32, sharding=NamedSharding(mesh, P("a", "b"))),
              "n": jax.ShapeDtypeStruct((8,), np.int32, sharding=NamedSharding(mesh, P())) }
    w = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    for s in (1, 2):
        step, got, meta = Checkpoints(tmp_path / "run", read_only=True).restore(target, step=s)
        w = w * 2 + 1
        assert step == s and meta["step"] == s
        assert got["w"].sharding.spec == P("a", "b")
        np.testing.assert_array_equal(np.asarray(got["w"]), w)
        np.testing.assert_array_equal(np.asarray(got["n"]), np.full(8, s))
    r0 = json.loads((tmp_path / "p0.json").read_text())
    assert r0["final_w0"] == (w * 2 + 1)[0, 0]


def test_process_0_says_when_the_coordinator_port_is_taken(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(distributed, "_launch", distributed.Launch())
        with pytest.raises(distributed.DistributedError, match=f"port {port} is in use"):
            distributed.initialize(env={distributed.ENV_COORDINATOR: f"127.0.0.1:{port}",
                                        distributed.ENV_NUM_PROCESSES: "2", distributed.ENV_PROCESS_ID: "0"})
    import jax
    assert not jax.distributed.is_initialized()
