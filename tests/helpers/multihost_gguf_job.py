"""The embedded default model (SmolLM2-135M GGUF, dequantised on each host) loaded as a study loads it over all
devices of a job whose shape comes from the environment (fsdp over all 8 devices), its decoder kernels quantised
to NF4 as they are placed. ``python multihost_gguf_job.py OUT``; process 0 writes ``OUT.npz`` (the logits of a
fixed batch through the whole model); every process ``i`` writes ``OUT.p<i>.npz``: the shards its own devices
hold of the embedding and of the first layer's NF4 ``q`` codes and scales (``<leaf>@<row0>`` by row start)."""
import sys

import numpy as np

from jaxpoison import distributed

if __name__ == "__main__":
    distributed.initialize()
    import jax
    import jax.numpy as jnp
    from jaxpoison.models.decoder import final_norm, layer_inputs, lower_layers
    from jaxpoison.models.heads import logits
    from jaxpoison.studies import common
    from jaxpoison.train.mesh import MeshConfig

    lm = common.load_base("smollm2-135m", "float32", quant="nf4", mesh=MeshConfig(variant=1, data=1, fsdp=8, model=1))
    cfg, base = lm.cfg, lm.params
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)

    @jax.jit
    def forward(base, tokens):
        cos, sin, mask = layer_inputs(cfg, tokens, jnp.ones(tokens.shape, bool))
        h = lower_layers(base, cfg, tokens, cfg.num_layers, cos, sin, mask)[0]
        return logits(base, cfg, final_norm(base, cfg, h))

    from jax.experimental import multihost_utils
    out = np.asarray(multihost_utils.process_allgather(forward(base, tokens), tiled=True))
    q = base["layers"]["q"]["kernel"]
    leaves = {"embed": base["embed"]["embedding"], "q.codes": q.codes, "q.scale": q.scale}
    mine = {}
    for name, x in leaves.items():
        for sh in x.addressable_shards:
            key = f"{name}@{','.join(str(s.start or 0) for s in sh.index)}"
            mine[key] = np.asarray(sh.data)
    np.savez(f"{sys.argv[1]}.p{jax.process_index()}.npz", **mine)
    if distributed.is_writer():
        np.savez(f"{sys.argv[1]}.npz", logits=out)
    distributed.finish()
