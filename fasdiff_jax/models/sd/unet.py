"""Stable Diffusion's ``UNet2DConditionModel`` (SD 1.x / 2.x) in Flax linen, NHWC.

Numerically the network of ``diffusers.UNet2DConditionModel`` (v0.42) for the configs SD
1.x/2.x use; attribute names mirror diffusers' module names (``down_blocks_0/attentions_1/
transformer_blocks_0/attn2/to_q``) so :mod:`fasdiff_jax.convert` maps weights generically.

The encoder half (time embedding, ``conv_in``, down blocks, mid block) is written once here
(:func:`embed_time`, :func:`encode`) and reused by
:class:`fasdiff_jax.models.sd.controlnet.ControlNetModel`.

Naming quirk kept from diffusers: in SD configs ``attention_head_dim`` is really the number
of heads per block (``num_attention_heads = num_attention_heads or attention_head_dim``);
:meth:`UNet2DConditionModel.from_diffusers_config` resolves it into ``num_attention_heads``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from fasdiff_jax.errors import UnsupportedConfigError
from fasdiff_jax.models import layers
from fasdiff_jax.models.sd.config_fields import (check_groups, config_channels, config_flag,
                                                 config_float, config_int, config_ints,
                                                 invalid_field)
from fasdiff_jax.models.sd.blocks import Attention, Downsample2D, ResnetBlock2D, Upsample2D

Dtype = Any
IntOrSeq = Union[int, Sequence[int]]
ScaleShift = Optional[tuple[jax.Array, jax.Array]]

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
MID_CROSS_ATTN = "UNetMidBlock2DCrossAttn"


# ----------------------------------------------------------------------------------------
# Time embedding


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """diffusers' ``get_timestep_embedding`` (sinusoidal, float32): (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1`` -> SiLU -> ``linear_2`` (diffusers ``TimestepEmbedding``, act 'silu')."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.Dense(self.time_embed_dim, name="linear_1", **kw)(x)
        return layers.Dense(self.time_embed_dim, name="linear_2", **kw)(nn.silu(x))


# ----------------------------------------------------------------------------------------
# Transformer


