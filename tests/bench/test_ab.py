"""The A/B runner on a fake workload (no jax, no model): fresh processes alternate old, new, old, new, each
imports its own tree, and the summary's medians, ratios and checks follow from what the runs reported."""
import json
import pathlib
import sys

import pytest

from jaxpoison.bench import ab

FAKE = '''
import json, pathlib, sys
import jaxpoison                                    # must be the contender's tree
root = pathlib.Path(jaxpoison.__file__).resolve().parent
speed = json.loads((root / "speed.json").read_text())
log = pathlib.Path(sys.argv[sys.argv.index("--log") + 1])
n = len(log.read_text().splitlines()) if log.exists() else 0
with log.open("a") as f:
    f.write(speed["name"] + "\\n")
print("noise before the result line")
print(json.dumps({"ab_workload": 1, "jaxpoison": str(root), "train_steady_s": speed["times"][n // 2],
                  "load_s": 1.0, "train_loss_last": speed["loss"], "flag": True}))
'''


def _tree(tmp, name, times, loss=2.5, fail=False):
    pkg = tmp / name / "jaxpoison"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise SystemExit(3)\n" if fail else "")
    (pkg / "speed.json").write_text(json.dumps({"name": name, "times": times, "loss": loss}))
    return tmp / name


@pytest.fixture
def fake(tmp_path):
    w = tmp_path / "fake_workload.py"
    w.write_text(FAKE)
    return w


def test_alternates_and_summarises(tmp_path, fake):
    old = _tree(tmp_path, "old", [10.0, 30.0, 20.0])
    new = _tree(tmp_path, "new", [6.0, 5.0, 40.0], loss=2.5 + 1e-3)
    log = tmp_path / "order.log"
    lines = []
    s = ab.run_ab({"old": old, "new": new}, 3, fake, ["--log", str(log)], emit=lines.append)
    assert log.read_text().split() == ["old", "new"] * 3          # each run a fresh process, in this order
    assert [l["contender"] for l in lines[:-1]] == ["old", "new"] * 3
    assert [l["round"] for l in lines[:-1]] == [0, 0, 1, 1, 2, 2]
    assert lines[-1] is s and s["order"] == ["old", "new"] * 3
    assert s["medians"]["old"]["train_steady_s"] == 20.0
    assert s["medians"]["new"]["train_steady_s"] == 6.0
    assert s["ratio_new_over_old"]["train_steady_s"] == pytest.approx(0.3)
    assert s["ratio_new_over_old"]["load_s"] == pytest.approx(1.0)
    assert "flag" not in s["medians"]["old"]                      # only *_s figures are summarised
    assert s["same_work"]["train_loss_last"]["max_abs_diff"] == pytest.approx(1e-3)
    assert s["runs"] == {"old": 3, "new": 3} and s["cpu"] and s["date"]
    assert not any("device" in w for w in s["warnings"])


def test_wrong_tree_and_failed_run_are_errors(tmp_path, fake, monkeypatch):
    old = _tree(tmp_path, "old", [1.0])
    bad = _tree(tmp_path, "bad", [1.0], fail=True)
    with pytest.raises(RuntimeError, match="workload failed against .*bad.*exit 3"):
        ab.run_one(bad, fake, ["--log", str(tmp_path / "l")])
    # more than one jax device is not the demo's setting: the summary says so
    fake_run = lambda root, w, args, nice: {"devices": 8, "x_s": 1.0}
    s = ab.run_ab({"old": old, "new": old}, 1, fake, [], emit=lambda d: None, runner=fake_run)
    assert any("more than one jax device" in w for w in s["warnings"])
    # a run whose jaxpoison came from elsewhere than its tree is refused
    other = _tree(tmp_path, "other", [1.0])
    monkeypatch.setattr(ab, "BOOT", ab.BOOT.replace("sys.path.insert(0, root)", f"sys.path.insert(0, {str(other)!r})"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with pytest.raises(RuntimeError, match="imported jaxpoison from .*other"):
        ab.run_one(old, fake, ["--log", str(tmp_path / "l2")])


def test_schedule_and_cli_errors(tmp_path):
    assert ab.schedule(2) == [(0, "old"), (0, "new"), (1, "old"), (1, "new")]
    with pytest.raises(ValueError, match="rounds"):
        ab.schedule(0)
    with pytest.raises(SystemExit, match="no jaxpoison/__init__.py"):
        ab.main(["--old", str(tmp_path), "--rounds", "1"])
