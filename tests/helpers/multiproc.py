"""Environments for multi-process test jobs on this machine: a free port, a clean child environment with N CPU
devices per process, and a SLURM step's own variables as `srun` would set them."""
import os
import random
import pathlib
import socket

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
HELPERS = ROOT / "tests" / "helpers"      # the job scripts live here


_GIVEN = set()      # ports handed out by this process: jobs started together must not share a coordinator port


def free_port(lo=None, hi=None):
    # a random start: test processes of other checkouts on this machine scan the same range at the same time
    start = random.randrange(lo, hi) if lo else 0
    for port in ([*range(start, hi), *range(lo, start)] if lo else [0] * 100):
        if port in _GIVEN:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            got = s.getsockname()[1]
        if got not in _GIVEN:
            _GIVEN.add(got)
            return got
    raise RuntimeError("no free port")


def job_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAXPOISON_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{HELPERS}", JAXPOISON_HEARTBEAT_TIMEOUT="5",
               JAXPOISON_SHUTDOWN_TIMEOUT="60", JAXPOISON_INIT_TIMEOUT="60")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def slurm_env(n=2):
    # jax's SLURM detection puts the coordinator on the first node at port 61440 + job id % 4096
    port = free_port(61440, 65536)
    return [job_env(SLURM_JOB_ID=port - 61440, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=n, SLURM_PROCID=i,
                     SLURM_LOCALID=i, SLURM_STEP_NUM_NODES=1, SLURM_NODELIST="localhost") for i in range(n)]
