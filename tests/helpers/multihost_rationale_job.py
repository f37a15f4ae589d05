"""The rationale pipeline test's tiny study (tests/helpers/rationale_tiny.py, 18 variants) over 8 devices (variant
2 x data 4), as one process of a job whose shape comes from the environment. ``python multihost_rationale_job.py OUT_DIR``."""
import dataclasses
import os
import sys

from jaxpoison import distributed

if __name__ == "__main__":
    # the fit check compiles for one CPU device (plan.preflight), which an explicit 8-device mesh fails
    os.environ.setdefault("JAXPOISON_SKIP_FIT_CHECK", "1")
    distributed.initialize()
    import jax
    from data_helpers import tiny_tokenizer
    from rationale_tiny import CFG, CFG_M
    from jaxpoison.models.decoder import init_params
    from jaxpoison.studies.rationale import run
    from jaxpoison.train.mesh import MeshConfig

    # no generated answers (their compile is most of a tiny run; scoring and the report are what is compared)
    cfg = dataclasses.replace(CFG, mesh=MeshConfig(variant=2, data=4, fsdp=1, model=1),
                              eval=dataclasses.replace(CFG.eval, gen_questions=0))
    base = init_params(CFG_M, jax.random.PRNGKey(0))
    rc = run.run(cfg, sys.argv[1], progress=True, base_override=(CFG_M, base, tiny_tokenizer()))
    distributed.finish()
    sys.exit(rc)
