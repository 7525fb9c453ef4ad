"""Flax AutoencoderKL vs diffusers' on a tiny random config, through our converter."""

import json
import os

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from diffusers import AutoencoderKL as TorchVAE

from fasdiff_jax import convert
from fasdiff_jax.errors import ConversionError, UnsupportedConfigError
from fasdiff_jax.models.sd.vae import AutoencoderKL

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=16)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (norm scales around 1) so no path hides behind a zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 16
                p.copy_(noise / np.sqrt(fan_in))


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    torch.manual_seed(0)
    ref = TorchVAE(**TINY).eval()
    _randomise(ref)
    folder = str(tmp_path_factory.mktemp("vae"))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _reference(ref, x, z):
    with torch.no_grad():
        dist = ref.encode(_nchw(x)).latent_dist
        return _nhwc(dist.mean), _nhwc(dist.logvar), _nhwc(ref.decode(_nchw(z)).sample)


def _inputs():
    x = np.asarray(jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1, maxval=1))
    z = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 4)))
    return x, z


def test_encode_decode_parity_float32(tiny_vae):
    ref, folder = tiny_vae
    module, params = convert.load_diffusers(folder)
    assert isinstance(module, AutoencoderKL) and module.scaling_factor == pytest.approx(0.18215)
    x, z = _inputs()
    mean_r, logvar_r, img_r = _reference(ref, x, z)
    enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    mean, logvar = enc(params, jnp.asarray(x))
    img = dec(params, jnp.asarray(z))
    assert mean.shape == (2, 8, 8, 4) and img.shape == (2, 16, 16, 3)
    for got, want in ((mean, mean_r), (logvar, logvar_r), (img, img_r)):
        assert _rel(got, want) <= 1e-4, _rel(got, want)
    # __call__ decodes the posterior mean.
    rec = module.apply({"params": params}, jnp.asarray(x))
    assert _rel(rec, dec(params, mean)) <= 1e-5


def test_bfloat16_compute(tiny_vae):
    ref, folder = tiny_vae
    module, params = convert.load_diffusers(folder, dtype=jnp.bfloat16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
    x, z = _inputs()
    mean_r, _, img_r = _reference(ref, x, z)
    mean, _ = module.apply({"params": params}, jnp.asarray(x), method="encode")
    img = module.apply({"params": params}, jnp.asarray(z), method="decode")
    assert mean.dtype == jnp.bfloat16
    assert _rel(mean.astype(jnp.float32), mean_r) <= 2e-2
    assert _rel(img.astype(jnp.float32), img_r) <= 2e-2


def test_legacy_attention_names_convert(tiny_vae, tmp_path):
    """Old checkpoints name the mid-block attention query/key/value/proj_attn (1x1 convs)."""
    ref, _ = tiny_vae
    from safetensors.torch import save_file

    legacy = {}
    for k, v in ref.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                         ("to_out.0", "proj_attn")):
            if f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
                if v.ndim == 2:
                    v = v[:, :, None, None]  # stored as 1x1 conv kernels
        legacy[k] = v.contiguous()
    assert any(".query." in k for k in legacy) and any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "AutoencoderKL", **TINY}, f)
    module, params = convert.load_diffusers(str(tmp_path))
    x, z = _inputs()
    mean_r, _, img_r = _reference(ref, x, z)
    mean, _ = module.apply({"params": params}, jnp.asarray(x), method="encode")
    assert _rel(mean, mean_r) <= 1e-4


