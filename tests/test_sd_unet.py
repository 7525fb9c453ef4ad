"""UNet2DConditionModel parity with diffusers (tiny random configs), and converter errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet

from fasdiff_jax import safetensors_io
from fasdiff_jax.convert import load_diffusers
from fasdiff_jax.errors import ConversionError, UnsupportedConfigError

BASE = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
            cross_attention_dim=24, norm_num_groups=8)
SD1 = dict(BASE, attention_head_dim=4)
SD2 = dict(BASE, attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
           transformer_layers_per_block=[2, 1])
WEIGHTS = "diffusion_pytorch_model.safetensors"


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (zero-initialised convs would hide a wrong residual path)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def nhwc(t: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def skip_shapes(cfg: dict, b: int, hw: int) -> list[tuple[int, ...]]:
    """NCHW shapes of diffusers' down_block_res_samples for a config."""
    ch = cfg["block_out_channels"]
    shapes = [(b, ch[0], hw, hw)]
    for i, c in enumerate(ch):
        shapes += [(b, c, hw, hw)] * cfg["layers_per_block"]
        if i < len(ch) - 1:
            hw //= 2
            shapes.append((b, c, hw, hw))
    return shapes


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def saved_unet(request, tmp_path_factory):
    cfg = SD1 if request.param == "sd1" else SD2
    model = randomize(TorchUNet(**cfg))
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder, safe_serialization=True)
    return cfg, model, folder


def jit_apply(module):
    """One compiled program per call signature (eager flax dispatch is far slower)."""
    return jax.jit(lambda p, *a, **k: module.apply({"params": p}, *a, **k))


def _inputs(cfg: dict, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 741])
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    res = [torch.randn(s, generator=g) for s in skip_shapes(cfg, 2, 16)]
    mid = torch.randn(2, cfg["block_out_channels"][-1], 8, 8, generator=g)
    return x, t, ctx, res, mid


def test_unet_parity_float32_and_bfloat16(saved_unet):
    cfg, model, folder = saved_unet
    x, t, ctx, res, mid = _inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, ctx, down_block_additional_residuals=[r.clone() for r in res],
                    mid_block_additional_residual=mid.clone()).sample
        ref_plain = model(x, t, ctx).sample
    ref, ref_plain = ref.permute(0, 2, 3, 1).numpy(), ref_plain.permute(0, 2, 3, 1).numpy()
    args = (nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    kw = dict(down_block_additional_residuals=[nhwc(r) for r in res],
              mid_block_additional_residual=nhwc(mid))

    module, params = load_diffusers(folder)
    apply = jit_apply(module)
    out = np.asarray(apply(params, *args, **kw))
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() <= 1e-4 * scale
    # the residuals matter (a dropped residual path would not be caught otherwise)
    assert np.abs(ref - ref_plain).max() > 1e-2 * scale
    plain = np.asarray(apply(params, *args))
    assert np.abs(plain - ref_plain).max() <= 1e-4 * np.abs(ref_plain).max()

    module16, params16 = load_diffusers(folder, dtype=jnp.bfloat16)
    assert params16["conv_in"]["kernel"].dtype == jnp.float32
    out16 = np.asarray(jit_apply(module16)(params16, *args, **kw).astype(jnp.float32))
    assert np.abs(out16 - ref).max() <= 2e-2 * scale


def test_unet_gradients_match_diffusers(saved_unet):
    """Backward parity: gradients of a weighted sum of the output with respect to the latents,
    the text context and weights in attention and conv layers equal torch's autograd."""
    cfg, model, folder = saved_unet
    x, t, ctx, _, _ = _inputs(cfg, seed=3)
    w = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    tx, tctx = x.clone().requires_grad_(True), ctx.clone().requires_grad_(True)
    model.zero_grad()
    (model(tx, t, tctx).sample * w).sum().backward()

    module, params = load_diffusers(folder)

    def loss(p, x, ctx):
        return jnp.sum(module.apply({"params": p}, x, jnp.asarray(t.numpy()), ctx) * nhwc(w))

    g_params, g_x, g_ctx = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        params, nhwc(x), jnp.asarray(ctx.numpy()))
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    torch_named = dict(model.named_parameters())
    pairs = [
        (g_x, tx.grad.permute(0, 2, 3, 1)),
        (g_ctx, tctx.grad),
        (g_params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
         ["kernel"], torch_named[attn + ".to_q.weight"].grad.T),
        (g_params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_k"]
         ["kernel"], torch_named[attn + ".to_k.weight"].grad.T),
        (g_params["conv_in"]["kernel"], torch_named["conv_in.weight"].grad.permute(2, 3, 1, 0)),
    ]
    for ours, ref in pairs:
        ref = ref.numpy()
        assert np.abs(np.asarray(ours) - ref).max() <= 2e-5 * np.abs(ref).max()


