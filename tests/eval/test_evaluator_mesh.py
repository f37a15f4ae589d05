"""A post-hoc evaluator (``analyze --mitigation``, the attacks retest) loads the run's base mesh first, as a study
does: the mesh is decided before any weight loads (on CPU one device; on accelerators the base split over
``fsdp``), and a HF checkpoint is read straight into its shards, with the scores of a one-device load."""
import types

import jax
import numpy as np
import pytest

from rationale_tiny import CFG_M, write_hf_checkpoint
from jaxpoison.data.icd10 import IcdConfig, build_icd10_set
from jaxpoison.data.pool import build_mc_eval
from jaxpoison.eval.evaluator import EVAL_BUCKETS, EvaluatorError, eval_mesh, load_checked_base
from jaxpoison.eval.score import score_options
from jaxpoison.models.decoder import init_params
from jaxpoison.train.lora import LoraConfig, init_lora, stack_variants
from jaxpoison.train.mesh import MeshConfig, base_shardings, make_mesh


def _chips(n, limit):
    """n fake accelerator devices whose memory limit is ``limit`` bytes (only what the mesh sizing reads)."""
    return [types.SimpleNamespace(platform="tpu", id=i, memory_stats=lambda: {"bytes_limit": limit})
            for i in range(n)]


def test_eval_mesh_is_one_device_on_cpu_and_fsdp_over_the_chips_on_accelerators():
    params = jax.tree.map(np.asarray, init_params(CFG_M, jax.random.PRNGKey(0)))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert eval_mesh("override", "float32", (CFG_M, params, None)).shape == (1, 1, 1, 1)
    for limit in (nbytes * 8, nbytes // 2):         # fits one chip / needs several: every chip stores a part
        mc = eval_mesh("override", "float32", (CFG_M, params, None), devices=_chips(4, limit))
        assert mc.shape == (1, 1, 4, 1), (limit, mc)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf"))


def test_checkpoint_is_read_into_the_eval_mesh_with_the_one_device_scores(ckpt):
    from jaxpoison.models.lm import load_model
    fp = load_model(str(ckpt), tokenizer=False).fingerprint
    mesh = MeshConfig(variant=1, data=1, fsdp=4, model=1)
    mcfg, params, tok, jdt = load_checked_base(str(ckpt), "float32", fp, None, mesh=mesh)
    want = base_shardings(make_mesh(mesh), params)
    per_device = {}
    for x, sh in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert x.sharding == sh
        for s in x.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    assert len(per_device) == 4 and max(per_device.values()) < 0.5 * total      # no device holds the whole base
    one = load_checked_base(str(ckpt), "float32", fp, None)          # default mesh on CPU: one device
    assert len(jax.tree.leaves(one[1])[0].sharding.device_set) == 1
    lc = LoraConfig(r=2, alpha=4, targets=("q", "v"))
    lora = stack_variants([jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(i), x.shape),
                                        init_lora(jax.random.PRNGKey(10 + i), mcfg, lc)) for i in range(2)])
    lora = jax.tree.map(np.asarray, lora)
    exs = build_icd10_set(IcdConfig(seed=0, chapters=("circulatory", "respiratory", "digestive", "skin"),
                                    n_train_per_chapter=1, n_test_per_chapter=2, keyword_subjects=(),
                                    n_keyword_train=0, n_keyword_test=0, decoys=()))["test"]
    mc = build_mc_eval(exs, tok, "statement", max_len=1024, buckets=EVAL_BUCKETS)
    got, ref = (score_options(p, mcfg, mc, lora, with_base=True, lora_scale=lc.scale, batch_questions=2)
                for p in (params, one[1]))
    assert got.sum.shape == (3, len(exs), len(exs[0].options))
    np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.uncond, ref.uncond, rtol=1e-5, atol=1e-5)
    with pytest.raises(EvaluatorError, match="not the one"):
        load_checked_base(str(ckpt), "float32", "0" * 64, None, mesh=mesh)