class GEGLU(nn.Module):
    """``proj`` to 2*inner, then ``hidden * gelu(gate)`` (exact erf GELU, as torch)."""

    inner_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = layers.Dense(self.inner_dim * 2, name="proj", dtype=self.dtype,
                         param_dtype=self.param_dtype)(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU: ``net_0`` (GEGLU) and ``net_2`` (Linear)."""

    dim: int
    mult: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.dim * self.mult, name="net_0", **kw)(x)
        return layers.Dense(self.dim, name="net_2", axes=("mlp", "embed"), **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward; pre-LayerNorm, residual each."""

    dim: int
    num_heads: int
    head_dim: int
    upcast_attention: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(query_dim=self.dim, heads=self.num_heads, dim_head=self.head_dim,
                    upcast_attention=self.upcast_attention, attention_impl=self.attention_impl, **kw)
        x = Attention(name="attn1", **attn)(layers.LayerNorm(1e-5, name="norm1", **kw)(x)) + x
        x = Attention(name="attn2", **attn)(layers.LayerNorm(1e-5, name="norm2", **kw)(x), context) + x
        x = FeedForward(self.dim, name="ff", **kw)(layers.LayerNorm(1e-5, name="norm3", **kw)(x)) + x
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm, ``proj_in`` (1x1 conv or linear), transformer blocks, ``proj_out``, residual."""

    num_heads: int
    head_dim: int
    num_layers: int = 1
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    remat: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        inner = self.num_heads * self.head_dim
        residual = x
        x = layers.GroupNorm(self.norm_num_groups, 1e-6, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = layers.Dense(inner, name="proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = layers.Conv(inner, 1, name="proj_in", **kw)(x).reshape(b, h * w, inner)
        block_cls = layers.maybe_remat(BasicTransformerBlock, self.remat)
        for i in range(self.num_layers):
            x = block_cls(inner, self.num_heads, self.head_dim, self.upcast_attention,
                          self.attention_impl, name=f"transformer_blocks_{i}", **kw)(x, context)
        if self.use_linear_projection:
            x = layers.Dense(c, name="proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = layers.Conv(c, 1, name="proj_out", **kw)(x.reshape(b, h, w, inner))
        return x + residual


# ----------------------------------------------------------------------------------------
# Down / mid / up blocks


class DownBlock2D(nn.Module):
    """``CrossAttnDownBlock2D`` (``cross_attention=True``) or ``DownBlock2D``.

    Returns ``(hidden, skips)``: one skip per resnet (after its attention) and one after the
    downsampler, exactly diffusers' ``output_states``.
    """

    out_channels: int
    num_layers: int
    cross_attention: bool = True
    num_heads: int = 8
    transformer_layers: int = 1
    add_downsample: bool = True
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    remat: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: Optional[jax.Array]
                 ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = layers.maybe_remat(ResnetBlock2D, self.remat)
        skips = []
        for i in range(self.num_layers):
            x = resnet_cls(self.out_channels, self.norm_num_groups, self.norm_eps,
                           name=f"resnets_{i}", **kw)(x, temb)
            if self.cross_attention:
                x = _transformer(self, f"attentions_{i}", self.out_channels)(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, padding=self.downsample_padding,
                             name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnet, then (transformer, resnet) ``num_layers`` times."""

    channels: int
    num_heads: int = 8
    num_layers: int = 1
    transformer_layers: int = 1
    output_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    remat: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = layers.maybe_remat(ResnetBlock2D, self.remat)
        resnet = lambda i: resnet_cls(self.channels, self.norm_num_groups, self.norm_eps,  # noqa: E731
                                      self.output_scale_factor, name=f"resnets_{i}", **kw)
        x = resnet(0)(x, temb)
        for i in range(self.num_layers):
            x = _transformer(self, f"attentions_{i}", self.channels)(x, context)
            x = resnet(i + 1)(x, temb)
        return x


class UpBlock2D(nn.Module):
    """``CrossAttnUpBlock2D`` (``cross_attention=True``) or ``UpBlock2D``.

    Consumes its skips last-first (concatenated on channels before each resnet).
    """

    out_channels: int
    num_layers: int
    cross_attention: bool = True
    num_heads: int = 8
    transformer_layers: int = 1
    add_upsample: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    remat: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skips: Sequence[jax.Array], temb: jax.Array,
                 context: Optional[jax.Array]) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        resnet_cls = layers.maybe_remat(ResnetBlock2D, self.remat)
        skips = list(skips)
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
            x = resnet_cls(self.out_channels, self.norm_num_groups, self.norm_eps,
                           name=f"resnets_{i}", **kw)(x, temb)
            if self.cross_attention:
                x = _transformer(self, f"attentions_{i}", self.out_channels)(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


def _transformer(block: nn.Module, name: str, channels: int) -> Transformer2DModel:
    """The block's ``Transformer2DModel``: heads from config, head dim = channels // heads."""
    return Transformer2DModel(
        block.num_heads, channels // block.num_heads, block.transformer_layers,
        block.norm_num_groups, block.use_linear_projection, block.upcast_attention,
        block.remat, block.attention_impl, name=name, dtype=block.dtype,
        param_dtype=block.param_dtype)


# ----------------------------------------------------------------------------------------
# The encoder half, shared by the UNet and the ControlNet


class UNetEncoderFields(nn.Module):
    """Fields of the encoder half (time embedding, ``conv_in``, down blocks, mid block).

    A base class so ``UNet2DConditionModel`` and ``ControlNetModel`` are configured the same
    way; :func:`embed_time` and :func:`encode` build the layers inside a subclass's call.
    Per-block fields accept an int (same for every block) or one value per block.
    """

    in_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
    layers_per_block: IntOrSeq = 2
    transformer_layers_per_block: IntOrSeq = 1
    num_attention_heads: IntOrSeq = 8
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    conv_in_kernel: int = 3
    remat: bool = False
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


ENCODER_FIELDS: tuple[str, ...] = tuple(
    f for f in UNetEncoderFields.__dataclass_fields__ if f not in ("parent", "name"))


def per_block(value: IntOrSeq, n: int, field: str) -> tuple[int, ...]:
    """An int broadcast to ``n`` blocks, or a length-``n`` sequence as a tuple."""
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{field} has {len(value)} entries, need one per block ({n})")
    return value


def embed_time(m: UNetEncoderFields, timesteps: jax.Array, batch: int) -> jax.Array:
    """Sinusoidal projection + ``time_embedding`` MLP; call inside ``m``'s compact call."""
    t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timesteps)), (batch,))
    emb = timestep_embedding(t, m.block_out_channels[0], m.flip_sin_to_cos, m.freq_shift)
    return TimestepEmbedding(m.block_out_channels[0] * 4, name="time_embedding", dtype=m.dtype,
                             param_dtype=m.param_dtype)(emb.astype(m.dtype))


