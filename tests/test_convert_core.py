"""The generic diffusers-key -> Flax-path rule and its strict checks, on a small Flax model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fasdiff_jax import convert
from fasdiff_jax.errors import ConversionError, UnsupportedConfigError
from fasdiff_jax.models import layers


def test_key_to_path():
    assert convert.key_to_path("down_blocks.0.resnets.1.conv1.weight") == (
        ("down_blocks_0", "resnets_1", "conv1"), "weight")
    assert convert.key_to_path("a.attn1.to_out.0.bias") == (("a", "attn1", "to_out_0"), "bias")
    assert convert.key_to_path("mid_block.attentions.0.query.weight") == (
        ("mid_block", "attentions_0", "to_q"), "weight")
    assert convert.key_to_path("mid.proj_attn.bias") == (("mid", "to_out_0"), "bias")


class _TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList([torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 5)])


class _FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = layers.Conv(8, 3, name="conv_in")(x)
        x = layers.GroupNorm(2, 1e-5, name="blocks_0")(x)
        return layers.Dense(5, name="blocks_1")(x)


def _state():
    torch.manual_seed(0)
    net = _TorchNet()
    for p in net.parameters():
        torch.nn.init.normal_(p)
    return net, {k: v.detach().numpy() for k, v in net.state_dict().items()}


def _expected():
    return nn.unbox(jax.eval_shape(lambda: _FlaxNet().init(jax.random.key(0), jnp.ones((1, 6, 6, 3))))["params"])


def test_convert_state_dict_matches_torch_numerics():
    net, state = _state()
    params = convert.convert_state_dict(state, _expected())
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype(np.float32)
    ours = _FlaxNet().apply({"params": params}, x)
    with torch.no_grad():
        h = net.blocks[0](net.conv_in(torch.from_numpy(x).permute(0, 3, 1, 2)))
        ref = net.blocks[1](h.permute(0, 2, 3, 1)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=1e-5)


def test_strict_errors_name_the_key():
    _, state = _state()
    bad = dict(state)
    bad["conv_in.weight"] = bad["conv_in.weight"][:4]
    with pytest.raises(ConversionError, match=r"conv_in\.weight: checkpoint \(4, 3, 3, 3\)"):
        convert.convert_state_dict(bad, _expected())
    missing = {k: v for k, v in state.items() if k != "blocks.1.bias"}
    with pytest.raises(ConversionError, match=r"missing from checkpoint:\n    blocks_1/bias"):
        convert.convert_state_dict(missing, _expected())
    extra = dict(state, **{"extra.layer.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match=r"unexpected in checkpoint:\n    extra\.layer\.weight"):
        convert.convert_state_dict(extra, _expected())


def test_folder_errors(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        convert.load_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModelXL"}')
    with pytest.raises(UnsupportedConfigError, match="UNet2DConditionModelXL"):
        convert.load_diffusers(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="unreadable config"):
        convert.load_diffusers(str(tmp_path))