def test_modulation_identity_and_shift(saved_unet):
    """modulation=(0, shift) after residual r equals residual r + shift; (0, 0) is identity."""
    cfg, _, folder = saved_unet
    if cfg is SD2:
        pytest.skip("one config is enough")
    x, t, ctx, res, mid = _inputs(cfg, seed=2)
    module, params = load_diffusers(folder)
    apply = jit_apply(module)
    args = (nhwc(x), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy()))
    res_j, mid_j = [nhwc(r) for r in res], nhwc(mid)
    rng = np.random.default_rng(0)
    shifts = [jnp.asarray(rng.normal(size=(2, 1, 1, r.shape[-1])), jnp.float32) for r in res_j]
    mshift = jnp.asarray(rng.normal(size=(2, 1, 1, mid_j.shape[-1])), jnp.float32)
    zeros = lambda a: jnp.zeros_like(a)  # noqa: E731
    mod = {"down": [(zeros(s), s) for s in shifts], "mid": (zeros(mshift), mshift)}
    a = apply(params, *args, down_block_additional_residuals=res_j,
                     mid_block_additional_residual=mid_j, modulation=mod)
    b = apply(params, *args,
                     down_block_additional_residuals=[r + s for r, s in zip(res_j, shifts)],
                     mid_block_additional_residual=mid_j + mshift)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    ident = {"down": [None] * len(res_j), "mid": None}
    c = apply(params, *args, modulation=ident)
    d = apply(params, *args)
    np.testing.assert_array_equal(np.asarray(c), np.asarray(d))
    # a scale changes the output (the multiplicative path is live)
    mod2 = {"down": [(s, zeros(s)) for s in shifts], "mid": None}
    e = apply(params, *args, modulation=mod2)
    assert np.abs(np.asarray(e) - np.asarray(d)).max() > 1e-3
    with pytest.raises(ValueError, match="modulation"):
        apply(params, *args, modulation={"down": shifts[:1]})


