"""The base model loaded straight into its shards on a mesh: a study's (``studies.common`` re-exports these, with
the mesh resolved from the study's config) and a post-hoc evaluator's (:mod:`jaxpoison.eval.evaluator`)."""
from __future__ import annotations

import numpy as np


def load_base(model: str, dtype: str, base_override=None, quant: str = "none", mesh=None):
    """A base model (a study's, a post-hoc evaluator's) as an :class:`jaxpoison.models.lm.LM`;
    ``base_override`` = (model cfg, params, tokenizer) replaces it (tests use tiny random models; its name is
    ``override``, fingerprint empty). ``quant`` other than 'none' quantises the decoder layers' kernels
    (:mod:`jaxpoison.models.quant`); the fingerprint stays that of the weights, the run's config records ``quant``.

    ``mesh``: a resolved :class:`jaxpoison.train.mesh.MeshConfig` (a study's:
    :func:`jaxpoison.studies.common.resolve_mesh`; an evaluator's: :func:`jaxpoison.eval.evaluator.eval_mesh`).
    Over more than one device every array goes straight into the sharding the trainer gives the base on that
    mesh (:func:`jaxpoison.train.mesh.base_shardings`: split over ``fsdp`` and ``model``): a safetensors
    checkpoint is read into it slice by slice, the embedded GGUF placed into it, so no device holds the whole
    base unless the mesh says so. None or one device: this process's first device, as before.

    A multi-host job passes the global mesh (every process's devices): each process's callbacks read only the
    byte ranges of its own devices' shards, and the embedded GGUF (dequantised on each host) or an override is
    placed from the host copy the same way (``jax.make_array_from_callback``), so no process puts the whole
    base on its devices. Phases that run per process (scoring blocks, generation, process 0's writer-only
    phases) take a copy on the process's own devices: :func:`jaxpoison.studies.common.process_local`."""
    import jax
    import jax.numpy as jnp
    from jaxpoison.models.lm import LM, load_model
    from jaxpoison.models.quant import kernel_transform, quantize_base
    from jaxpoison.train.mesh import base_shardings, make_mesh
    jmesh = make_mesh(mesh) if mesh is not None and mesh.size > 1 else None
    if base_override is None:       # each kernel is quantised as it is placed: never the whole float base at once
        shardings = None if jmesh is None else base_shardings(jmesh, base_abstract(model, dtype))
        transform = None if quant == "none" else kernel_transform(quant)
        if transform is not None and jmesh is not None:
            # one kernel's quantisation (its collectives) in flight at a time: emulated CPU devices deadlock
            # on several collective programs at once
            transform = (lambda t: lambda path, x: jax.block_until_ready(t(path, x)))(transform)
        return load_model(model, dtype, sharding=shardings, transform=transform)
    mcfg, params, tok = base_override
    if jmesh is not None:
        params = place_from_host(params, base_shardings(jmesh, params))
    return LM(mcfg, quantize_base(params, quant), tok, "override", "", jnp.float32)


def place_from_host(tree, shardings):
    """Arrays (host or device) of ``tree`` into ``shardings`` through ``jax.make_array_from_callback``: each
    process puts only its own devices' shards, so it works on a mesh over several processes (every process
    holds the same values)."""
    import jax
    host = jax.tree.map(np.asarray, tree)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]), host, shardings)


def base_abstract(model: str, dtype: str):
    """The float base tree of ``model`` as ShapeDtypeStructs, from its config alone (the loader's layout)."""
    from jaxpoison.models import hf
    from jaxpoison.models.lm import EMBEDDED, parse_dtype
    if model in EMBEDDED:
        from jaxpoison.models.gguf import GGUFFile, find_embedded_gguf, gguf_config
        mcfg = gguf_config(GGUFFile(find_embedded_gguf()))
    else:
        mcfg = hf.read_hf_config(hf.resolve_model_dir(model), name=model)
    return hf.abstract_base(mcfg, parse_dtype(dtype))
