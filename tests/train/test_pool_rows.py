"""process_pool_rows: which pool rows one process encodes (those its variant shards train on) and counts."""
import numpy as np
from tiny import tiny_base, tiny_study

from jaxpoison.train.config import TrainConfig
from jaxpoison.train.mesh import MeshConfig
from jaxpoison.train.trainer import pool_plan, process_pool_rows


def test_one_process_trains_on_the_rows_some_variant_draws_and_counts_every_row():
    sd = tiny_study(V=4, M=6, R=30)
    tcfg = TrainConfig(batch_size=2, epochs=1)
    used = np.unique(np.concatenate([sd.rows[v, :sd.n_rows[v]] for v in range(4)]))
    assert len(used) < 30               # the pool has rows no variant draws
    need, owned = process_pool_rows(sd.rows, sd.n_rows, 30, tcfg, MeshConfig(), tiny_base())
    assert need.tolist() == used.tolist() and owned.tolist() == list(range(30))
    chunks, mc, jmesh, layout = pool_plan(sd.rows, sd.n_rows, tcfg, MeshConfig(), tiny_base())
    assert jmesh is None and layout.S == 1 and layout.shard_rows[0].tolist() == used.tolist()