# ---------------------------------------------------------------------------- converter errors


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    model = randomize(TorchUNet(**SD1))
    folder = str(tmp_path_factory.mktemp("sd1_err"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _copy(src: str, dst: str, edit_state=None, edit_cfg=None) -> str:
    os.makedirs(dst, exist_ok=True)
    state = safetensors_io.load_file(os.path.join(src, WEIGHTS))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if edit_state:
        edit_state(state)
    if edit_cfg:
        edit_cfg(cfg)
    safetensors_io.save_file(state, os.path.join(dst, WEIGHTS))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return dst


KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def test_wrong_shape(sd1_folder, tmp_path):
    def edit(s):
        s[KEY] = np.zeros((s[KEY].shape[0], s[KEY].shape[1] + 1), np.float32)
    with pytest.raises(ConversionError, match="shape mismatch[\\s\\S]*" + KEY.replace(".", "\\.")):
        load_diffusers(_copy(sd1_folder, str(tmp_path / "x"), edit))


def test_missing_key(sd1_folder, tmp_path):
    with pytest.raises(ConversionError, match="missing[\\s\\S]*down_blocks_0/attentions_0/"
                       "transformer_blocks_0/attn2/to_k/kernel"):
        load_diffusers(_copy(sd1_folder, str(tmp_path / "x"), lambda s: s.pop(KEY)))


def test_unexpected_key(sd1_folder, tmp_path):
    def edit(s):
        s["mid_block.extra_layer.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ConversionError, match="unexpected[\\s\\S]*mid_block\\.extra_layer\\.weight"):
        load_diffusers(_copy(sd1_folder, str(tmp_path / "x"), edit))


def test_no_config(sd1_folder, tmp_path):
    folder = _copy(sd1_folder, str(tmp_path / "x"))
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(ConversionError, match="config.json"):
        load_diffusers(folder)


@pytest.mark.parametrize("field,value", [
    ("addition_embed_type", "text_time"),
    ("class_embed_type", "timestep"),
    ("time_cond_proj_dim", 32),
    ("resnet_time_scale_shift", "scale_shift"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("attention_type", "gated"),
    ("dual_cross_attention", True),
    ("encoder_hid_dim", 16),
])
def test_unsupported_architecture(sd1_folder, tmp_path, field, value):
    folder = _copy(sd1_folder, str(tmp_path / "x"), edit_cfg=lambda c: c.update({field: value}))
    with pytest.raises(UnsupportedConfigError, match=field):
        load_diffusers(folder)


def test_unknown_block_type(sd1_folder, tmp_path):
    def edit(c):
        c["down_block_types"] = ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]
    with pytest.raises(UnsupportedConfigError, match="down_block_types"):
        load_diffusers(_copy(sd1_folder, str(tmp_path / "x"), edit_cfg=edit))


# Malformed config.json values (hand edits, corrupt downloads): each must fail up front as a
# ConversionError naming the field, not as a TypeError/ZeroDivisionError or a flax message.
BAD_UNET_FIELDS = [
    ("cross_attention_dim", None), ("cross_attention_dim", [24, 24, 24]),
    ("cross_attention_dim", True), ("in_channels", None), ("in_channels", 4.0),
    ("out_channels", 0), ("attention_head_dim", 0), ("attention_head_dim", None),
    ("attention_head_dim", -4), ("attention_head_dim", "4"), ("attention_head_dim", [4, 4, 4]),
    ("num_attention_heads", [4, 0]), ("norm_num_groups", 0), ("norm_num_groups", 3),
    ("norm_num_groups", True), ("layers_per_block", 0), ("layers_per_block", [1]),
    ("transformer_layers_per_block", 0), ("block_out_channels", []),
    ("block_out_channels", [32, True]), ("block_out_channels", 32),
    ("upcast_attention", "false"), ("use_linear_projection", 1), ("flip_sin_to_cos", "true"),
    ("norm_eps", None), ("norm_eps", float("nan")), ("freq_shift", "0"),
    ("downsample_padding", -1), ("mid_block_scale_factor", None), ("conv_in_kernel", 0),
    ("conv_out_kernel", None), ("down_block_types", "CrossAttnDownBlock2D"),
    ("up_block_types", None),
]


@pytest.mark.parametrize("field,value", BAD_UNET_FIELDS)
def test_malformed_config_values_name_the_field(field, value):
    from fasdiff_jax.models.sd.unet import UNet2DConditionModel

    with pytest.raises(ConversionError, match=field) as info:
        UNet2DConditionModel.from_diffusers_config(dict(SD1, **{field: value}))
    assert isinstance(info.value, UnsupportedConfigError)
    assert repr(value) in str(info.value) or field == "block_out_channels"


def test_valid_configs_still_build_and_flags_are_read_as_json():
    from fasdiff_jax.models.sd.unet import UNet2DConditionModel

    for cfg in (SD1, SD2, dict(SD1, cross_attention_dim=[24, 24]),
                dict(SD1, num_attention_heads=None, upcast_attention=None)):
        m = UNet2DConditionModel.from_diffusers_config(cfg)
        assert m.cross_attention_dim == 24
    m = UNet2DConditionModel.from_diffusers_config(SD2)
    assert m.upcast_attention is True and m.use_linear_projection is True
    assert m.num_attention_heads == (2, 4) and m.transformer_layers_per_block == (2, 1)
    m = UNet2DConditionModel.from_diffusers_config(dict(SD1, upcast_attention=False))
    assert m.upcast_attention is False and m.num_attention_heads == (4, 4)
