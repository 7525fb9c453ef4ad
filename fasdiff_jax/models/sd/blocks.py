"""Blocks shared by the SD UNet, VAE and ControlNet (diffusers' names and numerics).

``ResnetBlock2D``, ``Downsample2D``, ``Upsample2D`` and ``Attention`` mirror
``diffusers.models.{resnet,attention_processor}``; attribute names match diffusers so the
generic converter maps weights without tables.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fasdiff_jax.models import layers

Dtype = Any


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, optional timestep embedding, 1x1 shortcut on channel change."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    use_in_shortcut: Optional[bool] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.GroupNorm(self.groups, self.eps, name="norm1", **kw)(x)
        h = layers.Conv(self.out_channels, 3, name="conv1", **kw)(nn.silu(h))
        if temb is not None:
            t = layers.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = layers.GroupNorm(self.groups, self.eps, name="norm2", **kw)(h)
        h = layers.Conv(self.out_channels, 3, name="conv2", **kw)(nn.silu(h))
        shortcut = (x.shape[-1] != self.out_channels) if self.use_in_shortcut is None else self.use_in_shortcut
        if shortcut:
            x = layers.Conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. ``padding=0`` pads (0,1) on bottom/right first, like SD's VAE."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return layers.Conv(self.out_channels, 3, stride=2, padding=self.padding, name="conv",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return layers.Conv(self.out_channels, 3, name="conv",
                           dtype=self.dtype, param_dtype=self.param_dtype)(x)


class Attention(nn.Module):
    """diffusers ``Attention`` (self or cross) with the default processor.

    On 4-D input (B, H, W, C) it flattens to tokens, optionally applies ``group_norm`` and a
    residual connection (the VAE mid-block form); on 3-D input it is plain attention.
    """

    query_dim: int
    heads: int = 8
    dim_head: int = 64
    bias: bool = False
    upcast_attention: bool = False
    norm_num_groups: Optional[int] = None
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = hidden
        spatial = hidden.ndim == 4
        if spatial:
            b, h, w, c = hidden.shape
            hidden = hidden.reshape(b, h * w, c)
        if self.norm_num_groups is not None:
            hidden = layers.GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(hidden)
        context = hidden if context is None else context
        inner = self.heads * self.dim_head
        qkv = dict(use_bias=self.bias, axes=layers.QKV_KERNEL_AXES, **kw)
        q = layers.Dense(inner, name="to_q", **qkv)(hidden)
        k = layers.Dense(inner, name="to_k", **qkv)(context)
        v = layers.Dense(inner, name="to_v", **qkv)(context)
        out = layers.attention(q, k, v, self.heads, upcast=self.upcast_attention,
                               impl=self.attention_impl)
        out = layers.Dense(self.query_dim, name="to_out_0", axes=layers.ATTN_OUT_KERNEL_AXES, **kw)(out)
        if spatial:
            out = out.reshape(b, h, w, c)
        if self.residual_connection:
            out = out + residual
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
