"""The launchers in launch/: what they ask gcloud and srun to do (both replaced by recording fakes on PATH), and
that local_multiprocess.sh stops the others when one process fails."""
import os
import pathlib
import shlex
import subprocess
import tarfile
import time

ROOT = pathlib.Path(__file__).parent.parent
FAKE = """#!/usr/bin/env bash
# record the call, one argument per line, calls separated by a line '--END--'
{ printf '%s\\n' "$@"; echo --END--; } >> "$FAKE_LOG"
if [ "$1 $2 $3 $4" = "compute tpus tpu-vm describe" ]; then exit "${FAKE_DESCRIBE_RC:-1}"; fi
if [ "$4" = scp ]; then cp "$5" "$FAKE_LOG.tgz"; fi
exit 0
"""


def _fake(tmp_path, name):
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / name).write_text(FAKE)
    (bin_ / name).chmod(0o755)
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log)}
    return env, log


def _calls(log):
    return [c.strip("\n").split("\n") for c in log.read_text().split("--END--\n") if c.strip()]


def test_tpu_pod_creates_copies_sets_up_and_starts_on_every_worker(tmp_path):
    env, log = _fake(tmp_path, "gcloud")
    env.update(TPU_NAME="jp-pod", ZONE="us-central2-b", ACCELERATOR="v5litepod-32", RUN_DIR="/mnt/shared/run 1")
    p = subprocess.run(["bash", "launch/tpu_pod.sh", "configs/rationale_paper.py", "--set", "grid.seeds=[0, 1]"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    calls = _calls(log)
    verbs = [c[3] for c in calls]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]
    assert "--accelerator-type=v5litepod-32" in calls[1] and "jp-pod" in calls[1]
    assert all("--zone=us-central2-b" in c for c in calls)
    assert all("--worker=all" in c for c in calls[2:])
    cmds = [next(a for a in c if a.startswith("--command=")).split("=", 1)[1] for c in calls[3:]]
    assert "bash launch/setup.sh" in cmds[1] and "jax[tpu]==0.10.2" in cmds[1].replace("\\", "")
    # the study command survives the remote shell's word splitting unchanged
    run = shlex.split(cmds[2].split("&&", 1)[1].split("2>&1")[0])
    assert run == [".venv/bin/python", "-m", "jaxpoison", "run", "configs/rationale_paper.py", "--out",
                   "/mnt/shared/run 1", "--set", "grid.seeds=[0, 1]"]
    assert "results: /mnt/shared/run 1" in p.stdout
    names = tarfile.open(str(log) + ".tgz").getnames()
    assert {"launch/setup.sh", "jaxpoison/distributed.py", "requirements.txt"} <= set(names)
    assert not any(n.startswith((".venv/", ".git/")) for n in names)

    log.unlink()
    env["FAKE_DESCRIBE_RC"] = "0"                      # the slice exists: reused, not created again
    p = subprocess.run(["bash", "launch/tpu_pod.sh", "configs/rationale_paper.py"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "reusing TPU slice jp-pod" in p.stdout
    assert "create" not in [c[3] for c in _calls(log)]


def test_slurm_sbatch_runs_the_study_through_srun_with_no_jaxpoison_flags(tmp_path):
    env, log = _fake(tmp_path, "srun")
    env.update(SLURM_SUBMIT_DIR=str(ROOT), SLURM_JOB_ID="42")
    run_dir = tmp_path / "shared" / "run"
    spool = tmp_path / "slurm_script"          # sbatch runs a copy of the script from its spool folder
    spool.write_text((ROOT / "launch" / "slurm.sbatch").read_text())
    p = subprocess.run(["bash", str(spool), "configs/rationale_demo.py", str(run_dir)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    (call,) = _calls(log)
    assert call[0] == "--kill-on-bad-exit=1"
    assert call[1:] == [".venv/bin/python", "-m", "jaxpoison", "run", "configs/rationale_demo.py", "--out",
                        str(run_dir)]
    assert run_dir.is_dir() and f"results in {run_dir}" in p.stdout


def test_local_multiprocess_gives_each_process_its_place_and_stops_the_rest_on_a_failure(tmp_path):
    job = ('echo "$JAXPOISON_PROCESS_ID/$JAXPOISON_NUM_PROCESSES $JAXPOISON_COORDINATOR $XLA_FLAGS" '
           '> "$OUT/p$JAXPOISON_PROCESS_ID"; if [ "$JAXPOISON_PROCESS_ID" = 2 ]; then '
           'while [ ! -e "$OUT/p0" ] || [ ! -e "$OUT/p1" ]; do sleep 0.1; done; exit 7; fi; sleep 60')
    env = {**os.environ, "OUT": str(tmp_path), "LOG_DIR": str(tmp_path / "logs"), "DEVICES_PER_PROCESS": "2",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_enable_fast_math=false"}
    t0 = time.time()
    p = subprocess.run(["bash", "launch/local_multiprocess.sh", "3", "--exec", "bash", "-c", job], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 7, p.stderr
    assert time.time() - t0 < 30                                   # not the 60 s the others would sleep
    lines = [(tmp_path / f"p{i}").read_text().split() for i in range(3)]
    assert [l[0] for l in lines] == ["0/3", "1/3", "2/3"]
    assert len({l[1] for l in lines}) == 1 and lines[0][1].startswith("127.0.0.1:")
    for l in lines:      # the caller's device count replaced, its other XLA flags kept
        assert l[2:] == ["--xla_cpu_enable_fast_math=false", "--xla_force_host_platform_device_count=2"]
