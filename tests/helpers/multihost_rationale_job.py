"""The rationale pipeline test's tiny study (tests/helpers/rationale_tiny.py, 18 variants) over 8 devices (variant
2 x data 4), as one process of a job whose shape comes from the environment. ``python multihost_rationale_job.py OUT_DIR``; every process ``i``
writes ``OUT_DIR.p<i>.json``: the base / variants it scored itself, per scoring call."""
import dataclasses
import json
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

    cfg = dataclasses.replace(CFG, mesh=MeshConfig(variant=2, data=4, fsdp=1, model=1))
    base = init_params(CFG_M, jax.random.PRNGKey(0))
    from jaxpoison.eval import score
    plain, scored = score.score_options, []

    def recording(*a, **k):             # what this process scored itself: (base?, variants) per call
        if not (k.get("over_processes") and jax.process_count() > 1):
            lora = a[3] if len(a) > 3 else k.get("lora")
            v = k.get("variants")
            v = list(range(int(jax.tree.leaves(lora)[0].shape[0]))) if v is None and lora is not None else v
            scored.append({"base": bool(k.get("with_base")) or lora is None, "variants": [int(i) for i in v or []]})
        return plain(*a, **k)

    score.score_options = recording
    rc = run.run(cfg, sys.argv[1], progress=True, base_override=(CFG_M, base, tiny_tokenizer()))
    with open(f"{sys.argv[1]}.p{jax.process_index()}.json", "w") as f:     # beside the run folder, not in it
        json.dump(scored, f)
    distributed.finish()
    sys.exit(rc)
