"""FaSDiff's high-frequency-sensitive compressor: image -> bits -> visual prompt + coarse latent.

Analysis (ours where the abstract is silent; every size is a config field):

* a pixel branch of stride-2 conv + GDN stages down to the VAE's latent resolution (factor
  ``2 ** vae_levels``); after stage ``l`` the Haar high bands (LH, HL, HH) of the image at
  level ``l`` are concatenated, for the first ``dwt_levels`` stages, so fine facial detail
  enters the code explicitly instead of having to survive strided convs;
* at latent resolution the frozen VAE's latent ``z0`` is concatenated ("latent feature
  guidance"), then one more stride-2 conv gives ``y`` (M channels, 1/(2f) resolution).

Entropy model: exactly the mean-scale hyperprior of :mod:`fasdiff_jax.models.hyperprior`
(this class inherits its ``h_a``, integer-exact ``h_s``, entropy bottleneck and Gaussian
conditional, with the same param names), so the host codes it with the same
:class:`~fasdiff_jax.models.hyperprior.LatentCoder` and files decode identically anywhere.

Synthesis: ``y_hat`` -> transposed conv + IGDN to latent resolution -> ResNet block ->
two heads: the **visual prompt** (``prompt_channels``, latent resolution; drives the control
branch) and the **coarse latent** ẑ (``latent_channels``; aligned to ``z0`` by the latent loss).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fasdiff_jax.models import hyperprior as H
from fasdiff_jax.models import wavelets
from fasdiff_jax.models.layers import Conv
from fasdiff_jax.models.sd.blocks import ResnetBlock2D


class HFCompressor(H.MeanScaleHyperprior):
    """``N``/``M``/``num_scales`` as in the hyperprior; image side a multiple of ``multiple``."""

    prompt_channels: int = 64
    latent_channels: int = 4
    vae_levels: int = 3  # log2 of the VAE's downsampling factor (SD: 8 -> 3)
    dwt_levels: int = 3
    groups: int = 8

    @property
    def multiple(self) -> int:
        """Padding multiple: y is at 1/(2f), the hyper-latent at 1/(8f)."""
        return 2 ** (self.vae_levels + 3)

    def dummy_inputs(self) -> tuple:
        """Inputs for ``init``: an image of one padding multiple and its VAE latent."""
        m, f = self.multiple, 2 ** self.vae_levels
        z0 = jnp.zeros((1, m // f, m // f, self.latent_channels))
        return jnp.zeros((1, m, m, 3)), z0, "round"

    def setup(self):
        super().setup()  # h_a, h_s, entropy models (unused g_a/g_s layers create no params)
        if not 0 <= self.dwt_levels <= self.vae_levels:
            raise ValueError(f"dwt_levels={self.dwt_levels} must be in 0..vae_levels={self.vae_levels}")
        self.px = [Conv(self.N, 5, 2, name=f"px_{i}") for i in range(self.vae_levels)]
        self.px_gdn = [H.GDN(name=f"px_gdn_{i}") for i in range(self.vae_levels)]
        self.fuse = Conv(self.N, 3, name="fuse")
        self.fuse_gdn = H.GDN(name="fuse_gdn")
        self.to_y = Conv(self.M, 5, 2, name="to_y")
        self.up = H.UpConv(self.N, name="up")
        self.up_igdn = H.GDN(inverse=True, name="up_igdn")
        self.res = ResnetBlock2D(self.N, groups=self.groups, name="res")
        self.prompt_head = Conv(self.prompt_channels, 3, name="prompt_head")
        self.latent_head = Conv(self.latent_channels, 3, name="latent_head")

    def analysis(self, x: jax.Array, z0: jax.Array) -> jax.Array:
        """x (B,H,W,3) in [-1,1], z0 (B,H/f,W/f,latent) -> y (B,H/2f,W/2f,M)."""
        _, highs = wavelets.wavedec2(x, self.dwt_levels)
        h = x
        for i in range(self.vae_levels):
            h = self.px_gdn[i](self.px[i](h))
            if i < self.dwt_levels:
                h = jnp.concatenate([h, highs[i].astype(h.dtype)], axis=-1)
        h = jnp.concatenate([h, z0.astype(h.dtype)], axis=-1)
        return self.to_y(self.fuse_gdn(self.fuse(h)))

    def synthesis(self, y_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
        """y_hat -> (visual prompt, coarse latent ẑ), both at latent resolution."""
        h = self.res(self.up_igdn(self.up(y_hat)))
        h = nn.silu(h)
        return self.prompt_head(h), self.latent_head(h)

    def encode_latents_device(self, x: jax.Array, z0: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = self.analysis(x, z0)
        return y, self.h_a(y)

    def __call__(self, x: jax.Array, z0: jax.Array, mode: str = "noise", rng=None):
        """Training forward: (prompt, z_coarse, y_likelihoods, z_likelihoods)."""
        y_hat, y_lik, z_lik = self.entropy_stage(self.analysis(x, z0), mode, rng)
        prompt, z_coarse = self.synthesis(y_hat)
        return prompt, z_coarse, y_lik, z_lik