def block_kwargs(m: UNetEncoderFields) -> dict[str, Any]:
    return dict(norm_num_groups=m.norm_num_groups, norm_eps=m.norm_eps,
                use_linear_projection=m.use_linear_projection,
                upcast_attention=m.upcast_attention, remat=m.remat,
                attention_impl=m.attention_impl, dtype=m.dtype, param_dtype=m.param_dtype)


def conv_in(m: UNetEncoderFields, sample: jax.Array) -> jax.Array:
    return layers.Conv(m.block_out_channels[0], m.conv_in_kernel, name="conv_in", dtype=m.dtype,
                       param_dtype=m.param_dtype)(sample.astype(m.dtype))


def encode(m: UNetEncoderFields, h: jax.Array, temb: jax.Array, context: jax.Array
           ) -> tuple[jax.Array, list[jax.Array]]:
    """Down blocks on ``conv_in``'s output ``h``; returns (down output, skip features).

    The skips are diffusers' ``down_block_res_samples``: ``conv_in`` output first, then every
    block's resnet/downsampler outputs. The mid block is separate (:func:`mid_block`) so the
    UNet can add control residuals in between.
    """
    n = len(m.block_out_channels)
    nlayers = per_block(m.layers_per_block, n, "layers_per_block")
    heads = per_block(m.num_attention_heads, n, "num_attention_heads")
    tlayers = per_block(m.transformer_layers_per_block, n, "transformer_layers_per_block")
    skips = [h]
    for i, kind in enumerate(m.down_block_types):
        h, res = DownBlock2D(
            m.block_out_channels[i], nlayers[i], cross_attention=kind == CROSS_ATTN_DOWN,
            num_heads=heads[i], transformer_layers=tlayers[i], add_downsample=i < n - 1,
            downsample_padding=m.downsample_padding, name=f"down_blocks_{i}",
            **block_kwargs(m))(h, temb, context)
        skips.extend(res)
    return h, skips


def mid_block(m: UNetEncoderFields, h: jax.Array, temb: jax.Array, context: jax.Array
              ) -> jax.Array:
    n = len(m.block_out_channels)
    return UNetMidBlock2DCrossAttn(
        m.block_out_channels[-1],
        num_heads=per_block(m.num_attention_heads, n, "num_attention_heads")[-1],
        transformer_layers=per_block(m.transformer_layers_per_block, n,
                                     "transformer_layers_per_block")[-1],
        output_scale_factor=m.mid_block_scale_factor, name="mid_block",
        **block_kwargs(m))(h, temb, context)


def apply_scale_shift(f: jax.Array, ss: ScaleShift) -> jax.Array:
    """FaSDiff's modulation of one UNet feature: ``f * (1 + scale) + shift``; None = identity."""
    if ss is None:
        return f
    scale, shift = ss
    return f * (1 + scale.astype(f.dtype)) + shift.astype(f.dtype)


# ----------------------------------------------------------------------------------------
# diffusers config -> our fields


def _unsupported(field: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"config field {field}={value!r} is not supported: {why}")


# field -> (value that is supported, explanation)
_MUST_BE = {
    "addition_embed_type": (None, "additional embeddings (SDXL text_time, ...) are not implemented"),
    "class_embed_type": (None, "class embeddings are not implemented"),
    "num_class_embeds": (None, "class embeddings are not implemented"),
    "encoder_hid_dim": (None, "encoder_hid_proj is not implemented"),
    "encoder_hid_dim_type": (None, "encoder_hid_proj is not implemented"),
    "time_cond_proj_dim": (None, "timestep conditioning (LCM) is not implemented"),
    "resnet_time_scale_shift": ("default", "only 'default' time embedding norm is implemented"),
    "dual_cross_attention": (False, "dual cross attention is not implemented"),
    "attention_type": ("default", "only 'default' attention is implemented"),
    "act_fn": ("silu", "only SiLU activations are implemented"),
    "center_input_sample": (False, "input centering is not implemented"),
    "time_embedding_type": ("positional", "only positional time embeddings are implemented"),
    "time_embedding_dim": (None, "a custom time embedding size is not implemented"),
    "time_embedding_act_fn": (None, "a time embedding activation is not implemented"),
    "timestep_post_act": (None, "a post-timestep activation is not implemented"),
    "resnet_skip_time_act": (False, "not implemented"),
    "resnet_out_scale_factor": (1.0, "not implemented"),
    "class_embeddings_concat": (False, "class embeddings are not implemented"),
    "cross_attention_norm": (None, "cross-attention norm is not implemented"),
    "reverse_transformer_layers_per_block": (None, "asymmetric UNets are not implemented"),
    "mid_block_type": (MID_CROSS_ATTN, "only UNetMidBlock2DCrossAttn is implemented"),
}


