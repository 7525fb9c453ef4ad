"""Hybrid low-frequency enhancement (HLFE): FaSDiff's low-frequency semantic modulation.

The abstract says the module "disentangles low-frequency facial semantics and stably
modulates the diffusion prior alongside visual prompts". Our construction (the layer sizes
and the exact form are ours, all config fields):

1. take the Haar LL band (``dwt_levels`` levels) of the coarse latent ẑ and of the visual
   prompt p: structure and identity-bearing layout live there, texture does not;
2. "hybrid" blocks: a local conv ResNet block followed by global self-attention over all
   positions (faces are globally structured: both eyes, symmetry);
3. a pooled semantic code (B, D) plus the spatial feature map;
4. for every UNet skip feature (and the mid block) a scale/shift pair, from the feature map
   resized to that resolution plus the code, through a *zero-initialised* 1x1 conv, so at
   initialisation the modulation is exactly the identity and training starts from the
   unmodified SD prior (the "stable" part).

The output plugs into ``UNet2DConditionModel(..., modulation=...)``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fasdiff_jax.models import layers, wavelets
from fasdiff_jax.models.sd.blocks import Attention, ResnetBlock2D
from fasdiff_jax.models.sd.unet import apply_scale_shift

Dtype = Any


class HybridBlock(nn.Module):
    """Local (conv ResNet) then global (multi-head self-attention) mixing."""

    features: int
    heads: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.features, groups=self.groups, eps=1e-6, dtype=self.dtype, name="local")(x)
        return Attention(self.features, heads=self.heads, dim_head=self.features // self.heads,
                         bias=True, norm_num_groups=self.groups, eps=1e-6,
                         residual_connection=True, dtype=self.dtype, name="global_attn")(x)


class HybridLowFrequencyEnhancement(nn.Module):
    """Maps (ẑ, p) to UNet modulation ``{'down': [(scale, shift)...], 'mid': (scale, shift)}``.

    ``down_targets``: (channels, stride) of each UNet skip feature, stride relative to the
    latent; ``mid_target`` likewise for the mid block output.
    """

    down_targets: Sequence[tuple[int, int]]
    mid_target: tuple[int, int]
    features: int = 64
    num_blocks: int = 2
    heads: int = 4
    groups: int = 8
    dwt_levels: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z_hat: jax.Array, prompt: jax.Array) -> tuple[dict, jax.Array]:
        x = jnp.concatenate([wavelets.low_band(z_hat, self.dwt_levels),
                             wavelets.low_band(prompt, self.dwt_levels)], axis=-1)
        h = layers.Conv(self.features, 3, name="conv_in", dtype=self.dtype)(x)
        for i in range(self.num_blocks):
            h = HybridBlock(self.features, self.heads, self.groups, self.dtype, name=f"blocks_{i}")(h)
        h = nn.silu(layers.GroupNorm(self.groups, 1e-6, name="norm_out", dtype=self.dtype)(h))
        code = layers.Dense(self.features, name="semantic_code", dtype=self.dtype)(jnp.mean(h, axis=(1, 2)))
        lat_h, lat_w = z_hat.shape[1], z_hat.shape[2]

        def head(name: str, channels: int, stride: int) -> tuple[jax.Array, jax.Array]:
            size = (max(lat_h // stride, 1), max(lat_w // stride, 1))
            f = jax.image.resize(h, (h.shape[0], *size, h.shape[-1]), "linear")
            f = f + layers.Dense(self.features, name=f"{name}_code", dtype=self.dtype)(code)[:, None, None]
            out = layers.Conv(2 * channels, 1, name=name, dtype=self.dtype,
                              kernel_init=nn.initializers.zeros_init())(nn.silu(f))
            scale, shift = jnp.split(out, 2, axis=-1)
            return scale, shift

        down = [head(f"mod_down_{i}", c, s) for i, (c, s) in enumerate(self.down_targets)]
        mid = head("mod_mid", *self.mid_target)
        return {"down": down, "mid": mid}, code


# How the UNet applies one (scale, shift) pair; defined once, next to its use.
apply_modulation = apply_scale_shift
