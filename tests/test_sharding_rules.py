"""Logical-axis rules map to valid mesh specs; sharded init never needs a replicated copy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fasdiff_jax import sharding
from fasdiff_jax.models import layers


def test_create_mesh_fills_minus_one(devices8):
    mesh = sharding.create_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="needs 12 devices"):
        sharding.create_mesh({"data": 3, "fsdp": 4})


def test_gathered_over_drops_the_batch_axes_from_every_spec(devices8):
    """How the train step uses FSDP params: whole over the batch axes, still split over the
    others (a tuple entry keeps its other axes; a tree keeps its structure)."""
    from jax.sharding import NamedSharding

    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = {"k": NamedSharding(mesh, P(None, None, "fsdp", "tensor")),
            "b": NamedSharding(mesh, P(("data", "fsdp"), "tensor")),
            "r": [NamedSharding(mesh, P())]}
    got = sharding.gathered_over(tree, ("data", "fsdp"))
    assert got["k"].spec == P(None, None, None, "tensor")
    assert got["b"].spec == P(None, "tensor")
    assert got["r"][0].spec == P() and got["k"].mesh is mesh
    assert sharding.gathered_over(tree, ("fsdp",))["b"].spec == P("data", "tensor")


def test_non_divisible_dims_are_replicated(devices8):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
    rules = sharding.DEFAULT_LOGICAL_AXIS_RULES
    assert sharding.logical_to_mesh_spec(layers.CONV_KERNEL_AXES, (3, 3, 64, 32), mesh, rules) == \
        P(None, None, "fsdp", None)
    # 4 input channels split 4 ways is fine; 3 is not -> replicated on that dim.
    assert sharding.logical_to_mesh_spec(layers.CONV_KERNEL_AXES, (3, 3, 3, 32), mesh, rules) == \
        P(None, None, None, None)
    # batch over both axes when divisible by 8, else dropped.
    assert sharding.logical_to_mesh_spec(("batch", None), (16, 5), mesh, rules) == P(("data", "fsdp"), None)
    assert sharding.logical_to_mesh_spec(("batch", None), (6, 5), mesh, rules) == P(None, None)


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.Conv(16, 3, name="conv")(x)
        return layers.Dense(8, name="proj")(x)


def test_init_sharded_places_kernels_on_fsdp(devices8):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 4})
    model = _Tiny()
    x = jnp.ones((8, 8, 8, 4))
    params, shardings = sharding.init_sharded(lambda r: model.init(r, x), mesh,
                                              sharding.DEFAULT_LOGICAL_AXIS_RULES,
                                              jax.random.key(0))
    conv = params["params"]["conv"]["kernel"]
    assert conv.sharding.spec == P(None, None, "fsdp", None)
    assert params["params"]["proj"]["kernel"].sharding.spec == P("fsdp", None)
    ref = nn.unbox(model.init(jax.random.key(0), x))
    np.testing.assert_array_equal(np.asarray(conv), np.asarray(ref["params"]["conv"]["kernel"]))
    y = jax.jit(model.apply)(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model.apply(ref, x)), rtol=1e-6, atol=1e-6)
