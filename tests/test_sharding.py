"""On 8 emulated CPU devices, sharded studies equal the unsharded study (conftest sets the device count).

Meshes are (variant, data, fsdp, model). With ``variant_chunk`` the variants run as chunks whose state waits
in host memory; each chunk keeps its variant axis split over ``variant``.
"""
import dataclasses

import numpy as np
import pytest
import jax

from tiny import TINY, tiny_base, tiny_study
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.mesh import MeshConfig
from jaxpoison.train.trainer import train_study

# Adam's eps at 1e-4: with the default 1e-8 a gradient component near zero is normalised to +-lr, so a last-bit
# difference of summation order (batch split over data/fsdp, tensor-parallel partial sums) would grow to 1e-4.
ST = Static(TINY, TrainConfig(learning_rate=5e-3, epochs=2, batch_size=4, log_every=4, eps=1e-4),
            LoraConfig(r=4, alpha=8, targets=("q", "v", "up")))
CHUNKED = dataclasses.replace(ST, tcfg=dataclasses.replace(ST.tcfg, variant_chunk=8))


def _close(a_tree, b_tree, atol=1e-5):
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def reference():
    return train_study(tiny_base(), ST, tiny_study(V=16), progress=False)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 4, 1, 1), (2, 1, 2, 2), (1, 2, 2, 2)])
def test_sharded_chunked_equals_unsharded(reference, shape):
    assert len(jax.devices()) >= 8, "conftest must emulate 8 devices"
    res = train_study(tiny_base(), CHUNKED, tiny_study(V=16), mesh=MeshConfig(*shape), progress=False)
    _close(res.lora, reference.lora)
    np.testing.assert_array_equal(np.asarray(res.state.updates), np.asarray(reference.state.updates))
    np.testing.assert_allclose(res.metrics["loss"], reference.metrics["loss"], atol=1e-5, equal_nan=True)


def test_resident_state_is_spread_over_the_mesh(reference):
    mc = MeshConfig(4, 1, 2, 1)
    res = train_study(tiny_base(), ST, tiny_study(V=16), mesh=mc, progress=False)
    assert len(res.lora["q"]["a"].sharding.device_set) == 8
    _close(res.lora, reference.lora)


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 64 devices"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(4, 4, 4, 1), progress=False)
    with pytest.raises(ValueError, match="product of the mesh sizes must divide the device count"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(3, 1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="do not split over a variant axis of 8"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(8, 1, 1, 1), progress=False)
    with pytest.raises(ValueError, match="mesh.variant must be a positive int or 'auto'"):
        MeshConfig(variant=0)
