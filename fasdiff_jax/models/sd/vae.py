"""SD's ``AutoencoderKL`` (diffusers) in Flax linen, NHWC, with diffusers' parameter names.

``encode`` returns the diagonal Gaussian's ``(mean, logvar)`` (logvar clipped to [-30, 20]
as diffusers' ``DiagonalGaussianDistribution`` does); ``decode`` maps latents to images.
Neither applies ``scaling_factor``: callers multiply/divide by ``module.scaling_factor``
exactly where diffusers' pipelines do.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fasdiff_jax.errors import UnsupportedConfigError
from fasdiff_jax.models import layers
from fasdiff_jax.models.sd.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from fasdiff_jax.models.sd.config_fields import (check_groups, config_channels, config_flag,
                                                 config_float, config_int, invalid_field)

Dtype = Any
_EPS = 1e-6  # diffusers' Encoder/Decoder use resnet_eps=1e-6 and GroupNorm eps 1e-6


def _latent_stats(cfg: Mapping[str, Any], field: str, latent_channels: int,
                  positive: bool) -> Optional[tuple[float, ...]]:
    """``latents_mean`` / ``latents_std``: absent, null or one finite number per latent
    channel (a wrong length would broadcast silently or fail mid-run)."""
    v = cfg.get(field)
    if v is None:
        return None
    per = {f"{field}[{i}]": x for i, x in enumerate(v)} if isinstance(v, (list, tuple)) else {}
    if len(per) != latent_channels:
        raise invalid_field(field, v, f"need a list of {latent_channels} numbers "
                            f"(latent_channels)", "AutoencoderKL ")
    return tuple(config_float(per, k, None, positive=positive, owner="AutoencoderKL ")
                 for k in per)


class MidBlock2D(nn.Module):
    """diffusers ``UNetMidBlock2D`` without timestep embedding (the VAE form)."""

    channels: int
    groups: int
    add_attention: bool = True
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        Res = layers.maybe_remat(ResnetBlock2D, self.remat)
        x = Res(self.channels, groups=self.groups, eps=_EPS, name="resnets_0", **kw)(x)
        if self.add_attention:
            # attention_head_dim = channels -> one head of dim C; group norm, residual, bias.
            x = Attention(self.channels, heads=1, dim_head=self.channels, bias=True,
                          norm_num_groups=self.groups, eps=_EPS, residual_connection=True,
                          attention_impl=self.attention_impl, name="attentions_0", **kw)(x)
        return Res(self.channels, groups=self.groups, eps=_EPS, name="resnets_1", **kw)(x)


class DownEncoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        Res = layers.maybe_remat(ResnetBlock2D, self.remat)
        for i in range(self.num_layers):
            x = Res(self.out_channels, groups=self.groups, eps=_EPS, name=f"resnets_{i}", **kw)(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=0, name="downsamplers_0", **kw)(x)
        return x


class UpDecoderBlock2D(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        Res = layers.maybe_remat(ResnetBlock2D, self.remat)
        for i in range(self.num_layers):
            x = Res(self.out_channels, groups=self.groups, eps=_EPS, name=f"resnets_{i}", **kw)(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int  # 2 * latent_channels (double_z)
    mid_block_add_attention: bool = True
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(self.block_out_channels)
        x = layers.Conv(chans[0], 3, name="conv_in", **kw)(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock2D(c, self.layers_per_block, self.groups,
                                   add_downsample=i < len(chans) - 1, remat=self.remat,
                                   name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock2D(chans[-1], self.groups, self.mid_block_add_attention,
                       self.attention_impl, self.remat, name="mid_block", **kw)(x)
        x = layers.GroupNorm(self.groups, _EPS, name="conv_norm_out", **kw)(x)
        return layers.Conv(self.out_channels, 3, name="conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    out_channels: int
    mid_block_add_attention: bool = True
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        rev = tuple(reversed(tuple(self.block_out_channels)))
        x = layers.Conv(rev[0], 3, name="conv_in", **kw)(z)
        x = MidBlock2D(rev[0], self.groups, self.mid_block_add_attention,
                       self.attention_impl, self.remat, name="mid_block", **kw)(x)
        for i, c in enumerate(rev):
            x = UpDecoderBlock2D(c, self.layers_per_block + 1, self.groups,
                                 add_upsample=i < len(rev) - 1, remat=self.remat,
                                 name=f"up_blocks_{i}", **kw)(x)
        x = layers.GroupNorm(self.groups, _EPS, name="conv_norm_out", **kw)(x)
        return layers.Conv(self.out_channels, 3, name="conv_out", **kw)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """diffusers ``AutoencoderKL``. Inputs/outputs NHWC; images in [-1, 1]."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[Sequence[float]] = None
    latents_std: Optional[Sequence[float]] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str = "xla"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(block_out_channels=tuple(self.block_out_channels),
                      layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                      mid_block_add_attention=self.mid_block_add_attention,
                      attention_impl=self.attention_impl, remat=self.remat, **kw)
        self.encoder = Encoder(out_channels=2 * self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = layers.Conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = layers.Conv(self.latent_channels, 1, name="post_quant_conv",
                                               **kw)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image (B, H, W, in_channels) -> (mean, logvar), each (B, H/f, W/f, latent_channels)."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"VAE.encode expects NHWC with {self.in_channels} channels, "
                             f"got shape {x.shape}")
        h = self.encoder(x)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, latent_channels) -> image (B, h*f, w*f, out_channels)."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"VAE.decode expects NHWC with {self.latent_channels} channels, "
                             f"got shape {z.shape}")
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction: decode(mean) or, given ``rng``, decode of a posterior sample."""
        mean, logvar = self.encode(x)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decode(z)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def dummy_inputs(self) -> tuple:
        s = 2 * self.downsample_factor
        return (jnp.zeros((1, s, s, self.in_channels), self.dtype),)

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any], **overrides: Any) -> "AutoencoderKL":
        """Our module for a diffusers ``AutoencoderKL`` config.json dict."""
        cfg = dict(cfg)
        owner = "AutoencoderKL "
        chans = config_channels(cfg, "block_out_channels", (64,), owner)
        n = len(chans)
        down = cfg.get("down_block_types", ("DownEncoderBlock2D",) * n)
        up = cfg.get("up_block_types", ("UpDecoderBlock2D",) * n)
        down = tuple(down) if isinstance(down, (list, tuple)) else (down,)
        up = tuple(up) if isinstance(up, (list, tuple)) else (up,)
        if any(t != "DownEncoderBlock2D" for t in down) or len(down) != n:
            raise UnsupportedConfigError(
                f"AutoencoderKL down_block_types {down}: only {n} x 'DownEncoderBlock2D' "
                f"is supported")
        if any(t != "UpDecoderBlock2D" for t in up) or len(up) != n:
            raise UnsupportedConfigError(
                f"AutoencoderKL up_block_types {up}: only {n} x 'UpDecoderBlock2D' is supported")
        act = cfg.get("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedConfigError(f"AutoencoderKL act_fn {act!r}: only 'silu' is supported")
        sample_size = cfg.get("sample_size", 32)
        if isinstance(sample_size, (list, tuple)) and sample_size:
            sample_size = sample_size[0]
        latent = config_int(cfg, "latent_channels", 4, owner=owner)
        kwargs = dict(
            in_channels=config_int(cfg, "in_channels", 3, owner=owner),
            out_channels=config_int(cfg, "out_channels", 3, owner=owner),
            block_out_channels=chans,
            layers_per_block=config_int(cfg, "layers_per_block", 1, owner=owner),
            latent_channels=latent,
            norm_num_groups=config_int(cfg, "norm_num_groups", 32, owner=owner),
            sample_size=config_int({"sample_size": sample_size}, "sample_size", 32, owner=owner),
            scaling_factor=config_float(cfg, "scaling_factor", 0.18215, positive=True,
                                        owner=owner),
            shift_factor=config_float(cfg, "shift_factor", None, owner=owner, allow_none=True),
            latents_mean=_latent_stats(cfg, "latents_mean", latent, positive=False),
            latents_std=_latent_stats(cfg, "latents_std", latent, positive=True),
            use_quant_conv=config_flag(cfg, "use_quant_conv", True, owner),
            use_post_quant_conv=config_flag(cfg, "use_post_quant_conv", True, owner),
            mid_block_add_attention=config_flag(cfg, "mid_block_add_attention", True, owner),
        )
        check_groups(kwargs["norm_num_groups"], chans, owner=owner)
        kwargs.update(overrides)
        return cls(**kwargs)
