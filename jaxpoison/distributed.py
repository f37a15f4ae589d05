"""One study across several hosts, on jax's own multi-controller runtime.

Every host runs the same command; each process drives its local devices and jax joins them into one set of
global devices (``jax.distributed.initialize``). Nothing here schedules work: the compiled program is the same
one a single host runs, over a mesh that now spans processes.

How a process learns its place, first match wins:

1. ``--coordinator HOST:PORT --num-processes N --process-id I`` on ``run``, or the environment variables
   ``JAXPOISON_COORDINATOR``, ``JAXPOISON_NUM_PROCESSES``, ``JAXPOISON_PROCESS_ID`` (any machines, no scheduler);
2. a SLURM step (``srun``: ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
   ``SLURM_LOCALID``) with more than one task;
3. a Cloud TPU VM slice of more than one host (the VM metadata server knows the workers);
4. otherwise one process, and ``jax.distributed`` is never touched: single-host runs are exactly as before.

Cases 2 and 3 use jax's own cluster detection (``jax._src.clusters``); ``--distributed off`` (or
``JAXPOISON_DISTRIBUTED=off``) forces case 4.

jax's runtime turns most failures into an abort from C++ with a message about "another task" whatever the
cause, so this module checks what it can first and says it plainly:

- a process that cannot reach the coordinator within ``--init-timeout`` (``JAXPOISON_INIT_TIMEOUT``, default
  300 s) stops with the address it tried; so does a job whose processes do not all join within it;
- a process that dies is noticed by the others through the runtime's heartbeats (``--heartbeat-timeout``,
  ``JAXPOISON_HEARTBEAT_TIMEOUT``, default 60 s): they abort within about that time instead of hanging;
  ``JAXPOISON_SHUTDOWN_TIMEOUT`` (default 300 s) bounds how long a finished process waits for the rest;
- :func:`check_shared_folder` proves at start-up that every host sees the same run folder;
- :func:`agree` proves that every process derived the same inputs (variant table, seeds, data), naming any
  that differ.

One writer: :func:`is_writer` is true on process 0 only. Metrics, TensorBoard, tables, plots and reports come
from it; other processes write only their checkpoint shards. On CPU the processes exchange data through gloo
collectives (``jax_cpu_collectives_implementation``), so a multi-process run can be tested on one machine
(``launch/local_multiprocess.sh``).
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pathlib
import secrets
import socket
import sys
import threading
import time
from typing import Mapping, Optional

ENV_COORDINATOR = "JAXPOISON_COORDINATOR"
ENV_NUM_PROCESSES = "JAXPOISON_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXPOISON_PROCESS_ID"
ENV_DISTRIBUTED = "JAXPOISON_DISTRIBUTED"           # auto (default) | off
ENV_INIT_TIMEOUT = "JAXPOISON_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "JAXPOISON_HEARTBEAT_TIMEOUT"
ENV_SHUTDOWN_TIMEOUT = "JAXPOISON_SHUTDOWN_TIMEOUT"
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
SHARED_CHECK_FILE = ".multihost-check"


class DistributedError(RuntimeError):
    """A multi-process start that cannot work; the message names the address, process or folder at fault."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """Where this process stands in its job. ``source`` says, for messages, what told us."""
    num_processes: int = 1
    process_id: int = 0
    coordinator: Optional[str] = None
    local_device_ids: Optional[tuple] = None
    source: str = "single process"
    init_timeout: int = 300
    heartbeat_timeout: int = 60
    shutdown_timeout: int = 300

    @property
    def multi(self) -> bool:
        return self.num_processes > 1


_launch = Launch()


# ---- where this process stands ---------------------------------------------------------------------------------
def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DistributedError(f"{name} must be a whole number, got {value!r}") from None


def _timeouts(env: Mapping[str, str], args) -> dict:
    def pick(attr, var, default):
        v = getattr(args, attr, None) if args is not None else None
        return _int(v if v is not None else env.get(var, default), f"--{attr.replace('_', '-')} / {var}")
    out = {"init_timeout": pick("init_timeout", ENV_INIT_TIMEOUT, 300),
           "heartbeat_timeout": pick("heartbeat_timeout", ENV_HEARTBEAT_TIMEOUT, 60),
           "shutdown_timeout": pick("shutdown_timeout", ENV_SHUTDOWN_TIMEOUT, 300)}
    for k, v in out.items():
        if v < 1:
            raise DistributedError(f"{k.replace('_', ' ')} must be at least 1 second, got {v}")
    return out


def _explicit(env: Mapping[str, str], args) -> Optional[dict]:
    """The --coordinator/--num-processes/--process-id triple (flags over environment), or None if none is set."""
    vals = {}
    for attr, var in (("coordinator", ENV_COORDINATOR), ("num_processes", ENV_NUM_PROCESSES),
                      ("process_id", ENV_PROCESS_ID)):
        v = getattr(args, attr, None) if args is not None else None
        vals[attr] = v if v is not None else env.get(var) or None
    if all(v is None for v in vals.values()):
        return None
    missing = [f"--{k.replace('_', '-')} ({var})" for (k, v), var in
               zip(vals.items(), (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)) if v is None]
    if missing:
        raise DistributedError(f"a multi-process run needs all of --coordinator, --num-processes and --process-id; "
                               f"missing {', '.join(missing)}")
    n, i, addr = _int(vals["num_processes"], "--num-processes"), _int(vals["process_id"], "--process-id"), \
        str(vals["coordinator"])
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f"--process-id must be in 0..{n - 1} for --num-processes {n}, got {i}")
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator must be HOST:PORT (the address of process 0 and a free port), "
                               f"got {addr!r}")
    return {"coordinator": addr, "num_processes": n, "process_id": i}


def _slurm(env: Mapping[str, str]) -> Optional[dict]:
    if not all(k in env for k in _SLURM):
        return None
    return {"num_processes": _int(env["SLURM_NTASKS"], "SLURM_NTASKS"),
            "process_id": _int(env["SLURM_PROCID"], "SLURM_PROCID")}


def _jax_detect(cluster: Optional[str], timeout: int) -> tuple:
    """jax's own cluster detection, without initialising anything: (coordinator, n, id, local device ids)."""
    try:
        from jax._src import clusters
        detect = clusters.ClusterEnv.auto_detect_unset_distributed_params
    except (ImportError, AttributeError):
        raise DistributedError("this jax has no cluster detection where jaxpoison looks for it (jax._src.clusters); "
                               "start each process with --coordinator HOST:PORT --num-processes N "
                               "--process-id I instead") from None
    return detect(None, None, None, None, cluster, timeout)


