"""diffusers' ``ControlNetModel`` in Flax linen (NHWC), sharing the UNet's encoder code.

The control branch is a copy of the UNet's encoder half (:func:`unet.embed_time`,
:func:`unet.conv_in`, :func:`unet.encode`, :func:`unet.mid_block`), plus a conditioning
embedding added after ``conv_in`` and zero-initialised 1x1 "zero convs" on every skip
feature and on the mid block output, so a fresh ControlNet leaves the UNet unchanged.

``conditioning_downsample=False`` keeps the conditioning embedding at the input resolution
(its stride-2 convs become stride 1), so a latent-resolution "visual prompt" (B, h, w, Cp)
can be the condition, as FaSDiff needs.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from fasdiff_jax.errors import UnsupportedConfigError
from fasdiff_jax.models import layers
from fasdiff_jax.models.sd import config_fields
from fasdiff_jax.models.sd import unet as unet_lib
from fasdiff_jax.models.sd.unet import UNetEncoderFields

Dtype = Any
Params = dict[str, Any]

_zeros = nn.initializers.zeros_init()


class ControlNetConditioningEmbedding(nn.Module):
    """``conv_in``, pairs of (3x3 conv, 3x3 stride-2 conv) ``blocks_i``, zero ``conv_out``; SiLU."""

    conditioning_embedding_channels: int
    block_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    downsample: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        boc = self.block_out_channels
        x = nn.silu(layers.Conv(boc[0], 3, name="conv_in", **kw)(cond.astype(self.dtype)))
        for i in range(len(boc) - 1):
            x = nn.silu(layers.Conv(boc[i], 3, name=f"blocks_{2 * i}", **kw)(x))
            x = nn.silu(layers.Conv(boc[i + 1], 3, stride=2 if self.downsample else 1,
                                    name=f"blocks_{2 * i + 1}", **kw)(x))
        return layers.Conv(self.conditioning_embedding_channels, 3, name="conv_out",
                           kernel_init=_zeros, **kw)(x)


class ControlNetModel(UNetEncoderFields):
    """Control branch: ``__call__(sample, timesteps, encoder_hidden_states, cond,
    conditioning_scale=1.0) -> (down_block_residuals, mid_block_residual)`` (NHWC).

    ``cond`` is the conditioning image at ``2 ** (len(conditioning_embedding_out_channels)
    - 1)`` times the latent size (8x for SD's default), or at the latent size when
    ``conditioning_downsample=False``. The residuals plug into
    ``UNet2DConditionModel(down_block_additional_residuals=..., mid_block_additional_residual=...)``.
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False
    conditioning_downsample: bool = True

    @classmethod
    def from_diffusers_config(cls, cfg: dict, **overrides: Any) -> "ControlNetModel":
        """Our module for a diffusers ``ControlNetModel`` config (raises
        :class:`UnsupportedConfigError` naming the field for what we do not implement)."""
        kw = unet_lib.encoder_kwargs_from_config(cfg)
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise UnsupportedConfigError(
                f"config field controlnet_conditioning_channel_order={order!r}: need 'rgb' or 'bgr'")
        ceoc = {"conditioning_embedding_out_channels":  # null: diffusers' default
                cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)}
        kw.update(
            conditioning_channels=config_fields.config_int(cfg, "conditioning_channels", 3),
            conditioning_embedding_out_channels=config_fields.config_channels(
                ceoc, "conditioning_embedding_out_channels", ()),
            controlnet_conditioning_channel_order=order,
            global_pool_conditions=config_fields.config_flag(cfg, "global_pool_conditions", False),
        )
        kw.update(overrides)
        return cls(**kw)

    def cond_scale(self) -> int:
        """How many times larger ``cond`` is than ``sample`` (spatially)."""
        if not self.conditioning_downsample:
            return 1
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def dummy_inputs(self) -> tuple:
        s = 2 ** (len(self.block_out_channels) - 1)
        c = s * self.cond_scale()
        return (jnp.zeros((1, s, s, self.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32),
                jnp.zeros((1, c, c, self.conditioning_channels), jnp.float32))

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        cond: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, _ = sample.shape
        f = self.cond_scale()
        if cond.shape[1:3] != (h * f, w * f) or cond.shape[-1] != self.conditioning_channels:
            raise ValueError(
                f"cond has shape {cond.shape}; for sample {sample.shape} need "
                f"(B, {h * f}, {w * f}, {self.conditioning_channels})"
                + ("" if f == 1 else " (or set conditioning_downsample=False for a "
                   "latent-resolution condition)"))
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = cond[..., ::-1]
        context = encoder_hidden_states.astype(self.dtype)
        temb = unet_lib.embed_time(self, timesteps, b)
        x = unet_lib.conv_in(self, sample)
        x = x + ControlNetConditioningEmbedding(
            self.block_out_channels[0], self.conditioning_embedding_out_channels,
            self.conditioning_downsample, name="controlnet_cond_embedding", **kw)(cond)
        x, skips = unet_lib.encode(self, x, temb, context)
        x = unet_lib.mid_block(self, x, temb, context)
        down = [layers.Conv(s.shape[-1], 1, kernel_init=_zeros, name=f"controlnet_down_blocks_{i}",
                            **kw)(s) for i, s in enumerate(skips)]
        mid = layers.Conv(x.shape[-1], 1, kernel_init=_zeros, name="controlnet_mid_block", **kw)(x)
        scale = jnp.asarray(conditioning_scale, self.dtype)
        down = [d * scale for d in down]
        mid = mid * scale
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


# Top-level param trees copied from the UNet by diffusers' ``ControlNetModel.from_unet``.
_COPIED_FROM_UNET = ("conv_in", "time_embedding", "mid_block")


def controlnet_from_unet(
    unet_module: unet_lib.UNet2DConditionModel,
    unet_params: Params,
    *,
    rng: Optional[jax.Array] = None,
    **controlnet_kwargs: Any,
) -> tuple[ControlNetModel, Params]:
    """A ControlNet initialised from a UNet, like diffusers' ``ControlNetModel.from_unet``.

    The encoder (``conv_in``, ``time_embedding``, ``down_blocks_*``, ``mid_block``) is a copy
    of the UNet's weights; the conditioning embedding is freshly drawn (host numpy, seeded
    from ``rng``: :func:`fasdiff_jax.convert.random_params`) with a zero ``conv_out``, and
    every zero conv is zero. All of it is host numpy (like the UNet params from
    :func:`fasdiff_jax.convert.load_component`), placed later with the train loop's
    shardings rather than staged on one device. ``controlnet_kwargs`` set the
    ControlNet-only fields (``conditioning_channels``, ``conditioning_downsample``, ...) or
    override encoder options (``dtype``, ``remat``, ``attention_impl``).
    """
    fields = {f: getattr(unet_module, f) for f in unet_lib.ENCODER_FIELDS}
    fields.update(controlnet_kwargs)
    module = ControlNetModel(**fields)
    from fasdiff_jax.convert import random_params  # late: convert imports models lazily

    seed = 0 if rng is None else int(jax.random.randint(rng, (), 0, 2**31 - 1))
    params = jax.tree.map(np.asarray, unfreeze(random_params(module, seed)))
    for name in zero_conv_names(module):
        params[name] = jax.tree.map(np.zeros_like, params[name])
    emb_out = params["controlnet_cond_embedding"]["conv_out"]
    params["controlnet_cond_embedding"]["conv_out"] = jax.tree.map(np.zeros_like, emb_out)
    n_down = len(module.block_out_channels)
    names = _COPIED_FROM_UNET + tuple(f"down_blocks_{i}" for i in range(n_down))
    for name in names:
        if name not in unet_params:
            raise KeyError(f"unet_params has no {name!r}: not params of {type(unet_module).__name__}")
        theirs, ours = unet_params[name], params[name]
        mismatch = jax.tree.map(lambda a, b: a.shape != b.shape, theirs, ours)
        if any(jax.tree.leaves(mismatch)):
            raise ValueError(f"unet_params[{name!r}] shapes differ from the ControlNet's")
        # A copy, not a view: the two trees must not share buffers (donation, in-place updates).
        params[name] = jax.tree.map(lambda a: np.array(a, module.param_dtype, copy=True), theirs)
    return module, params


def zero_conv_names(module: ControlNetModel) -> Sequence[str]:
    """Param names of the zero convs (handy for optimiser masks and tests)."""
    n_skips = 1 + sum(
        n + (1 if i < len(module.block_out_channels) - 1 else 0)
        for i, n in enumerate(unet_lib.per_block(module.layers_per_block,
                                                 len(module.block_out_channels),
                                                 "layers_per_block")))
    return tuple(f"controlnet_down_blocks_{i}" for i in range(n_skips)) + ("controlnet_mid_block",)
