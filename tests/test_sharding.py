"""UNet params and a forward pass sharded on a 2x4 ('data', 'fsdp') mesh of fake devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fasdiff_jax.models.sd.unet import UNet2DConditionModel
from fasdiff_jax.sharding import DEFAULT_LOGICAL_AXIS_RULES, create_mesh, init_sharded

UNET = UNet2DConditionModel(
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    num_attention_heads=(2, 4), cross_attention_dim=24, norm_num_groups=8,
    use_linear_projection=True)


def test_unet_sharded_params_and_forward(devices8):
    mesh = create_mesh({"data": 2, "fsdp": 4})
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 4))
    t = jnp.array([3, 500])
    ctx = jax.random.normal(jax.random.key(2), (2, 7, 24))

    init_fn = lambda: UNET.init(jax.random.key(0), x, t, ctx)["params"]  # noqa: E731
    params, shardings = init_sharded(init_fn, mesh, DEFAULT_LOGICAL_AXIS_RULES)

    # actual placement: conv kernels (kh, kw, in, out) split on 'in' over fsdp ...
    conv = params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert conv.shape == (3, 3, 32, 32)
    assert conv.sharding.spec == P(None, None, "fsdp", None)
    # a bias (logical 'mlp' -> mesh 'tensor', absent from this mesh) is replicated
    assert params["time_embedding"]["linear_1"]["bias"].sharding.spec == P(None)
    attn = params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]
    assert attn["to_q"]["kernel"].sharding.spec == P("fsdp", None)
    assert attn["to_out_0"]["kernel"].sharding.spec == P(None, "fsdp")
    assert len(attn["to_q"]["kernel"].addressable_shards) == 8
    assert attn["to_q"]["kernel"].addressable_shards[0].data.shape == (8, 32)

    batch = NamedSharding(mesh, P("data"))
    fwd = jax.jit(lambda p, a, b, c: UNET.apply({"params": p}, a, b, c),
                  in_shardings=(shardings, batch, batch, batch), out_shardings=batch)
    out = fwd(params, jax.device_put(x, batch), jax.device_put(t, batch),
              jax.device_put(ctx, batch))
    assert out.sharding.spec == P("data")

    host_params = jax.tree.map(lambda a: jax.device_put(np.asarray(a), jax.devices()[0]), params)
    ref = jax.jit(lambda p, a, b, c: UNET.apply({"params": p}, a, b, c))(host_params, x, t, ctx)
    assert ref.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