def _tpu_slice_size() -> int:
    """Hosts in this Cloud TPU VM slice (1 when not on a TPU VM), from the metadata jax itself reads."""
    try:
        from jax._src import cloud_tpu_init
        if not cloud_tpu_init.running_in_cloud_tpu_vm:
            return 1
        from jax._src.clusters import cloud_tpu_cluster as tpu
        for env in (tpu.GkeTpuCluster, tpu.GceTpuCluster):
            if env.is_env_present():
                return int(env.get_process_count())
    except Exception:          # a jax without these internals: one process unless flags say otherwise
        return 1
    return 1


def plan(args=None, env: Optional[Mapping[str, str]] = None) -> Launch:
    """How this process should start (pure but for the TPU metadata query): see the module docstring."""
    env = os.environ if env is None else env
    t = _timeouts(env, args)
    mode = (getattr(args, "distributed", None) if args is not None else None) or env.get(ENV_DISTRIBUTED, "auto")
    if mode not in ("auto", "off"):
        raise DistributedError(f"--distributed / {ENV_DISTRIBUTED} must be 'auto' or 'off', got {mode!r}")
    ex = _explicit(env, args)
    if ex is not None:
        if mode == "off":
            raise DistributedError("--distributed off contradicts --coordinator/--num-processes/--process-id")
        return Launch(**ex, source=f"--coordinator {ex['coordinator']}", **t)
    if mode == "off":
        return Launch(source="single process (--distributed off)", **t)
    sl = _slurm(env)
    if sl is not None:
        if sl["num_processes"] <= 1:
            return Launch(source="single process (a one-task SLURM step)", **t)
        addr, n, i, local = _jax_detect("slurm", t["init_timeout"])
        if "JAX_LOCAL_DEVICE_IDS" in env:       # the user's choice of devices per task; jax reads it
            local = None
        return Launch(n, i, addr, tuple(local) if local else None,
                      f"SLURM job {env['SLURM_JOB_ID']} (task {i} of {n})", **t)
    if _tpu_slice_size() > 1:
        addr, n, i, local = _jax_detect(None, t["init_timeout"])
        if n and n > 1:
            return Launch(n, i, addr, tuple(local) if local else None, f"TPU VM slice (host {i} of {n})", **t)
    return Launch(**t)


# ---- joining the job -------------------------------------------------------------------------------------------
def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def _check_can_serve(lc: Launch) -> None:
    """Process 0 runs the coordinator service on the address's port: say so now if it cannot."""
    host, port = _split(lc.coordinator)
    for family in (socket.AF_INET6, socket.AF_INET):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
            break
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise DistributedError(f"process 0 cannot start the coordinator at {lc.coordinator} ({lc.source}): "
                                       f"port {port} is in use on this host; choose another port") from None
            if family == socket.AF_INET:
                raise DistributedError(f"process 0 cannot open port {port} for the coordinator at "
                                       f"{lc.coordinator}: {e}") from None


