"""A run killed with SIGKILL mid-run and restarted with the same command ends bitwise equal to an uninterrupted run."""
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
HERE = ROOT / "tests" / "helpers"      # the job scripts


def _job(run_dir, out, kill_after=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{HERE}"
    if kill_after is not None:
        env["JAXPOISON_TEST_SIGKILL_AFTER"] = str(kill_after)
    return subprocess.run([sys.executable, str(HERE / "resume_job.py"), str(run_dir), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    full = _job(tmp_path / "full", tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = _job(tmp_path / "run", tmp_path / "never.npz", kill_after=4)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "never.npz").exists()
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) == 4
    resumed = _job(tmp_path / "run", tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert int(b["resumed"]) == 4
    for k in a.files:
        if k != "resumed":
            assert np.array_equal(a[k], b[k]), k
    # metrics JSONL holds every step exactly once after the resume
    import json
    lines = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == sorted(set(lines)) and lines[0] == 0
    # and so do the TensorBoard runs, rewritten from it (scalars() fails on a step written twice)
    from tb_proto import scalars
    for run in (tmp_path / "run" / "tensorboard").iterdir():
        tags = scalars(run)
        assert sorted(tags["tokens_per_s" if run.name == "study" else "lr"]) == lines, run.name


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path):
    import jax
    from resume_job import ST
    from tiny import tiny_base, tiny_study
    from jaxpoison.train.checkpoint import Checkpoints, abstract_like
    from jaxpoison.train.engine import init_program, variant_keys
    from jaxpoison.train.trainer import train_study

    sd = tiny_study(V=3)
    train_study(tiny_base(), ST, sd, run_dir=str(tmp_path / "run"), progress=False, stop_after=6)
    ck = tmp_path / "run" / "checkpoints"
    newest = max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    assert newest == 6
    for f in (ck / str(newest) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"garbage")
    st = init_program(ST)(variant_keys(jax.random.PRNGKey(0), sd.variants()))
    with pytest.warns(UserWarning, match="could not be restored"):
        step, _, meta = Checkpoints(tmp_path / "run").restore(abstract_like(st.to_dict()))
    assert step == 4 and meta["step"] == 4
    assert (ck / str(newest)).exists()      # nothing already saved is deleted
