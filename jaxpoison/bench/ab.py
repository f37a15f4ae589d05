"""Side-by-side A/B of two jaxpoison trees on one workload: old, new, old, new, ... each in a fresh process.

    python -m jaxpoison.bench.ab --old /path/to/old/tree --rounds 3 -- [workload args]

``--old`` / ``--new`` are repository roots (folders holding ``jaxpoison/``); ``--new`` defaults to the tree this
file is in. Each run is ``python -c BOOT WORKLOAD ARGS`` with the contender's root as working directory and first
on ``sys.path``, so ``import jaxpoison`` finds that tree; the workload (default :mod:`.ab_workload` of the *new*
tree, the same file for both) reports where ``jaxpoison`` came from and the runner refuses a run that imported
the wrong tree. Every run prints one JSON line (``{"ab_run": i, "contender": ..., ...the workload's line}``), then
one summary line: per contender the median of every ``*_s`` figure, the ratio new / old of each, the largest
difference between the two trees' loss and score checksums (same work: it should be ~0), the CPU model, the
core count, the load average before and after, and the date. Alternating in separate processes puts both trees
under the same drift of a shared machine and gives each a cold start, as a real run has.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

HERE = pathlib.Path(__file__).resolve()
DEFAULT_WORKLOAD = HERE.with_name("ab_workload.py")
THIS_TREE = HERE.parents[2]
MARK = "ab_workload"
CHECKS = ("train_loss_first", "train_loss_last", "score_checksum")     # equal work in both trees

BOOT = ("import runpy, sys; root, path = sys.argv[1], sys.argv[2]; sys.path.insert(0, root); "
        "sys.argv = [path] + sys.argv[3:]; runpy.run_path(path, run_name='__main__')")


def schedule(rounds: int, contenders=("old", "new")) -> list:
    """The run order: every contender once per round, in the same order each round (old, new, old, new, ...)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    return [(r, c) for r in range(rounds) for c in contenders]


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def git_head(root: pathlib.Path) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        if r.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return r.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def check_tree(root: pathlib.Path, name: str) -> pathlib.Path:
    root = pathlib.Path(root).resolve()
    if not (root / "jaxpoison" / "__init__.py").is_file():
        raise SystemExit(f"--{name} {root}: no jaxpoison/__init__.py there; give the repository root of a "
                         "jaxpoison tree (the folder that holds jaxpoison/)")
    return root


def run_one(root: pathlib.Path, workload: pathlib.Path, args: list, nice: int = 0) -> dict:
    """One fresh process of ``workload`` against the tree at ``root``; its result line as a dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", BOOT, str(root), str(workload), *args]
    t0 = time.time()
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                       preexec_fn=(lambda: os.nice(nice)) if nice else None)
    wall = time.time() - t0
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("{") and f'"{MARK}"' in l), None)
    if p.returncode or line is None:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-25:])
        raise RuntimeError(f"the workload failed against {root} (exit {p.returncode}"
                           f"{', no result line' if line is None else ''}):\n{tail}")
    res = json.loads(line)
    got = res.get("jaxpoison")
    if got is not None and not pathlib.Path(got).resolve().is_relative_to(root):
        raise RuntimeError(f"the run meant for {root} imported jaxpoison from {got}: an installed copy shadows "
                           "the tree; run from a virtualenv whose jaxpoison is an editable install, or unset "
                           "PYTHONPATH entries that point at another tree")
    res["process_wall_s"] = wall
    return res


def summarize(records: list, contenders=("old", "new")) -> dict:
    """Medians of every ``*_s`` figure per contender, new/old ratios, and the checks' largest differences."""
    by = {c: [r for r in records if r["contender"] == c] for c in contenders}
    keys = sorted({k for r in records for k, v in r.items()
                   if k.endswith("_s") and isinstance(v, (int, float)) and not isinstance(v, bool)})
    med = {c: {k: statistics.median(r[k] for r in rs if k in r) for k in keys if any(k in r for r in rs)}
           for c, rs in by.items()}
    a, b = contenders
    ratio = {k: med[b][k] / med[a][k] for k in keys if k in med[a] and k in med[b] and med[a][k] > 0}
    checks = {}
    for k in CHECKS:
        va = [r[k] for r in by[a] if isinstance(r.get(k), (int, float))]
        vb = [r[k] for r in by[b] if isinstance(r.get(k), (int, float))]
        if va and vb:
            checks[k] = {a: statistics.median(va), b: statistics.median(vb),
                         "max_abs_diff": max(abs(x - y) for x in va for y in vb)}
    return {"medians": med, f"ratio_{b}_over_{a}": ratio, "runs": {c: len(rs) for c, rs in by.items()},
            "same_work": checks}


def run_ab(trees: dict, rounds: int, workload: pathlib.Path, args: list, *, nice: int = 0,
           emit: Callable[[dict], None] = lambda d: print(json.dumps(d), flush=True),
           runner: Callable = run_one) -> dict:
    """Alternate the contenders of ``trees`` ({name: root}, in run order) for ``rounds`` rounds; emit every run's
    line and return (and emit) the summary."""
    load0 = os.getloadavg()
    t0 = time.time()
    records = []
    for i, (r, c) in enumerate(schedule(rounds, tuple(trees))):
        res = runner(trees[c], workload, args, nice)
        rec = {"ab_run": i, "round": r, "contender": c, "tree": str(trees[c]), **res}
        records.append(rec)
        emit(rec)
    warnings = []
    if any(int(r.get("devices", 1)) > 1 for r in records):
        warnings.append("runs saw more than one jax device (XLA_FLAGS --xla_force_host_platform_device_count?): "
                        "the demo on CPU has one; unset it")
    if load0[0] > 1.5:
        warnings.append(f"load average {load0[0]:.1f} at the start: the machine was not quiet")
    summary = {"ab_summary": 1, "workload": str(workload), "args": args, "rounds": rounds,
               "order": [c for _, c in schedule(rounds, tuple(trees))], "trees": {c: str(p) for c, p in trees.items()},
               "commits": {c: git_head(pathlib.Path(p)) for c, p in trees.items()},
               **summarize(records, tuple(trees)), "cpu": cpu_model(), "cores": os.cpu_count(),
               "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
               "wall_s_all": round(time.time() - t0, 1), "warnings": warnings,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    emit(summary)
    return summary


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m jaxpoison.bench.ab", description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to the workload (python jaxpoison/bench/ab_workload.py "
                                       "--help lists them).")
    p.add_argument("--old", required=True, help="repository root of the old tree")
    p.add_argument("--new", default=str(THIS_TREE), help="repository root of the new tree (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="the script both trees run")
    p.add_argument("--nice", type=int, default=0, help="niceness of the runs (a shared machine)")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    workload = pathlib.Path(a.workload).resolve()
    if not workload.is_file():
        p.error(f"--workload {workload}: no such file")
    trees = {"old": check_tree(a.old, "old"), "new": check_tree(a.new, "new")}
    if trees["old"] == trees["new"]:
        print("note: --old and --new are the same tree (an A/A run: the ratio shows the noise)", file=sys.stderr)
    try:
        run_ab(trees, a.rounds, workload, rest, nice=a.nice)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
