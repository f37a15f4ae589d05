"""The tiny study of resume_job.py with 8 variants split over 8 devices, as one process of a job whose shape
comes from the environment (one process with 8 CPU devices, or several with fewer: JAXPOISON_* or SLURM_*).
``python multihost_train_job.py RUN_DIR OUT.npz``; process 0 writes OUT.npz (adapters, resume step); every
process ``i`` writes ``OUT.p<i>.json`` (outside the run folder): the pool rows it tokenised (``encoded``) and
padded for the trainer (``asked``), the variant shards it took them for, the shapes of its addressable pool
shards, and the pool's statistics and hash. The pool is a lazy :class:`jaxpoison.data.pool.Pool` of the tiny
pool's rows written as text (a token per word, eos appended), prepared as a study prepares it
(:func:`jaxpoison.studies.common.prepare_pool`)."""
import json
import sys

import numpy as np

from jaxpoison import distributed

if __name__ == "__main__":
    run_dir, out = sys.argv[1], sys.argv[2]
    distributed.initialize()
    import dataclasses
    from resume_job import ST
    # two epochs (6 steps, checkpoints at 2, 4, 6): a kill after step 4 still leaves 2 steps to resume
    ST = dataclasses.replace(ST, tcfg=dataclasses.replace(ST.tcfg, epochs=2))
    from tiny import tiny_base, tiny_study
    from jaxpoison.train.mesh import MeshConfig
    from jaxpoison.train.trainer import train_study

    from jaxpoison.data.pool import tokenize_pool
    from jaxpoison.data.schema import SeqRow
    from jaxpoison.studies.common import prepare_pool
    from jaxpoison.train import trainer
    full = tiny_study(V=8, R=48)        # 48 rows: each variant draws 12, so a process's 4 variants miss some

    class WordTokenizer:                # "17 5 40" -> [17, 5, 40]
        eos_token_id, pad_token_id, bos_token_id = 1, 0, None

        def encode(self, text, add_special_tokens=False):
            return [int(w) if w.isdigit() else 2 for w in text.split()]

    texts = []
    for r in range(len(full.tokens)):
        words, n = full.tokens[r][full.attn_mask[r]].tolist(), int(full.attn_mask[r].sum())
        start = int(np.argmax(full.loss_mask[r] > 0))
        texts.append(SeqRow(f"row{r}", " ".join(map(str, words[:start])), " ".join(map(str, words[start:n - 1])), {}))
    pool = tokenize_pool(texts, WordTokenizer(), max_len=16, buckets=(16,), lazy=True)
    mesh = MeshConfig(variant=8, data=1, fsdp=1, model=1)
    prepare_pool(pool, full.rows, full.n_rows, ST.tcfg, mesh, tiny_base())
    asked = []

    def row_source(idx):                # the trainer pads the rows it takes (its own variant shards')
        asked.extend(int(i) for i in idx)
        return pool.take(idx)

    sd = trainer.StudyData(None, None, None, full.rows, full.n_rows, full.table, pool.data_hash,
                           row_source=row_source)
    shapes = []
    place = trainer.place_pool

    def recording_place(*a, **k):
        pool, taken = place(*a, **k)
        shapes.extend(list(sh.data.shape) for sh in getattr(pool.tokens, "addressable_shards", []))
        return pool, taken

    trainer.place_pool = recording_place
    res = train_study(tiny_base(), ST, sd, run_dir=run_dir, progress=False,
                      mesh=mesh)
    with open(f"{out}.p{distributed.process_index()}.json", "w") as f:
        json.dump({"asked": sorted(set(asked)), "shards": {str(s): r.tolist() for s, r in res.pool_rows.items()},
                   "shard_shapes": shapes, "encoded": pool.encoded, "stats": pool.stats, "hash": pool.data_hash}, f)
    if distributed.is_writer():
        np.savez(out, **{f"{m}.{k}": np.asarray(x) for m, ab in res.lora.items() for k, x in ab.items()},
                 resumed=np.int32(-1 if res.resumed_from is None else res.resumed_from),
                 processes=np.int32(distributed.process_count()))
    distributed.finish()
