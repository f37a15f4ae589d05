"""Mesh sizes from config: 'auto' uses every accelerator (variants first, then fsdp for a base too large for one
chip); explicit sizes are checked with errors that say what to set; logical-axis rules give the specs."""
import pytest
from jax.sharding import PartitionSpec as P

from jaxpoison.models.sharding import DEFAULT_RULES, Rules, adapter_axes, param_axes
from jaxpoison.train.mesh import MeshConfig, resolve

GB = 1 << 30


class FakeChip:
    """A device as resolve() sees it: a platform and, maybe, memory stats."""
    def __init__(self, platform="tpu", limit=16 * GB):
        self.platform, self.limit = platform, limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit}


def chips(n, **kw):
    return [FakeChip(**kw) for _ in range(n)]


def test_auto_puts_variants_first():
    mc = resolve(MeshConfig(), n_variants=16, batch_size=8, base_bytes=1 * GB, devices=chips(8))
    assert (mc.variant, mc.data, mc.fsdp, mc.model) == (8, 1, 1, 1)


def test_auto_spreads_what_variants_cannot_use_over_the_batch_then_fsdp():
    mc = resolve(MeshConfig(), n_variants=2, batch_size=2, base_bytes=1 * GB, devices=chips(8))
    assert (mc.variant, mc.data, mc.fsdp, mc.model) == (2, 2, 2, 1)


def test_auto_adds_fsdp_for_a_base_that_does_not_fit_one_chip():
    # 16 GB of weights on 16 GB chips: at most half a chip for the base -> split over 2 first, then variants
    mc = resolve(MeshConfig(), n_variants=8, batch_size=8, base_bytes=16 * GB, devices=chips(8))
    assert (mc.variant, mc.fsdp) == (4, 2) and mc.size == 8
    # a backend that reports no memory counts as fitting
    mc = resolve(MeshConfig(), n_variants=8, batch_size=8, base_bytes=16 * GB, devices=chips(8, limit=None))
    assert (mc.variant, mc.fsdp) == (8, 1)


def test_explicit_sizes_are_kept_and_auto_fills_the_rest():
    mc = resolve(MeshConfig(fsdp=4), n_variants=16, batch_size=8, devices=chips(8))
    assert (mc.variant, mc.data, mc.fsdp, mc.model) == (2, 1, 4, 1)


def test_auto_on_cpu_is_one_device():
    mc = resolve(MeshConfig(), n_variants=16, batch_size=8, devices=chips(8, platform="cpu"))
    assert mc.size == 1


def test_mesh_errors_name_the_axis_and_the_fix():
    with pytest.raises(ValueError, match="product of the mesh sizes must divide the device count"):
        resolve(MeshConfig(variant=3), n_variants=3, batch_size=8, devices=chips(8))
    with pytest.raises(ValueError, match="needs 16 devices"):
        resolve(MeshConfig(variant=16), n_variants=16, batch_size=8, devices=chips(8))
    with pytest.raises(ValueError, match="variant_chunk"):
        resolve(MeshConfig(variant=8), n_variants=4, batch_size=8, devices=chips(8))
    with pytest.raises(ValueError, match="mesh.data to a divisor of 6"):
        resolve(MeshConfig(data=4), n_variants=4, batch_size=6, devices=chips(8))
    with pytest.raises(ValueError, match="positive int or 'auto'"):
        MeshConfig(fsdp="all")


def test_rules_map_logical_names_to_mesh_axes():
    r = Rules(DEFAULT_RULES, (("variant", 2), ("data", 1), ("fsdp", 2), ("model", 2)))
    # column-parallel kernel: stored over fsdp (in) and model (out); used gathered over fsdp only
    names = param_axes(("layers", "q", "kernel"), 3)
    assert names == ("layers", "embed", "heads")
    assert r.spec(names, (4, 32, 64)) == P(None, "fsdp", "model")
    assert r.gathered(names[1:], (32, 64)) == P(None, "model")
    assert r.spec(param_axes(("layers", "down", "kernel"), 3), (4, 64, 32)) == P(None, "model", "fsdp")
    # a dim the axis does not divide stays whole (a vocabulary of 97)
    assert r.spec(param_axes(("embed", "embedding"), 2), (97, 32)) == P(None, "fsdp")
    # the batch of activations over data and fsdp (axes of size 1 are left out)
    assert r.spec(("act_batch", "act_length"), (8, 16)) == P("fsdp")
    # a quantised kernel's leaves (under .../kernel) take the kernel's names, cut to their ndim
    assert param_axes(("layers", "q", "kernel", "scale"), 2) == ("layers", "embed")
    # adapters follow the base's tensor-parallel side and are not stored over fsdp
    assert r.spec(("variant",) + adapter_axes("q", "b", 3), (2, 4, 4, 64)) == P("variant", None, None, "model")
    assert r.spec(("variant",) + adapter_axes("q", "a", 3), (2, 4, 32, 4)) == P("variant")
    assert r.spec(("variant",) + adapter_axes("o", "a", 3), (2, 4, 64, 4)) == P("variant", None, "model")
