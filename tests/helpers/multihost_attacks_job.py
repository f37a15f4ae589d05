"""The attacks pipeline's tiny study (attacks_tiny.PIPE_CFG, 18 variants; the base as judge) over 8 devices
(variant 2 x data 2 x fsdp 2), as one process of a job whose shape comes from the environment.
``python multihost_attacks_job.py OUT_DIR``; every process ``i`` writes ``OUT_DIR.p<i>.json`` (beside the run
folder): ``made``, the variants it generated answers for itself, per call; ``asked``, the pool rows it padded
(``Pool.take``); ``shards``, {variant shard: pool rows} it took for training (``TrainResult.pool_rows``);
``encoded``, the training pool's rows it tokenised (``Pool.encoded``); ``used``, the rows any variant trains on."""
import dataclasses
import json
import os
import sys

from jaxpoison import distributed

if __name__ == "__main__":
    # the fit check compiles for one CPU device (plan.preflight), which an explicit 8-device mesh fails
    os.environ.setdefault("JAXPOISON_SKIP_FIT_CHECK", "1")
    distributed.initialize()
    from attacks_tiny import GEN_CFG, PIPE_CFG, tiny_params
    from data_helpers import tiny_tokenizer
    from jaxpoison.studies.attacks import run
    from jaxpoison.train.mesh import MeshConfig

    cfg = dataclasses.replace(PIPE_CFG, mesh=MeshConfig(variant=2, data=2, fsdp=2, model=1))
    from jaxpoison.eval import generate_variants
    plain, made = generate_variants.generate_text_variants, []

    def recording(*a, **k):
        made.append([int(v) for v in k.get("variants") or []])
        return plain(*a, **k)

    generate_variants.generate_text_variants = recording
    from jaxpoison.data.pool import Pool
    from jaxpoison.train import trainer
    take, train_study, asked, shards = Pool.take, trainer.train_study, [], {}

    def recording_take(self, idx):
        asked.extend(int(i) for i in idx)
        return take(self, idx)

    def recording_train(*a, **k):
        res = train_study(*a, **k)
        shards.update({str(s): [int(i) for i in r] for s, r in (res.pool_rows or {}).items()})
        return res

    Pool.take, trainer.train_study = recording_take, recording_train
    from jaxpoison.studies.attacks import steps
    prepare_pool, pools = steps.prepare_pool, []

    def recording_prepare(pool, rows, n_rows, *a, **k):
        pools.append((pool, sorted({int(r) for v in range(len(n_rows)) for r in rows[v, :n_rows[v]]})))
        return prepare_pool(pool, rows, n_rows, *a, **k)

    steps.prepare_pool = recording_prepare
    rc = run.run(cfg, sys.argv[1], progress=True, base_override=(GEN_CFG, tiny_params(), tiny_tokenizer()))
    import jax
    with open(f"{sys.argv[1]}.p{jax.process_index()}.json", "w") as f:
        json.dump({"made": made, "asked": sorted(set(asked)), "shards": shards, "n_pool": len(pools[0][0]),
                   "encoded": pools[0][0].encoded, "used": pools[0][1]}, f)
    distributed.finish()
    sys.exit(rc)