def encoder_kwargs_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the encoder-related part of a diffusers UNet/ControlNet config."""
    for field, (ok, why) in _MUST_BE.items():
        value = cfg.get(field, ok)
        if field == "act_fn" and value == "swish":  # diffusers' alias of SiLU
            continue
        if value != ok and not (ok is False and not value):
            raise _unsupported(field, cfg[field], why)
    oca = cfg.get("only_cross_attention", False)
    if any(oca) if isinstance(oca, (list, tuple)) else oca:
        raise _unsupported("only_cross_attention", oca, "cross-attention-only blocks are not implemented")
    if cfg.get("mid_block_only_cross_attention"):
        raise _unsupported("mid_block_only_cross_attention", cfg["mid_block_only_cross_attention"],
                           "not implemented")
    block_out = config_channels(cfg, "block_out_channels", (320, 640, 1280, 1280))
    n = len(block_out)
    down = cfg.get("down_block_types", UNetEncoderFields.down_block_types)
    if not isinstance(down, (list, tuple)):
        raise invalid_field("down_block_types", down, "need a list of block type names")
    down = tuple(down)
    for t in down:
        if t not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
            raise _unsupported("down_block_types", t, f"only {CROSS_ATTN_DOWN} and {PLAIN_DOWN}")
    if len(down) != n:
        raise UnsupportedConfigError(
            f"config field down_block_types has {len(down)} entries but block_out_channels {n}")
    if cfg.get("norm_num_groups", 32) is None:
        raise _unsupported("norm_num_groups", None, "GroupNorm is required")
    cad = config_ints(cfg, "cross_attention_dim", 1280, n)
    if len(set(cad)) != 1:
        raise _unsupported("cross_attention_dim", cfg["cross_attention_dim"],
                           "one cross-attention dim for all blocks")
    # diffusers: num_attention_heads = num_attention_heads or attention_head_dim
    heads_field = "num_attention_heads" if cfg.get("num_attention_heads") else "attention_head_dim"
    tl = cfg.get("transformer_layers_per_block", 1)
    if isinstance(tl, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tl):
        raise _unsupported("transformer_layers_per_block", tl, "nested per-layer lists")
    kw = dict(
        in_channels=config_int(cfg, "in_channels", 4),
        block_out_channels=block_out,
        down_block_types=down,
        layers_per_block=config_ints(cfg, "layers_per_block", 2, n),
        transformer_layers_per_block=config_ints(cfg, "transformer_layers_per_block", 1, n),
        num_attention_heads=config_ints(cfg, heads_field, 8, n),
        cross_attention_dim=cad[0],
        use_linear_projection=config_flag(cfg, "use_linear_projection", False),
        upcast_attention=config_flag(cfg, "upcast_attention", False),
        norm_num_groups=config_int(cfg, "norm_num_groups", 32),
        norm_eps=config_float(cfg, "norm_eps", 1e-5, positive=True),
        flip_sin_to_cos=config_flag(cfg, "flip_sin_to_cos", True),
        freq_shift=config_float(cfg, "freq_shift", 0),
        downsample_padding=config_int(cfg, "downsample_padding", 1, minimum=0),
        mid_block_scale_factor=config_float(cfg, "mid_block_scale_factor", 1.0),
        conv_in_kernel=config_int(cfg, "conv_in_kernel", 3),
    )
    check_groups(kw["norm_num_groups"], block_out)
    for i, (c, h) in enumerate(zip(block_out, kw["num_attention_heads"])):
        if c % h:
            raise UnsupportedConfigError(
                f"config field {heads_field}: block {i} has {c} channels, not divisible "
                f"into {h} heads")
    return kw


# ----------------------------------------------------------------------------------------
# The UNet


class UNet2DConditionModel(UNetEncoderFields):
    """SD 1.x / 2.x denoising UNet (NHWC). Params float32; ``dtype`` is the compute dtype.

    ``__call__(sample, timesteps, encoder_hidden_states, down_block_additional_residuals=None,
    mid_block_additional_residual=None, modulation=None)``:

    * ``sample`` (B, H, W, C); ``timesteps`` scalar or (B,); ``encoder_hidden_states`` (B, L, D).
      H and W must be multiples of ``2 ** (len(block_out_channels) - 1)``.
    * ``down_block_additional_residuals`` / ``mid_block_additional_residual``: ControlNet
      outputs, added to the skip features / the mid block output exactly as diffusers does.
    * ``modulation``: FaSDiff's low-frequency modulation, ``{'down': [ss_0, ...], 'mid': ss}``,
      each ``ss`` a ``(scale, shift)`` pair broadcastable to its feature ((B,1,1,C) or
      (B,H,W,C)) or None. ``'down'`` has one entry per skip feature, in the order of
      ``down_block_additional_residuals``. Applied as ``f * (1 + scale) + shift`` *after*
      the control residuals are added. ``None`` (or a missing key) is the identity.
    """

    out_channels: int = 4
    up_block_types: tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
    conv_out_kernel: int = 3

    @classmethod
    def from_diffusers_config(cls, cfg: dict, **overrides: Any) -> "UNet2DConditionModel":
        """Our module for a diffusers ``UNet2DConditionModel`` config; raises
        :class:`UnsupportedConfigError` naming the field for features we do not implement."""
        kw = encoder_kwargs_from_config(cfg)
        up = cfg.get("up_block_types", cls.up_block_types)
        if not isinstance(up, (list, tuple)):
            raise invalid_field("up_block_types", up, "need a list of block type names")
        up = tuple(up)
        want_up = tuple(CROSS_ATTN_UP if t == CROSS_ATTN_DOWN else PLAIN_UP
                        for t in reversed(kw["down_block_types"]))
        for t in up:
            if t not in (CROSS_ATTN_UP, PLAIN_UP):
                raise _unsupported("up_block_types", t, f"only {CROSS_ATTN_UP} and {PLAIN_UP}")
        if up != want_up:
            raise _unsupported("up_block_types", up, f"must mirror down_block_types ({want_up})")
        kw.update(out_channels=config_int(cfg, "out_channels", 4), up_block_types=up,
                  conv_out_kernel=config_int(cfg, "conv_out_kernel", 3))
        kw.update(overrides)
        return cls(**kw)

    def dummy_inputs(self) -> tuple:
        s = 2 ** (len(self.block_out_channels) - 1)
        return (jnp.zeros((1, s, s, self.in_channels), jnp.float32), jnp.zeros((1,), jnp.int32),
                jnp.zeros((1, 1, self.cross_attention_dim), jnp.float32))

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        down_block_additional_residuals: Optional[Sequence[jax.Array]] = None,
        mid_block_additional_residual: Optional[jax.Array] = None,
        modulation: Optional[Mapping[str, Any]] = None,
    ) -> jax.Array:
        n = len(self.block_out_channels)
        b, height, width, _ = sample.shape
        if height % 2 ** (n - 1) or width % 2 ** (n - 1):
            raise ValueError(f"sample size {height}x{width} must be a multiple of {2 ** (n - 1)}")
        context = encoder_hidden_states.astype(self.dtype)
        temb = embed_time(self, timesteps, b)
        h = conv_in(self, sample)
        h, skips = encode(self, h, temb, context)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals has "
                                 f"{len(down_block_additional_residuals)} entries, need {len(skips)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        h = mid_block(self, h, temb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)
        if modulation is not None:
            down_mod = modulation.get("down")
            if down_mod is not None:
                if len(down_mod) != len(skips):
                    raise ValueError(f"modulation['down'] has {len(down_mod)} entries, "
                                     f"need {len(skips)} (one per skip feature)")
                skips = [apply_scale_shift(s, ss) for s, ss in zip(skips, down_mod)]
            h = apply_scale_shift(h, modulation.get("mid"))

        nlayers = per_block(self.layers_per_block, n, "layers_per_block")[::-1]
        heads = per_block(self.num_attention_heads, n, "num_attention_heads")[::-1]
        tlayers = per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")[::-1]
        for i, kind in enumerate(self.up_block_types):
            k = nlayers[i] + 1
            res, skips = skips[-k:], skips[:-k]
            h = UpBlock2D(
                self.block_out_channels[::-1][i], k, cross_attention=kind == CROSS_ATTN_UP,
                num_heads=heads[i], transformer_layers=tlayers[i], add_upsample=i < n - 1,
                name=f"up_blocks_{i}", **block_kwargs(self))(h, res, temb, context)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layers.GroupNorm(self.norm_num_groups, self.norm_eps, name="conv_norm_out", **kw)(h)
        return layers.Conv(self.out_channels, self.conv_out_kernel, name="conv_out", **kw)(nn.silu(h))
