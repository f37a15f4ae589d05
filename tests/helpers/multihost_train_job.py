"""The tiny study of resume_job.py with 8 variants split over 8 devices, as one process of a job whose shape
comes from the environment (one process with 8 CPU devices, or several with fewer: JAXPOISON_* or SLURM_*).
``python multihost_train_job.py RUN_DIR OUT.npz``; process 0 writes OUT.npz (adapters, resume step)."""
import sys

import numpy as np

from jaxpoison import distributed

if __name__ == "__main__":
    run_dir, out = sys.argv[1], sys.argv[2]
    distributed.initialize()
    from resume_job import ST
    from tiny import tiny_base, tiny_study
    from jaxpoison.train.mesh import MeshConfig
    from jaxpoison.train.trainer import train_study

    res = train_study(tiny_base(), ST, tiny_study(V=8), run_dir=run_dir, progress=False,
                      mesh=MeshConfig(variant=8, data=1, fsdp=1, model=1))
    if distributed.is_writer():
        np.savez(out, **{f"{m}.{k}": np.asarray(x) for m, ab in res.lora.items() for k, x in ab.items()},
                 resumed=np.int32(-1 if res.resumed_from is None else res.resumed_from),
                 processes=np.int32(distributed.process_count()))
    distributed.finish()
