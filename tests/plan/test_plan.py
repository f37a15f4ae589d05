"""The planner: a study's train step compiled ahead of time for an abstract TPU slice (libtpu, no TPU here).

Claims: the plan of a tiny study on v5e:2x2 fits and its JSON figures agree with each other; a study whose base
cannot fit one chip does not fit, exits non-zero and names a setting that makes it fit; the analytic FLOPs equal
XLA's count where the layer scan runs once (and XLA undercounts a deeper scan, which is why they exist); the
analytic memory model stays within its stated tolerance of XLA's per-chip bytes; ``run`` stops such a study
before loading weights.
"""
import io
import json
import contextlib

import pytest

from jaxpoison.cli import main
from jaxpoison.models.config import ModelConfig
from jaxpoison.plan import targets
from jaxpoison.plan.model import memory_model, step_flops
from jaxpoison.plan.program import compile_program, train_program
from jaxpoison.plan.shapes import StudyShape
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.lora import LoraConfig

TINY_HF = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}


def _plan(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["plan", *argv, "--json"])
    return rc, json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_model")
    (d / "config.json").write_text(json.dumps(TINY_HF))
    return d


def test_topology_names_and_aliases():
    assert targets.tpu_target("v5e-8").topology == "v5e:2x4"
    assert targets.tpu_target("v4-8").chips == 4                 # v4-N counts TensorCores, two per chip
    assert targets.tpu_target("v5p:2x2x1").chip.hbm_bytes == 95 * targets.GiB
    with pytest.raises(ValueError, match="unknown TPU topology"):
        targets.tpu_target("v9x:2x2")


@pytest.fixture(scope="module")
def tiny_plan(tiny_dir):
    """One plan of a tiny study on v5e:2x2 with every program compiled (train segment, scoring, generation),
    shared by the tests that read it (each compile costs seconds)."""
    return _plan(["configs/rationale_demo.py", "--set", f"model={tiny_dir}", "--set", "data.max_len=64",
                  "--set", "lora.layers_from=0", "--set", "eval.variant_chunk=2", "--set", "eval.gen_questions=2",
                  "--topology", "v5e:2x2"])


def test_tiny_study_fits_v5e_2x2_and_its_figures_agree(tiny_plan):
    rc, r = tiny_plan
    assert rc == 0 and r["fits"] is True and r["method"] == "xla-compile"
    assert r["topology"] == "v5e:2x2" and r["chips"] == 4 and r["hbm_bytes"] == 16 * targets.GiB
    pc = r["per_chip"]
    assert pc["total"] >= pc["arguments"] + pc["outputs"] - pc["aliased"] + pc["temporaries"]
    assert r["programs"]["train"]["per_chip"] == pc
    assert r["per_chip_bytes"] == max(p["per_chip"]["total"] for p in r["programs"].values())
    assert 0 < r["per_chip_bytes"] <= r["hbm_bytes"]
    assert r["flops_per_step"] == pytest.approx(r["flops_per_variant_step"] * r["variant_chunk"])
    assert r["chip_hours"] == pytest.approx(r["study_hours"] * r["chips"]) and r["chip_hours"] > 0
    assert r["variant_steps"] >= r["variants"] * r["steps_per_variant"]["min"]


def test_plan_compiles_the_scoring_and_generation_programs_with_the_study_shapes(tiny_plan):
    """The study's own eval calls, at its shapes: scoring of the variants, 2 adapters per call (eval.variant_chunk),
    eval.batch_questions questions of 4 options; greedy answers of the base + one variant per cell; each compiled
    for one chip; splash attention now lowers on the train segment's variant-only mesh (no blocked fallback)."""
    from jaxpoison.configs import load_config
    _, r = tiny_plan
    cfg = load_config("configs/rationale_demo.py")
    assert set(r["programs"]) == {"train", "score", "generate"}
    sc, gen = r["programs"]["score"], r["programs"]["generate"]
    assert sc["shape"]["variants"] == 2 and sc["shape"]["total_variants"] == r["variants"]
    assert sc["shape"]["batch"] == cfg.eval.batch_questions and sc["shape"]["options"] == cfg.data.icd.n_options
    assert sc["shape"]["prompt_len"] == 64 and gen["shape"]["new_tokens"] == cfg.eval.gen_tokens
    assert gen["shape"]["variants"] == r["variants"] // len(cfg.grid.seeds) + 1 and gen["shape"]["batch"] == 4
    for e in (sc, gen):
        pc = e["per_chip"]
        assert e["method"] == "xla-compile" and e["fits"] is True
        assert pc["total"] >= pc["arguments"] + pc["temporaries"] > pc["arguments"] > 0
        # the rough estimate (used to size smaller calls) stays within its stated band of the compile
        assert EVAL_ESTIMATE_BAND[0] <= e["estimate"]["total"] / pc["total"] <= EVAL_ESTIMATE_BAND[1], e
    assert r["attention"] == "splash" and not any("does not lower" in n for n in r["notes"])