def _wait_reachable(lc: Launch, deadline: float) -> None:
    """Processes other than 0: wait until the coordinator's port answers, or fail naming the address."""
    host, port = _split(lc.coordinator)
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.time()))):
                return
        except OSError as e:
            last = e
        if time.time() >= deadline:
            raise DistributedError(
                f"process {lc.process_id} of {lc.num_processes} could not reach the coordinator at {lc.coordinator} "
                f"({lc.source}) within {lc.init_timeout} s ({last}). Start process 0 on that host, check the "
                f"address and that the port is open between hosts, or raise --init-timeout.")
        time.sleep(0.25)


def _watchdog(lc: Launch, seconds: float) -> threading.Timer:
    """jax aborts a connect that times out with a message about a dead task; stop first, and say what happened."""
    def fire():
        sys.stderr.write(
            f"error: process {lc.process_id} reached the coordinator at {lc.coordinator} ({lc.source}) but not all "
            f"{lc.num_processes} processes joined within {lc.init_timeout} s. Start every process (ids "
            f"0..{lc.num_processes - 1}, the same --num-processes on each; under SLURM through srun), or raise "
            "--init-timeout if hosts start slowly.\n")
        sys.stderr.flush()
        os._exit(3)
    t = threading.Timer(max(0.0, seconds), fire)
    t.daemon = True
    t.start()
    return t


def initialize(args=None, env: Optional[Mapping[str, str]] = None) -> Launch:
    """Join the multi-process job this process belongs to, if any (call before anything touches a device).

    Returns the :class:`Launch`; a single-process start returns at once and leaves jax alone."""
    global _launch
    lc = plan(args, env)
    _launch = lc
    if not lc.multi:
        return lc
    import jax
    if jax.distributed.is_initialized():
        return lc
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    deadline = time.time() + lc.init_timeout
    if lc.process_id == 0:
        _check_can_serve(lc)
    else:
        _wait_reachable(lc, deadline)
    dog = _watchdog(lc, deadline - time.time())
    try:
        jax.distributed.initialize(lc.coordinator, lc.num_processes, lc.process_id,
                                   local_device_ids=list(lc.local_device_ids) if lc.local_device_ids else None,
                                   cluster_detection_method="deactivate",
                                   initialization_timeout=lc.init_timeout + 30,
                                   heartbeat_timeout_seconds=lc.heartbeat_timeout,
                                   shutdown_timeout_seconds=lc.shutdown_timeout)
    finally:
        dog.cancel()
    return lc


def add_args(p) -> None:
    """The multi-process flags of ``run`` (all optional; see the module docstring)."""
    g = p.add_argument_group("multi-host (jax.distributed; automatic under srun and on TPU VM slices)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0 and a free port ({ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N", help=f"processes in the job ({ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, metavar="I", help=f"this process, 0..N-1 ({ENV_PROCESS_ID})")
    g.add_argument("--distributed", choices=("auto", "off"), default=None,
                   help=f"'off': one process even under SLURM or on a TPU slice ({ENV_DISTRIBUTED}; default auto)")
    g.add_argument("--init-timeout", type=int, default=None, metavar="S",
                   help=f"seconds to wait for the coordinator and all processes ({ENV_INIT_TIMEOUT}; default 300)")
    g.add_argument("--heartbeat-timeout", type=int, default=None, metavar="S",
                   help=f"seconds after which a silent process counts as dead and the job stops "
                        f"({ENV_HEARTBEAT_TIMEOUT}; default 60)")


# ---- once joined -----------------------------------------------------------------------------------------------
def launch() -> Launch:
    return _launch


def _client():
    import jax
    if not jax.distributed.is_initialized():
        return None
    from jax._src import distributed
    return distributed.global_state.client


def process_index() -> int:
    """This process's index; 0 without touching jax when no multi-process job was joined."""
    if _client() is None:
        return 0
    import jax
    return jax.process_index()


def process_count() -> int:
    if _client() is None:
        return 1
    import jax
    return jax.process_count()


def is_writer() -> bool:
    """True on the one process that writes metrics, TensorBoard, tables, plots and reports (process 0)."""
    return process_index() == 0


_seq = [0]


def _key(name: str) -> str:
    _seq[0] += 1
    return f"jaxpoison/{_seq[0]}/{name}"


def barrier(name: str, timeout_s: Optional[float] = None) -> None:
    """All processes wait here (no-op for one process)."""
    c = _client()
    if c is not None:
        c.wait_at_barrier(_key(name), int(1000 * (timeout_s or _launch.init_timeout)))


def finish(timeout_s: float = 24 * 3600) -> None:
    """End a multi-host job together: every process waits here (while process 0 writes its report, say), then
    leaves jax's runtime at once. Left to exit, jax's own shutdown runs last of all exit handlers and fails its
    barrier (SIGABRT on every process) when one process is slow to get there. No-op for one process."""
    if _client() is None:
        return
    barrier("finished", timeout_s)
    import jax
    jax.distributed.shutdown()


def allgather_str(name: str, value: str, timeout_s: Optional[float] = None) -> list[str]:
    """Every process's ``value``, by process index, through the coordinator's key-value store (no devices)."""
    c = _client()
    if c is None:
        return [value]
    key, n, ms = _key(name), process_count(), int(1000 * (timeout_s or _launch.init_timeout))
    c.key_value_set(f"{key}/{process_index()}", value)
    return [c.blocking_key_value_get(f"{key}/{i}", ms) for i in range(n)]


def allgather_json(value) -> list:
    """Every process's JSON-able ``value``, by process index, through a device collective (gloo on CPU), so large
    values (generated answers) need not fit the coordinator's key-value store. All processes call together."""
    if process_count() == 1:
        return [value]
    import numpy as np
    from jax.experimental import multihost_utils
    b = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    n = np.asarray(multihost_utils.process_allgather(np.array([len(b)], np.int32))).reshape(-1)
    padded = np.zeros(int(n.max()), np.uint8)
    padded[:len(b)] = b
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(every[i, :int(n[i])].tobytes().decode("utf-8")) for i in range(len(n))]


