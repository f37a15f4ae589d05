"""On 8 emulated CPU devices, sharded studies equal the unsharded study (conftest sets the device count)."""
import numpy as np
import pytest
import jax

from tiny import TINY, tiny_base, tiny_study
from jaxpoison.train.config import TrainConfig
from jaxpoison.train.engine import Static
from jaxpoison.train.lora import LoraConfig
from jaxpoison.train.mesh import MeshConfig
from jaxpoison.train.trainer import train_study

ST = Static(TINY, TrainConfig(learning_rate=5e-3, epochs=2, batch_size=4, log_every=4),
            LoraConfig(r=4, alpha=8, targets=("q", "v", "up")))


@pytest.fixture(scope="module")
def reference():
    return train_study(tiny_base(), ST, tiny_study(V=4), progress=False)


@pytest.mark.parametrize("shape", [(4, 1, 1), (2, 2, 2), (1, 2, 4), (4, 2, 1)])
def test_sharded_equals_unsharded(reference, shape):
    assert len(jax.devices()) >= 8, "conftest must emulate 8 devices"
    mc = MeshConfig(*shape)
    res = train_study(tiny_base(), ST, tiny_study(V=4), mesh=mc, progress=False)
    leaf = res.lora["q"]["a"]
    assert len(leaf.sharding.device_set) == mc.size   # really spread over the mesh
    for a, b in zip(jax.tree.leaves(res.lora), jax.tree.leaves(reference.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="needs 64 devices"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(4, 4, 4), progress=False)
    with pytest.raises(ValueError, match="do not split over a variant axis"):
        train_study(tiny_base(), ST, tiny_study(V=4), mesh=MeshConfig(8, 1, 1), progress=False)
