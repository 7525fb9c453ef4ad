"""Shared building blocks: layers that carry logical axis names, and one attention function.

Every parameter created here is annotated with *logical* axis names (``embed``, ``mlp``,
``heads``, ``conv_h`` ...). Which mesh axis each logical name maps to is configuration
(``config.sharding.logical_axis_rules``), applied by :mod:`fasdiff_jax.sharding`; modules
never name mesh axes themselves.

Sub-module names follow diffusers' attribute names (``conv1``, ``to_q``, ``norm1`` ...) and
list indices become ``_i`` suffixes (``resnets_0``), so :mod:`fasdiff_jax.convert` can map a
diffusers state dict onto our trees with one generic rule instead of per-model tables.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical names of parameter axes. Kept in one place so configs and tests can refer to them.
CONV_KERNEL_AXES = ("conv_h", "conv_w", "embed", "mlp")
DENSE_KERNEL_AXES = ("embed", "mlp")
QKV_KERNEL_AXES = ("embed", "heads")
ATTN_OUT_KERNEL_AXES = ("heads", "embed")

_default_kernel_init = nn.initializers.lecun_normal()


def Conv(  # noqa: N802 - a constructor that reads like a class
    features: int,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | None = None,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    kernel_init: Callable = _default_kernel_init,
) -> nn.Conv:
    """NHWC ``nn.Conv`` with torch-style symmetric padding and logical axis names."""
    pad = (kernel_size - 1) // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, CONV_KERNEL_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
        name=name,
    )


def Dense(  # noqa: N802
    features: int,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    use_bias: bool = True,
    axes: tuple[str, str] = DENSE_KERNEL_AXES,
    kernel_init: Callable = _default_kernel_init,
) -> nn.Dense:
    """``nn.Dense`` whose kernel carries logical axis names ``axes`` (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


def GroupNorm(  # noqa: N802
    num_groups: int = 32,
    epsilon: float = 1e-5,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.GroupNorm:
    """torch.nn.GroupNorm equivalent (statistics always computed in float32)."""
    return nn.GroupNorm(
        num_groups=num_groups,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


def LayerNorm(  # noqa: N802
    epsilon: float = 1e-5,
    *,
    name: str,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


# ----------------------------------------------------------------------------------------
# Attention: one entry point, implementations selectable per backend by name.


def _xla_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool = False
) -> jax.Array:
    """Reference einsum/softmax attention. q,k,v: (B, L, H, D)."""
    scale = q.shape[-1] ** -0.5
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _jax_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    upcast: bool,
    implementation: Optional[str],
    causal: bool = False,
) -> jax.Array:
    """``jax.nn.dot_product_attention``: XLA or cuDNN flash attention on GPU."""
    if upcast:
        q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
    return out


ATTENTION_IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "xla": _xla_attention,
    "dot_product": functools.partial(_jax_dot_product_attention, implementation=None),
    "cudnn": functools.partial(_jax_dot_product_attention, implementation="cudnn"),
}


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    num_heads: int,
    *,
    upcast: bool = False,
    causal: bool = False,
    impl: str = "xla",
) -> jax.Array:
    """Multi-head scaled dot-product attention on (B, L, H*D) projections.

    ``upcast`` computes the logits in float32 (diffusers' ``upcast_attention``, needed by
    SD 2.1 in half precision). ``causal`` masks future keys (CLIP's text encoder).
    ``impl`` names an entry of ``ATTENTION_IMPLEMENTATIONS``.
    """
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {impl!r}; "
            f"choose one of {sorted(ATTENTION_IMPLEMENTATIONS)}"
        )
    b, lq, inner = q.shape
    head_dim = inner // num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim)  # noqa: E731
    out = ATTENTION_IMPLEMENTATIONS[impl](split(q), split(k), split(v), upcast=upcast,
                                         causal=causal)
    return out.reshape(b, lq, inner).astype(q.dtype)


def maybe_remat(module_cls: type[nn.Module], remat: bool) -> type[nn.Module]:
    """Wrap a block class in ``nn.remat`` when activation checkpointing is configured."""
    return nn.remat(module_cls) if remat else module_cls