def test_a_compiled_eval_program_over_memory_gets_a_smaller_call_confirmed_by_compile(tiny_plan, tiny_dir, v5e4):
    """On a chip with just under the tiny scoring call's bytes, the planner compiles smaller calls until one fits
    and names that eval.variant_chunk (the suggestion rests on XLA, not on the estimate)."""
    import dataclasses
    from jaxpoison.configs import load_config
    from jaxpoison.plan.evals import eval_programs
    from jaxpoison.plan.planner import eval_entries
    from jaxpoison.plan.shapes import study_shape
    _, r = tiny_plan
    need = r["programs"]["score"]["per_chip"]["total"]
    cfg = load_config("configs/rationale_demo.py", [f"model={tiny_dir}", "data.max_len=64", "lora.layers_from=0",
                                                   "eval.variant_chunk=2"])
    shape = study_shape(cfg)
    score = [e for e in eval_programs(cfg, shape) if e.name == "score"]
    t = targets.tpu_target("v5e:2x2")
    small = dataclasses.replace(t, chip=dataclasses.replace(t.chip, hbm_bytes=need - 1, usable=1.0))
    out, sugg = eval_entries(shape, small, score, True, v5e4)
    e = out["score"]
    assert e["fits"] is False and e["per_chip"]["total"] == need
    last = e["confirmed_by_compile"][-1]
    assert last["total"] is not None and last["total"] < need and e["largest_call"]["variants"] == last["variants"] < 2
    assert sugg == [s for s in sugg if s.startswith(f"--set eval.variant_chunk={last['variants']}")] and sugg


EVAL_ESTIMATE_BAND = (0.3, 3.0)      # evals.eval_bytes / XLA per-chip total, tiny models (fixed costs dominate)


def test_an_eval_program_that_does_not_fit_fails_the_plan_and_names_its_setting(tmp_path):
    """Training fits but scoring 31 adapters at once over 4096-token prompts does not: the plan fails on that
    program alone and names eval.variant_chunk (estimate path: no compile)."""
    mid = {**TINY_HF, "hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 8,
           "num_attention_heads": 8, "num_key_value_heads": 8}
    (tmp_path / "config.json").write_text(json.dumps(mid))
    rc, r = _plan(["configs/rationale_demo.py", "--set", f"model={tmp_path}", "--set", "data.max_len=64",
                   "--set", "lora.layers_from=0", "--set", "eval.variant_chunk=0", "--eval-prompt-len", "4096",
                   "--topology", "v5e:2x2", "--no-compile"])
    assert rc == 1 and r["fits"] is False
    assert r["programs"]["train"]["fits"] is True and r["programs"]["score"]["fits"] is False
    assert r["programs"]["score"]["shape"]["prompt_len"] == 4096
    v = r["programs"]["score"]["largest_call"]["variants"]
    assert 0 < v < r["programs"]["score"]["shape"]["variants"]
    assert any(s.startswith(f"--set eval.variant_chunk={v}") for s in r["suggestions"]), r["suggestions"]
    assert not any("train.variant_chunk" in s for s in r["suggestions"])


def test_a_base_too_large_for_one_chip_does_not_fit_and_fsdp_is_suggested(tmp_path):
    big = {**TINY_HF, "vocab_size": 1 << 20, "hidden_size": 4096, "intermediate_size": 128,
           "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 1}   # 16 GiB embedding
    (tmp_path / "config.json").write_text(json.dumps(big))
    rc, r = _plan(["configs/rationale_demo.py", "--set", f"model={tmp_path}", "--set", "data.max_len=32", "--set", "lora.layers_from=0",
                   "--set", "mesh.fsdp=1", "--set", "dtype=float32", "--topology", "v5e:2x2", "--no-compile"])
    assert rc == 1 and r["fits"] is False and r["per_chip_bytes"] > r["hbm_bytes"]
    assert any("mesh.fsdp=" in s for s in r["suggestions"]), r["suggestions"]


def _shape(L, T, remat, attention="blocked", B=4, C=4):
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=L,
                      num_heads=4, num_kv_heads=2, head_dim=64, tie_word_embeddings=False, attention=attention)
    tc = TrainConfig(batch_size=B, head_chunk=T, remat=remat, dtype="bfloat16")
    return StudyShape("tiny", cfg, "test", "bfloat16", tc, LoraConfig(r=8, targets=("all",)), (3,) * C, 64, T, 16)


@pytest.fixture(scope="module")
def v5e4():
    return targets.abstract_devices(targets.tpu_target("v5e:2x2"))