def test_config_variants(tmp_path):
    """No quant convs / no mid attention / SDXL-style latent stats: parity and storage."""
    cfg = dict(TINY, use_quant_conv=False, use_post_quant_conv=False,
               mid_block_add_attention=False, latents_mean=[0.1, 0.2, 0.3, 0.4],
               latents_std=[1.0, 2.0, 3.0, 4.0], scaling_factor=0.13025)
    ref = TorchVAE(**cfg).eval()
    _randomise(ref, seed=3)
    ref.save_pretrained(str(tmp_path), safe_serialization=True)
    module, params = convert.load_diffusers(str(tmp_path))
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    assert module.latents_std == (1.0, 2.0, 3.0, 4.0) and module.scaling_factor == 0.13025
    x, z = _inputs()
    mean_r, logvar_r, img_r = _reference(ref, x, z)
    mean, logvar = module.apply({"params": params}, jnp.asarray(x), method="encode")
    img = module.apply({"params": params}, jnp.asarray(z), method="decode")
    for got, want in ((mean, mean_r), (logvar, logvar_r), (img, img_r)):
        assert _rel(got, want) <= 1e-4


def test_remat_same_output_and_grad(tiny_vae):
    _, folder = tiny_vae
    module, params = convert.load_diffusers(folder)
    remat_module, _ = convert.load_diffusers(folder, remat=True)
    z = jnp.asarray(_inputs()[1])[:1]
    loss = lambda m: lambda p: jnp.mean(m.apply({"params": p}, z, method="decode") ** 2)  # noqa
    g1 = jax.grad(loss(module))(params)
    g2 = jax.grad(loss(remat_module))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unsupported_and_bad_inputs(tiny_vae):
    with pytest.raises(UnsupportedConfigError, match="down_block_types"):
        AutoencoderKL.from_diffusers_config(dict(TINY, down_block_types=("FooBlock", "DownEncoderBlock2D")))
    with pytest.raises(UnsupportedConfigError, match="act_fn"):
        AutoencoderKL.from_diffusers_config(dict(TINY, act_fn="gelu"))
    with pytest.raises(UnsupportedConfigError, match="norm_num_groups"):
        AutoencoderKL.from_diffusers_config(dict(TINY, norm_num_groups=7))
    _, folder = tiny_vae
    module, params = convert.load_diffusers(folder)
    with pytest.raises(ValueError, match="NHWC"):
        module.apply({"params": params}, jnp.zeros((1, 3, 16, 16)), method="encode")
    # A checkpoint for a different width is rejected with the key named.
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg["block_out_channels"] = [32, 32]
    wrong = AutoencoderKL.from_diffusers_config(cfg)
    with pytest.raises(ConversionError, match="shape mismatch"):
        convert.convert_state_dict(convert.read_weights(folder), convert.abstract_params(wrong))


@pytest.mark.parametrize("field,value", [
    ("scaling_factor", None), ("scaling_factor", "0.18215"), ("scaling_factor", 0),
    ("norm_num_groups", 0), ("norm_num_groups", 3), ("latent_channels", 0),
    ("latent_channels", None), ("in_channels", True), ("out_channels", 3.0),
    ("layers_per_block", 0), ("block_out_channels", [True, 64]), ("block_out_channels", []),
    ("sample_size", None), ("shift_factor", "x"), ("latents_mean", [0.1, 0.2]),
    ("latents_std", [1.0, 1.0, 1.0, 0.0]), ("latents_mean", 0.5),
    ("use_quant_conv", "false"), ("mid_block_add_attention", 0),
])
def test_malformed_config_values_name_the_field(field, value):
    with pytest.raises(UnsupportedConfigError, match=field):
        AutoencoderKL.from_diffusers_config(dict(TINY, **{field: value}))


def test_valid_configs_still_build():
    m = AutoencoderKL.from_diffusers_config(TINY)
    assert m.block_out_channels == (32, 64) and m.scaling_factor == 0.18215
    m = AutoencoderKL.from_diffusers_config(dict(
        TINY, scaling_factor=1, shift_factor=0.0609, latents_mean=[0, 0.1, 0.2, 0.3],
        latents_std=[1, 2, 3, 4], sample_size=[16, 16], use_quant_conv=None, force_upcast=True))
    assert m.scaling_factor == 1.0 and m.shift_factor == 0.0609 and m.sample_size == 16
    assert m.latents_std == (1.0, 2.0, 3.0, 4.0) and m.use_quant_conv is False
