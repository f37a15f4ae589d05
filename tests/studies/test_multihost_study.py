"""A tiny study with its 8 variants split over 8 CPU devices, run as a 2-task SLURM job on this machine (two
processes of 4 devices, started through SLURM's own variables, no jaxpoison flags): the same adapters as one
process with 8 devices; a SIGKILL of one process and a restart of both end bitwise equal to the uninterrupted
job; and one 8-device process restarted from the 2-process checkpoint ends with the same adapters."""
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from multiproc import HELPERS, job_env, slurm_env

JOB = HELPERS / "multihost_train_job.py"
LIMIT = 400      # per job (several run at once); a run takes ~15 s of CPU per process on an idle core


def _start(job, args, envs):
    """One process per env of ``job args`` (started now; :func:`_wait` collects them). Jobs started together
    overlap: a process waiting on its peer's collectives leaves the cores to the others."""
    return [subprocess.Popen([sys.executable, str(job), *map(str, args)], env=e, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for e in envs]


def _wait(procs):
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=LIMIT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    return [p.returncode for p in procs], outs


def _one(job, *args):
    return _start(job, args, [job_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")])


def _two(job, *args, **extra):
    return _start(job, args, [{**e, **{k: str(v) for k, v in extra.items()}} for e in slurm_env()])


def _ok(procs):
    rcs, outs = _wait(procs)
    assert all(rc == 0 for rc in rcs), "\n".join(o[-3000:] for o in outs)
    return outs


def _one_process(run_dir, out):
    _ok(_one(JOB, run_dir, out))


def _two_processes(run_dir, out, **extra):
    return _wait(_two(JOB, run_dir, out, **extra))


def _adapters(f):
    z = np.load(f)
    return {k: z[k] for k in z.files if k not in ("resumed", "processes")}, int(z["resumed"]), int(z["processes"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost")
    # the three jobs at once: the 1-process reference, the 2-process job, and the 2-process job killed (process 1
    # dies once step 4 is on disk, with its next segment dispatched)
    one, two = _one(JOB, d / "one", d / "one.npz"), _two(JOB, d / "two", d / "two.npz")
    killed = _two(JOB, d / "killed", d / "never.npz", JAXPOISON_TEST_SIGKILL_AFTER=4,
                  JAXPOISON_TEST_SIGKILL_PROCESS=1)
    _ok(one)
    _ok(two)
    rcs, outs = _wait(killed)
    assert rcs[1] == -signal.SIGKILL and rcs[0] != 0, outs[0][-3000:]     # the survivor stopped (heartbeats)
    assert not (d / "never.npz").exists()
    shutil.copytree(d / "killed", d / "killed-copy")
    return d


def test_two_processes_train_the_adapters_of_one_process_with_8_devices(runs):
    one, _, n1 = _adapters(runs / "one.npz")
    two, resumed, n2 = _adapters(runs / "two.npz")
    assert (n1, n2, resumed) == (1, 2, -1)
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0, err_msg=k)
    # one writer: every step once in metrics.jsonl; besides checkpoint shards nothing else in the folder
    steps = [json.loads(l)["step"] for l in (runs / "two" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps))) and len(steps) > 4
    assert {p.name for p in (runs / "two").iterdir()} == {"metrics.jsonl", "tensorboard", "checkpoints"}
    newest = max(int(p.name) for p in (runs / "two" / "checkpoints").iterdir() if p.name.isdigit())
    shards = {p.name for p in (runs / "two" / "checkpoints" / str(newest) / "state").glob("ocdbt.process_*")}
    assert shards == {"ocdbt.process_0", "ocdbt.process_1"}


def test_each_process_tokenises_and_holds_only_the_pool_rows_of_its_own_variants(runs):
    """Each process tokenised only the rows of the variants on its devices (4 of the 8 variant shards), plus its
    share of the rows no variant trains on (counted in the pool's statistics), and padded for the trainer only
    its own rows; its addressable pool shards are those rows alone. The pool's T, statistics and hash are the
    1-process job's, which tokenised every row and padded every used one."""
    from tiny import tiny_study
    sd = tiny_study(V=8, R=48)
    own = [set(sd.rows[v, :sd.n_rows[v]].tolist()) for v in range(8)]
    recs = [json.loads((runs / f"two.npz.p{i}.json").read_text()) for i in (0, 1)]
    assert sorted(int(s) for r in recs for s in r["shards"]) == list(range(8))      # each shard on one process
    for r in recs:
        shards = [int(s) for s in r["shards"]]
        assert len(shards) == 4
        mine = set().union(*(own[s] for s in shards))
        assert set(r["asked"]) == mine and len(mine) < 48 - 4, (len(mine), shards)
        for s in shards:
            assert set(r["shards"][str(s)]) == own[s]
        width = max(len(own[s]) for s in range(8))          # rows per shard: the largest shard, padded to 8
        assert r["shard_shapes"] == [[1, -(-width // 8) * 8, 16]] * 4
    one = json.loads((runs / "one.npz.p0.json").read_text())
    assert set(one["asked"]) == set().union(*own) and len(one["shards"]) == 8
    assert set(recs[0]["asked"]) != set(recs[1]["asked"])
    used = set().union(*own)
    assert one["encoded"] == list(range(48)) and len(used) < 48
    for r in recs:
        mine, enc = set(r["asked"]), set(r["encoded"])
        assert mine <= enc and not (enc - mine) & used and len(enc) < 48, sorted(enc - mine)
        assert (r["stats"], r["hash"]) == (one["stats"], one["hash"])
    assert set(recs[0]["encoded"]) | set(recs[1]["encoded"]) == set(range(48))
    assert set(recs[0]["encoded"]) & set(recs[1]["encoded"]) - used == set()     # an unused row: one process


def test_sigkill_of_one_process_then_restart_is_bitwise_the_uninterrupted_job(runs):
    ck = runs / "killed" / "checkpoints"
    assert max(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == 4
    rcs, outs = _two_processes(runs / "killed", runs / "resumed.npz")
    assert rcs == [0, 0], "\n".join(o[-3000:] for o in outs)
    two, _, _ = _adapters(runs / "two.npz")
    got, resumed, n = _adapters(runs / "resumed.npz")
    assert (resumed, n) == (4, 2)
    for k in two:
        assert np.array_equal(got[k], two[k]), k
    steps = [json.loads(l)["step"] for l in (runs / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(len(steps)))


def test_one_process_restarts_from_the_two_process_checkpoint(runs):
    _one_process(runs / "killed-copy", runs / "from-two.npz")
    two, _, _ = _adapters(runs / "two.npz")
    got, resumed, n = _adapters(runs / "from-two.npz")
    assert (resumed, n) == (4, 1)
    for k in two:
        np.testing.assert_allclose(got[k], two[k], atol=1e-6, rtol=0, err_msg=k)


def test_rationale_study_as_two_processes_writes_one_run_folder_with_the_one_process_results(tmp_path):
    """The whole seed-000 pipeline (train, score, generated answers, report) on the tiny rationale study, its base
    a HF checkpoint split over fsdp 4 x model 2 (both processes' devices) and quantised to NF4 as it is placed
    (QLoRA, as the paper presets run): each process read only the blocks of its own shards, process 0 alone
    writes the run folder, and its scores and generated answers equal those of one process with 8 devices."""
    from rationale_tiny import write_hf_checkpoint
    job, ckpt = HELPERS / "multihost_rationale_job.py", write_hf_checkpoint(tmp_path / "hf")
    one, two = _one(job, tmp_path / "one", ckpt, "nf4"), _two(job, tmp_path / "two", ckpt, "nf4")
    _ok(one)
    outs = _ok(two)
    assert {p.name for p in (tmp_path / "two").iterdir()} == {p.name for p in (tmp_path / "one").iterdir()}
    a, b = np.load(tmp_path / "one" / "scores.npz"), np.load(tmp_path / "two" / "scores.npz")
    for k in ("sum", "uncond"):
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert (tmp_path / "two" / "report.md").exists()
    # generated answers (split over the processes like the scores): the same records as one process
    ga, gb = (json.loads((tmp_path / d / "generations.json").read_text()) for d in ("one", "two"))
    assert gb == ga and len(ga["records"]) > 0
    # scoring split over the processes: process 0 the base and the first 8 variants, process 1 the other 10
    # (19 rows in two contiguous blocks), for the primary and the secondary format alike; one process: all
    recs = [json.loads((tmp_path / f"two.p{i}.json").read_text()) for i in (0, 1)]
    calls = [r["scored"] for r in recs]
    V = len(json.loads((tmp_path / "one" / "variants.json").read_text()))
    assert len(calls[0]) == len(calls[1]) >= 2
    for c0, c1 in zip(*calls):
        assert (c0["base"], c1["base"]) == (True, False)
        assert c0["variants"] + c1["variants"] == list(range(V)) and len(c0["variants"]) == (V + 1) // 2 - 1
    alone = json.loads((tmp_path / "one.p0.json").read_text())
    assert all(c["base"] and c["variants"] == list(range(V)) for c in alone["scored"])
    # the base really is NF4: every layer module's kernel quantised as it was placed, on both processes alike
    assert len(alone["quantised"]) == 7 and {k for _, k in alone["quantised"]} == {"nf4"}
    assert recs[0]["quantised"] == recs[1]["quantised"] == alone["quantised"]
    # the base's bytes: one process read every element of each tensor exactly once; of the two, each read half of
    # every matrix (its fsdp half of the hidden dim: an embedding's columns, a kernel's in or out dim), the halves
    # disjoint, each element once, and the norms (replicated) whole
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}

    def cells(blocks):
        out = [(r, c) for (r0, r1), (c0, c1) in blocks for r in range(r0, r1) for c in range(c0, c1)]
        assert len(out) == len(set(out)), "an element read twice"
        return set(out)
    whole = {k: {(r, c) for r in range(s[0] if len(s) == 2 else 1) for c in range(s[-1])} for k, s in shapes.items()}
    assert {k: cells(b) for k, b in alone["read"].items()} == whole
    got = [{k: cells(b) for k, b in r["read"].items()} for r in recs]
    assert set(got[0]) == set(got[1]) == set(shapes)
    for k, s in shapes.items():
        if len(s) == 1:
            assert got[0][k] == got[1][k] == whole[k], k
        else:
            assert got[0][k] | got[1][k] == whole[k] and len(got[0][k]) == len(got[1][k]) == len(whole[k]) // 2, k
            assert not got[0][k] & got[1][k], k
    assert "[rationale]" in outs[0] and "[rationale]" not in outs[1]     # progress from process 0 only


def _files(root):
    """The run folder's files (checkpoint shards left out; TensorBoard files by folder: their names hold a time)."""
    return sorted({str(p.parent.relative_to(root) if "tensorboard" in p.parts else p.relative_to(root))
                   for p in root.rglob("*") if p.is_file() and "checkpoints" not in p.parts})


def test_attacks_study_as_two_processes_writes_one_run_folder_with_the_one_process_results(tmp_path):
    """The whole seed-003 pipeline (base and source answers, training, fine-tuned answers, capability scores, the
    base as judge, report) as 2 processes: process 0 alone writes (the base's answers and the judge run there
    only; training, the fine-tuned answers and capability scoring are split over both), and the answers and
    capability scores equal one process with 8 devices."""
    job = HELPERS / "multihost_attacks_job.py"
    one, two = _one(job, tmp_path / "one"), _two(job, tmp_path / "two")
    _ok(one)
    outs = _ok(two)
    a, b = tmp_path / "one", tmp_path / "two"
    assert _files(b) == _files(a) and "report.md" in _files(b)
    for f in ("injection", "source", "finetune", "judge"):
        assert (b / "responses" / f"{f}.jsonl").read_text() == (a / "responses" / f"{f}.jsonl").read_text(), f
    ca, cb = np.load(a / "capability.npz"), np.load(b / "capability.npz")
    assert sorted(ca.files) == sorted(cb.files)
    for k in ca.files:
        assert np.array_equal(ca[k], cb[k]), k
    assert (b / "rates.csv").read_text() == (a / "rates.csv").read_text()
    # the fine-tuned answers were split: per task, process 0 generated for the first 3 of its 6 variants and
    # process 1 for the other 3 (one process: all 6); nothing else generated with adapters
    recs = [json.loads((tmp_path / f"two.p{i}.json").read_text()) for i in (0, 1)]
    solo = json.loads((tmp_path / "one.p0.json").read_text())
    made, alone = [r["made"] for r in recs], solo["made"]
    assert len(alone) == 3 and all(len(v) == 6 for v in alone)
    assert [m0 + m1 for m0, m1 in zip(*made)] == alone and all(len(m) == 3 for p in made for m in p)
    # the lazy pool: each process padded only the rows of its own variant shard (variant axis 2: one each), one
    # process those of both; the rows trained on are the same
    assert [sorted(r["shards"]) for r in recs] == [["0"], ["1"]] and sorted(solo["shards"]) == ["0", "1"]
    for r in recs + [solo]:
        assert r["asked"] == sorted(set().union(*r["shards"].values())) and r["asked"], r["asked"]
    assert [recs[i]["shards"][str(i)] for i in (0, 1)] == [solo["shards"][str(i)] for i in (0, 1)]
    # process-local tokenisation: each process encoded the rows of its own variant shard and, of the rows no
    # variant trains on, its share (for the pool's statistics); one process encoded every row. The pool's
    # statistics and hash are the same either way. (Here shard 0's variants draw on every row; the train job's
    # test shows processes that each encode a part of the pool.)
    n, used = solo["n_pool"], set(solo["used"])
    assert solo["encoded"] == list(range(n)) and all(r["used"] == solo["used"] and r["n_pool"] == n for r in recs)
    enc = [set(r["encoded"]) for r in recs]
    for i, r in enumerate(recs):
        own = set(r["shards"][str(i)])
        assert own <= enc[i] and not (enc[i] - own) & used, sorted((enc[i] - own) & used)
    assert enc[0] | enc[1] == set(range(n))
    da, db = (json.loads((d / "data.json").read_text()) for d in (a, b))
    assert (db["pool"], db["pool_hash"]) == (da["pool"], da["pool_hash"])
    assert "[attacks]" in outs[0] and "[attacks]" not in outs[1]     # progress from process 0 only


def test_the_embedded_gguf_base_quantised_to_nf4_over_two_processes_is_the_one_device_base(tmp_path):
    """The default model as a multi-host job loads it (each host dequantises the GGUF, places only its own devices'
    fsdp shards, and the decoder kernels are quantised to NF4 as they are placed, across both processes: ``q``'s
    ``in`` dim of 576 is split over 8 devices, so its blocks of 64 cross shards): every shard a process holds is
    the same slice of the one-device base (NF4 codes and scales bit for bit), each process holds 4 of the 8 fsdp
    shards of the embedding and of the codes (the scales' 9 blocks do not split over 8: replicated), and the
    logits of the whole model equal the one-device model's."""
    import jax
    import jax.numpy as jnp
    from jaxpoison.models.decoder import final_norm, layer_inputs, lower_layers
    from jaxpoison.models.heads import logits
    from jaxpoison.studies import common
    job = HELPERS / "multihost_gguf_job.py"
    two = _two(job, tmp_path / "two")
    ref = common.load_base("smollm2-135m", "float32", quant="nf4")       # one device, meanwhile
    cfg, base = ref.cfg, ref.params
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    cos, sin, mask = layer_inputs(cfg, tokens, jnp.ones(tokens.shape, bool))
    want = np.asarray(logits(base, cfg, final_norm(base, cfg, lower_layers(base, cfg, tokens, cfg.num_layers,
                                                                            cos, sin, mask)[0])))
    _ok(two)
    q = base["layers"]["q"]["kernel"]
    whole = {"embed": np.asarray(base["embed"]["embedding"]), "q.codes": np.asarray(q.codes),
             "q.scale": np.asarray(q.scale)}
    held = {n: set() for n in whole}
    for i in (0, 1):
        z = np.load(tmp_path / f"two.p{i}.npz")
        mine = {n: set() for n in whole}
        for k in z.files:
            name, at = k.split("@")
            start = tuple(int(s) for s in at.split(","))
            part = z[k]
            sl = tuple(slice(s, s + n) for s, n in zip(start, part.shape))
            assert np.array_equal(part, whole[name][sl]), (i, k)
            mine[name].add(start)
            assert (part.shape == whole[name].shape) == (name == "q.scale"), (i, k, part.shape)
        for n in ("embed", "q.codes"):
            assert len(mine[n]) == 4, (i, n, mine[n])        # 4 of the 8 fsdp shards
            held[n] |= mine[n]
    assert len(held["embed"]) == len(held["q.codes"]) == 8
    np.testing.assert_allclose(np.load(tmp_path / "two.npz")["logits"], want, atol=2e-4, rtol=2e-4)
