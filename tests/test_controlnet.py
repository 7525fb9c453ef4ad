"""ControlNetModel parity with diffusers, controlnet_from_unet vs ControlNetModel.from_unet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax.traverse_util import flatten_dict

from fasdiff_jax.convert import convert_state_dict, load_diffusers
from fasdiff_jax.models.sd.controlnet import ControlNetModel, controlnet_from_unet, zero_conv_names

ENC = dict(in_channels=4, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), layers_per_block=1,
           cross_attention_dim=24, norm_num_groups=8, attention_head_dim=[2, 4],
           use_linear_projection=True)
CN = dict(ENC, conditioning_embedding_out_channels=(8, 16))
UNET = dict(ENC, out_channels=4, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            sample_size=16)


def randomize(model: torch.nn.Module, seed: int = 0, only=None) -> torch.nn.Module:
    """Random values for every weight (or those whose name starts with one of ``only``)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only is None or name.startswith(only):
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 900]),
            torch.randn(2, 7, 24, generator=g), torch.rand(2, 3, 32, 32, generator=g))


def _compare(tmodel, module, params, scale=0.7):
    x, t, ctx, cond = _inputs()
    with torch.no_grad():
        down_ref, mid_ref = tmodel(x, t, ctx, cond, conditioning_scale=scale, return_dict=False)
    apply = jax.jit(lambda p, *a: module.apply({"params": p}, *a, conditioning_scale=scale))
    down, mid = apply(params, nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()), nhwc(cond))
    assert len(down) == len(down_ref)
    for ours, ref in list(zip(down, down_ref)) + [(mid, mid_ref)]:
        ref = ref.permute(0, 2, 3, 1).numpy()
        assert ours.shape == ref.shape
        assert np.abs(ref).max() > 1e-3  # not a trivially zero residual
        assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_controlnet_parity(tmp_path):
    tmodel = randomize(TorchControlNet(**CN))
    tmodel.save_pretrained(str(tmp_path), safe_serialization=True)
    module, params = load_diffusers(str(tmp_path))
    assert isinstance(module, ControlNetModel)
    _compare(tmodel, module, params)


def test_controlnet_from_unet_matches_diffusers():
    tunet = randomize(TorchUNet(**UNET))
    tcn = TorchControlNet.from_unet(tunet, conditioning_embedding_out_channels=(8, 16))
    from fasdiff_jax.convert import abstract_params, module_from_config

    unet_module = module_from_config(dict(tunet.config, _class_name="UNet2DConditionModel"))
    unet_params = convert_state_dict(
        {k: v.numpy() for k, v in tunet.state_dict().items()}, abstract_params(unet_module))
    module, params = controlnet_from_unet(unet_module, unet_params,
                                          conditioning_embedding_out_channels=(8, 16))
    expected = ControlNetModel.from_diffusers_config(dict(tcn.config))
    fields = [f for f in ControlNetModel.__dataclass_fields__ if f not in ("parent", "name")]
    assert {f: getattr(module, f) for f in fields} == {f: getattr(expected, f) for f in fields}
    ref = convert_state_dict({k: v.numpy() for k, v in tcn.state_dict().items()},
                             abstract_params(module))
    flat, flat_ref = flatten_dict(params), flatten_dict(ref)
    assert set(flat) == set(flat_ref)
    for k, v in flat.items():
        if k[0] == "controlnet_cond_embedding" and k[1] != "conv_out":
            continue  # freshly initialised in both, from different generators
        np.testing.assert_array_equal(np.asarray(v), flat_ref[k], err_msg="/".join(k))
    for name in zero_conv_names(module):
        assert not np.any(np.asarray(params[name]["kernel"]))
    assert not np.any(np.asarray(params["controlnet_cond_embedding"]["conv_out"]["kernel"]))

    # Randomise only the freshly initialised parts in diffusers; copying those into ours must
    # then give equal residuals, which checks every copied encoder weight end to end.
    randomize(tcn, seed=3, only=("controlnet_",))
    fresh = convert_state_dict({k: v.numpy() for k, v in tcn.state_dict().items()},
                               abstract_params(module))
    for k in params:
        if k.startswith("controlnet_"):
            params[k] = jax.tree.map(jnp.asarray, fresh[k])
    _compare(tcn, module, params, scale=1.0)


def test_latent_resolution_condition_and_errors():
    module = ControlNetModel.from_diffusers_config(dict(CN, conditioning_channels=5),
                                                   conditioning_downsample=False)
    x, t, ctx = jnp.ones((1, 16, 16, 4)), jnp.array(10), jnp.ones((1, 3, 24))
    cond = jnp.ones((1, 16, 16, 5))
    params = nn.unbox(jax.jit(module.init)(jax.random.key(0), x, t, ctx, cond)["params"])
    assert params["controlnet_cond_embedding"]["blocks_1"]["kernel"].shape == (3, 3, 8, 16)
    down, mid = jax.jit(module.apply)({"params": params}, x, t, ctx, cond)
    assert [d.shape[1] for d in down] == [16, 16, 8, 8] and mid.shape == (1, 8, 8, 64)
    with pytest.raises(ValueError, match="cond has shape"):
        module.apply({"params": params}, x, t, ctx, jnp.ones((1, 128, 128, 5)))


@pytest.mark.parametrize("field, value, why", [
    ("conditioning_channels", 0, "need an integer >= 1"),
    ("conditioning_channels", None, "need an integer >= 1"),
    ("conditioning_embedding_out_channels", [8, "16"], "need a non-empty list of positive"),
    ("global_pool_conditions", "false", "need true or false"),  # bool("false") was True
])
def test_malformed_controlnet_config_values_name_the_field(field, value, why):
    from fasdiff_jax.errors import UnsupportedConfigError

    with pytest.raises(UnsupportedConfigError, match=f"config field {field}=.* is invalid: {why}"):
        ControlNetModel.from_diffusers_config(dict(CN, **{field: value}))