@pytest.fixture(scope="module")
def compiled(v5e4):
    """compiled(L, T, remat) -> (Program, Compiled) of the tiny train segment, each shape compiled once per module."""
    memo = {}

    def get(L, T, remat):
        if (L, T, remat) not in memo:
            p = train_program(_shape(L, T, remat), v5e4, 4)
            memo[L, T, remat] = p, compile_program(p)
        return memo[L, T, remat]
    return get


def test_analytic_flops_equal_xla_where_the_layer_scan_runs_once(compiled):
    # one variant per chip: XLA's per-chip count is one variant's step; one layer, one head chunk, no accumulation
    s = _shape(1, 256, remat=False)          # T=256: four attention blocks of 64 under the diagonal
    assert compiled(1, 256, False)[1].flops_xla == pytest.approx(step_flops(s, "blocked"), rel=0.03)
    deep = _shape(2, 256, remat=False)       # the memory test's compile
    assert compiled(2, 256, False)[1].flops_xla < 0.7 * step_flops(deep, "blocked")


MEMORY_TOLERANCE = (0.8, 2.0)      # analytic / XLA per-chip bytes: never under 0.8 (the fit check errs safe)


@pytest.mark.parametrize("remat", [False, True])
def test_analytic_memory_model_within_tolerance_of_the_compile(compiled, remat):
    s = _shape(2, 256, remat=remat)
    p, c = compiled(2, 256, remat)
    m = memory_model(s, p.mesh_config, 4)
    assert m.arguments == pytest.approx(c.arguments, rel=0.05)
    lo, hi = MEMORY_TOLERANCE
    assert lo <= m.total / c.total <= hi, (m, c)


def test_run_stops_a_study_that_cannot_fit_before_loading_weights(tmp_path, monkeypatch, capsys):
    from jaxpoison.plan import preflight
    monkeypatch.setattr(preflight, "host_available_bytes", lambda: 1 << 20)      # a 1 MiB host
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_HF))                        # config only: no weights exist
    rc = main(["run", "configs/rationale_demo.py", "--out", str(tmp_path / "run"), "--set", f"model={d}",
               "--set", "lora.layers_from=0"])
    assert rc == 2 and not (tmp_path / "run").exists()
    err = capsys.readouterr().err
    assert "needs about" in err and "jaxpoison plan" in err


def test_fit_check_on_cpu_counts_the_explicit_mesh(tmp_path):
    """On CPU an explicit mesh over emulated devices is checked against host memory (its devices' shares add up),
    not refused for want of devices; an `auto` mesh is one CPU device."""
    from jaxpoison.configs import load_config
    from jaxpoison.plan import preflight
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_HF))
    sets = [f"model={d}", "lora.layers_from=0"]
    one = preflight.check_fit(load_config("configs/rationale_demo.py", sets))
    four = preflight.check_fit(load_config("configs/rationale_demo.py", sets + ["mesh.variant=2", "mesh.fsdp=2"]))
    assert one["platform"] == four["platform"] == "cpu"
    assert four["analytic_bytes"] > one["analytic_bytes"] > 0     # four devices' shares on one host


_CACHE_PROBE = r"""
import os, sys, jax, jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding
from jaxpoison.plan.program import Program, compile_program
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
entries = lambda: len([n for n in os.listdir(sys.argv[1]) if not n.startswith(".")])
jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((8, 8))).block_until_ready()   # a CPU compile: the cache is in use
n_cpu = entries()
chip = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices[0]
x = jax.ShapeDtypeStruct((128, 128), jnp.float32, sharding=SingleDeviceSharding(chip))
c = compile_program(Program(jax.jit(lambda x: jnp.tanh(x) @ x), (x,), None, None))
n_tpu = entries()
jax.jit(lambda x: jnp.cos(x) @ x)(jnp.ones((8, 8))).block_until_ready()   # and still in use afterwards
print(n_cpu, n_tpu, entries(), c.ok and c.arguments > 0)
"""


def test_compile_program_keeps_abstract_chip_executables_out_of_the_persistent_cache(tmp_path):
    """jax decides once per process whether its persistent cache is used, so switching the flag off around the
    planner's compile is not enough after an earlier compile: the abstract-chip executable used to be serialised
    into the cache. It must not be, and CPU compiles after it must still be cached."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    p = subprocess.run([sys.executable, "-c", _CACHE_PROBE, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    n_cpu, n_tpu, n_after, ok = p.stdout.split()[-4:]
    assert int(n_cpu) >= 1 and ok == "True"
    assert int(n_tpu) == int(n_cpu)            # nothing written for the abstract chip
    assert int(n_after) > int(n_tpu)           # the cache works again for this host's compiles