def digest(value) -> str:
    """A short stable hash of a JSON-able value (or of str/bytes as given)."""
    if isinstance(value, bytes):
        b = value
    elif isinstance(value, str):
        b = value.encode()
    else:
        b = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(b).hexdigest()[:16]


def agree(what: str, items: Mapping[str, object]) -> None:
    """Raise on every process unless all processes hold the same ``items`` (name -> JSON-able value or digest).

    The error names each item that differs and the processes that differ from process 0."""
    mine = {k: digest(v) for k, v in items.items()}
    everyone = [json.loads(s) for s in allgather_str(f"agree/{what}", json.dumps(mine))]
    bad = {}
    for i, theirs in enumerate(everyone[1:], 1):
        for k in sorted(set(theirs) | set(everyone[0])):
            if theirs.get(k) != everyone[0].get(k):
                bad.setdefault(k, []).append(i)
    if bad:
        raise DistributedError(
            f"the processes of this job disagree on the {what}: " +
            "; ".join(f"{k} differs on process{'es' if len(p) > 1 else ''} {', '.join(map(str, p))} from process 0"
                      for k, p in bad.items()) +
            ". Every process must run the same command, config and jaxpoison version on the same input files.")


def check_shared_folder(path, timeout_s: float = 30.0) -> None:
    """Prove that every process sees ``path`` as one folder: process 0 writes a random token there and the
    others must read it back. Raises on every process, naming the hosts that do not see it."""
    c = _client()
    if c is None:
        return
    path = pathlib.Path(path)
    f = path / SHARED_CHECK_FILE
    me, host = process_index(), socket.gethostname()
    token = allgather_str("shared-token", secrets.token_hex(8) if me == 0 else "")[0]
    if me == 0:
        path.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        tmp.write_text(token)
        os.replace(tmp, f)
    barrier("shared-written")
    seen, deadline = None, time.time() + (0 if me == 0 else timeout_s)
    while True:                        # network file systems may show a new file a few seconds late
        try:
            seen = f.read_text()
        except OSError:
            seen = None
        if seen == token or time.time() >= deadline:
            break
        time.sleep(0.5)
    verdicts = allgather_str("shared-seen", json.dumps({"host": host, "ok": seen == token,
                                                        "saw": "nothing" if seen is None else "another token"}))
    verdicts = [json.loads(v) for v in verdicts]
    barrier("shared-read")
    if me == 0:
        f.unlink(missing_ok=True)
    bad = [(i, v) for i, v in enumerate(verdicts) if not v["ok"]]
    if bad:
        raise DistributedError(
            f"the run folder {path} is not shared by all hosts: process 0 on {verdicts[0]['host']} wrote "
            f"{f.name} there, and " + ", ".join(f"process {i} on {v['host']} saw {v['saw']}" for i, v in bad) +
            ". --out must be on a file system that every host mounts at the same path (NFS, Filestore, "
            "Lustre, a GCS FUSE mount).")
