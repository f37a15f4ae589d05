"""The rationale pipeline test's tiny study (tests/helpers/rationale_tiny.py, 18 variants) over 8 devices (fsdp 4
x model 2: every leaf split over both processes' devices), its base read from the HF checkpoint HF_DIR
(rationale_tiny.write_hf_checkpoint) by the sharded loader, as one process of a job whose shape comes from the
environment. ``python multihost_rationale_job.py OUT_DIR HF_DIR [QUANT]`` (QUANT: the base's ``quant``, default
'none'; each kernel quantised as it is placed, over both processes' devices); every process ``i`` writes
``OUT_DIR.p<i>.json``:
the base / variants it scored itself, per scoring call (``scored``), and the safetensors blocks it read
(``read``: tensor name -> [[row0, row1], [col0, col1]] per read), and the kernels quantised as they were placed
(``quantised``: [shape, kind] each)."""
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
    from rationale_tiny import CFG
    from jaxpoison.studies.rationale import run
    from jaxpoison.train.mesh import MeshConfig

    cfg = dataclasses.replace(CFG, model=sys.argv[2], mesh=MeshConfig(variant=1, data=1, fsdp=4, model=2),
                              quant=sys.argv[3] if len(sys.argv) > 3 else "none")
    from jaxpoison.models import hf
    read_block, read = hf._read_block, {}

    def recording_read(t, rows, cols, *a, **k):     # the byte ranges this process read: rows x cols of a tensor
        read.setdefault(t.name, []).append([list(rows), list(cols)])
        return read_block(t, rows, cols, *a, **k)

    hf._read_block = recording_read
    from jaxpoison.models import quant
    quantize_kernel, quantised = quant.quantize_kernel, []

    def recording_quantize(x, kind, *a, **k):    # the kernels quantised as they were placed (shape, kind)
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):     # not the planner's abstract ones
            quantised.append([list(x.shape), kind])
        return quantize_kernel(x, kind, *a, **k)

    quant.quantize_kernel = recording_quantize
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
    rc = run.run(cfg, sys.argv[1], progress=True)
    with open(f"{sys.argv[1]}.p{jax.process_index()}.json", "w") as f:     # beside the run folder, not in it
        json.dump({"scored": scored, "read": read, "quantised": quantised}, f)
    distributed.finish()
    sys.exit(rc)
