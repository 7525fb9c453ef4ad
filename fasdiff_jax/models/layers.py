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
from typing import Any, Callable, Optional, Sequence

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


def shape_differences(want: Any, have: Any) -> list[str]:
    """How the params tree ``have`` differs from ``want`` in names and shapes ('missing a/b',
    'unexpected a/c', 'a/d: (3,) != (4,)'), sorted; empty when they fit. Params of another
    config otherwise failed deep inside flax or Orbax."""
    def shapes(tree: Any) -> dict[str, tuple]:
        return {jax.tree_util.keystr(path, simple=True, separator="/"):
                tuple(getattr(leaf, "shape", None) or jnp.shape(leaf))
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    w, h = shapes(want), shapes(have)
    return sorted([f"missing {k}" for k in w.keys() - h.keys()]
                  + [f"unexpected {k}" for k in h.keys() - w.keys()]
                  + [f"{k}: {h[k]} != {w[k]}" for k in w.keys() & h.keys() if w[k] != h[k]])


# ----------------------------------------------------------------------------------------
# 2-D convolution with gradients that XLA:CPU runs fast everywhere, loops included (canonical
# forward convs for both gradients, sub-pixel input gradient of strided convs).
_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, w, strides, pads, rhs_dilation=None):
    return jax.lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=rhs_dilation,
                                        dimension_numbers=_NHWC)


# Up to this many output positions (batch x height x width), with this many channels in and
# out, a conv and its input gradient run faster on CPU as one GEMM each than as XLA:CPU's
# (YNNPACK's) convs, which use a fraction of the CPU on small maps. `benchmarks/conv_forms.py`
# (2-core EPYC), 3x3 1280->1280: 1x8x8 forward 42.9 -> 13.2 ms, input gradient 65.4 -> 17.4
# ms; 1x16x16 69.5 -> 40.3 and 93.2 -> 46.1 ms; at 1x32x32 640->640 the convs win (input
# gradient 44.5 vs 50.8), and at 128 channels too (2x16x16: 0.99 vs 1.18 ms forward).
_GEMM_MAX_POSITIONS = 512
_GEMM_MIN_CHANNELS = 256


def _gemm_conv_pays(positions: int, w_shape) -> bool:
    """Whether a conv with this many output positions (its input gradient: dy's) takes the
    GEMM forms on CPU: small maps, many channels."""
    return positions <= _GEMM_MAX_POSITIONS and min(w_shape[2], w_shape[3]) >= _GEMM_MIN_CHANNELS


def _conv_gemm(x, w, strides, pads):
    """A conv as one GEMM: the taps' (strided) windows of x stacked, (N, Ho, Wo, kh, kw, C),
    contracted with the kernel (kh, kw, C, O) read in place (no copy of it: on small maps the
    kernel is the big operand)."""
    kh, kw, c, _ = w.shape
    (sh, sw) = strides
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))  # pads may be < 0
    n, hp, wp, _ = xp.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    cols = jnp.stack([jnp.stack([
        jax.lax.slice(xp, (0, a, b, 0), (n, a + sh * (ho - 1) + 1, b + sw * (wo - 1) + 1, c),
                      (1, sh, sw, 1)) for b in range(kw)], 3) for a in range(kh)], 3)
    return jax.lax.dot_general(cols, w, (((3, 4, 5), (0, 1, 2)), ((), ())))


def _forward(x, w, strides, pads):
    """The conv itself: on CPU :func:`_conv_gemm` where :func:`_gemm_conv_pays`, else XLA's."""
    lax_conv = functools.partial(_lax_conv, strides=strides, pads=pads)
    n, h, wd, _ = x.shape
    kh, kw = w.shape[:2]
    ho = (h + sum(pads[0]) - kh) // strides[0] + 1
    wo = (wd + sum(pads[1]) - kw) // strides[1] + 1
    if not _gemm_conv_pays(n * ho * wo, w.shape):
        return lax_conv(x, w)
    return jax.lax.platform_dependent(
        x, w, cpu=lambda x, w: _conv_gemm(x, w, strides, pads), default=lax_conv)


# The one-GEMM kernel gradient wins from this output area and this many rows of its GEMM
# (stride^2 x input channels) on; below, the conv form does. `benchmarks/kernel_gradients.py`
# on a 2-core Xeon, batch 8: 3x3 320->320 at 64 px 1713 -> 451 ms, 640 at 32 px 895 -> 335,
# 5x5/2 128->128 at 128 px 514 -> 276; kept as convs: 3->128 5x5/2 at 256 px 149 (vs 349),
# 1280 at 16 px 338 (vs 343), 128->192 5x5/2 at 32 px 15 (vs 22).
_GEMM_KERNEL_GRAD_MIN_AREA = 1024
_GEMM_KERNEL_GRAD_MIN_ROWS = 128


def _gemm_kernel_grad_pays(dy_shape, w_shape, strides, pads) -> bool:
    """Whether :func:`_kernel_grad` takes the one-GEMM form: large maps, enough channels."""
    _, ho, wo, _ = dy_shape
    return (ho * wo >= _GEMM_KERNEL_GRAD_MIN_AREA
            and strides[0] * strides[1] * w_shape[2] >= _GEMM_KERNEL_GRAD_MIN_ROWS
            and min(pads[0][0], pads[1][0]) >= 0)


def _kernel_grad(x, dy, w_shape, strides, pads):
    """dL/dw on CPU: :func:`_kernel_grad_gemm` where it pays, else :func:`_kernel_grad_conv`."""
    if _gemm_kernel_grad_pays(dy.shape, w_shape, strides, pads):
        return _kernel_grad_gemm(x, dy, w_shape, strides, pads)
    return _kernel_grad_conv(x, dy, w_shape, strides, pads)


def _kernel_grad_gemm(x, dy, w_shape, strides, pads):
    """dL/dw as one GEMM: the padded x in space-to-depth form by the stride, (N*Hs*Ws, s*s*C),
    contracted over every position with dy placed at each of the A x B offsets of the
    kernel's taps in that form, (N*Hs*Ws, A*B*O); then the (s*s*C, A*B*O) product is
    rearranged to (kh, kw, C, O). On large maps with many channels XLA:CPU runs this one
    GEMM 1.2-3.8x faster than the conv form (:func:`_kernel_grad_conv`); the price is A*B
    shifted copies of dy (9x its size for a 3x3 or a 5x5/2 kernel)."""
    kh, kw, c, o = w_shape
    (sh, sw), ((pt, _), (pl, _)) = strides, pads
    n, ho, wo, _ = dy.shape
    taps_h, taps_w = -(-kh // sh), -(-kw // sw)  # kernel taps per phase, rounded up
    hs, ws = ho + taps_h - 1, wo + taps_w - 1  # rows/cols of the space-to-depth grid used
    x = x[:, :sh * hs - pt, :sw * ws - pl]
    x = jnp.pad(x, ((0, 0), (pt, sh * hs - pt - x.shape[1]), (pl, sw * ws - pl - x.shape[2]),
                    (0, 0)))
    xs = x.reshape(n, hs, sh, ws, sw, c).transpose(0, 1, 3, 2, 4, 5)
    shifted = jnp.concatenate([jnp.pad(dy, ((0, 0), (a, hs - ho - a), (b, ws - wo - b), (0, 0)))
                               for a in range(taps_h) for b in range(taps_w)], -1)
    g = jax.lax.dot_general(xs.reshape(n * hs * ws, sh * sw * c),
                            shifted.reshape(n * hs * ws, taps_h * taps_w * o),
                            (((0,), (0,)), ((), ())))
    g = g.reshape(sh, sw, c, taps_h, taps_w, o).transpose(3, 0, 4, 1, 2, 5)
    return g.reshape(taps_h * sh, taps_w * sw, c, o)[:kh, :kw]


def _kernel_grad_conv(x, dy, w_shape, strides, pads):
    """dL/dw as a forward NHWC x HWIO conv: x with batch and channels swapped, (C, H, W, B),
    over dy as a (Ho, Wo, B, O) kernel dilated by the stride, giving (C, kh, kw, O).

    XLA:CPU rewrites its own kernel gradient into this form (and a YNNPACK kernel) only outside
    loops; inside a ``lax.scan`` (gradient accumulation) it stays a non-canonical conv that ran
    73x slower (5x5/2, 2 x 4x128x128x128: 23.6 s vs 0.32 s). Outside loops the two take the same
    time (0.40 vs 0.42 s) and gave identical bits there."""
    kh, kw, _, _ = w_shape
    (sh, sw), ((pt, _), (pl, _)) = strides, pads
    _, ho, wo, _ = dy.shape
    span_h, span_w = sh * (ho - 1) + kh, sw * (wo - 1) + kw  # padded input rows/cols used
    x = x[:, :span_h - pt, :span_w - pl]  # rows past the last window never meet dy
    pad_h = (pt, span_h - pt - x.shape[1])
    pad_w = (pl, span_w - pl - x.shape[2])
    g = _lax_conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
                  (pad_h, pad_w), rhs_dilation=strides)
    return jnp.transpose(g, (1, 2, 0, 3))


def _flipping_maps_pays(dy_shape, w_shape, x_hw) -> bool:
    """Whether :func:`_input_grad_stride1` flips dy and dx rather than the kernel: when the
    kernel has more elements than the two maps. XLA:CPU fuses the kernel's flip and transpose
    into one loop 4-5x slower than a plain transpose of it (8.6 vs 1.8-2.0 ms for
    3x3x1024x512); the maps' flips fuse into the ops around them."""
    kh, kw, c, o = w_shape
    n, ho, wo, _ = dy_shape
    return kh * kw > 1 and kh * kw * c * o > n * (ho * wo * o + x_hw[0] * x_hw[1] * c)


def _input_grad_stride1(dy, w, pads):
    """dL/dx of a stride-1 conv: :func:`_input_grad_gemm` where :func:`_gemm_conv_pays`;
    else a forward conv, :func:`_input_grad_flipped_maps` where the kernel outsizes the maps,
    otherwise :func:`_input_grad_flipped_kernel`. XLA:CPU's own stays non-canonical inside
    loops (0.61 vs 0.14 s, 3x3, 8x64x64x128)."""
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = pads
    if _gemm_conv_pays(dy.shape[0] * dy.shape[1] * dy.shape[2], w.shape):
        return _input_grad_gemm(dy, w, pads)
    x_hw = (dy.shape[1] + kh - 1 - pt - pb, dy.shape[2] + kw - 1 - pl - pr)
    if _flipping_maps_pays(dy.shape, w.shape, x_hw):
        return _input_grad_flipped_maps(dy, w, pads)
    return _input_grad_flipped_kernel(dy, w, pads)


def _input_grad_flipped_kernel(dy, w, pads):
    """dL/dx of a stride-1 conv: dy correlated with the flipped kernel, in/out swapped."""
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = pads
    k = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
    return _lax_conv(dy, k, (1, 1), ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))


def _input_grad_flipped_maps(dy, w, pads):
    """dL/dx of a stride-1 conv without flipping the kernel: a correlation with the flipped
    kernel is the flip of the flipped dy's correlation with the kernel itself, each pad moved
    to the other end. The kernel only has its in/out axes swapped (a plain transpose)."""
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = pads
    g = _lax_conv(jnp.flip(dy, (1, 2)), jnp.transpose(w, (0, 1, 3, 2)), (1, 1),
                  ((kh - 1 - pb, kh - 1 - pt), (kw - 1 - pr, kw - 1 - pl)))
    return jnp.flip(g, (1, 2))


def _input_grad_gemm(dy, w, pads):
    """dL/dx of a stride-1 conv as one GEMM over the out channels, dy (N, Ho, Wo, O) with the
    kernel (kh, kw, C, O) read in place, then each tap's (N, Ho, Wo, C) slab shifted to its
    place and summed. The product is kh*kw times dx's size, so this is for small maps
    (:func:`_input_grad_stride1`), where YNNPACK's convs use a fraction of the CPU."""
    kh, kw, c, o = w.shape
    (pt, pb), (pl, pr) = pads
    n, ho, wo, _ = dy.shape
    h, wd = ho + kh - 1 - pt - pb, wo + kw - 1 - pl - pr
    # as 2-D operands: with the kernel 4-D, XLA:CPU copies it into (O, kh*kw*C) first
    g = jax.lax.dot_general(dy.reshape(n * ho * wo, o), w.reshape(kh * kw * c, o),
                            (((1,), (1,)), ((), ()))).reshape(n, ho, wo, kh, kw, c)
    # dx[i] = sum over taps a of g[i + pt - a, tap a]: pad g so every slice is in range
    lo_h, hi_h = max(kh - 1 - pt, 0), max(h + pt - ho, 0)
    lo_w, hi_w = max(kw - 1 - pl, 0), max(wd + pl - wo, 0)
    g = jnp.pad(g, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0), (0, 0), (0, 0)))
    out = None
    for a in range(kh):
        for b in range(kw):
            r0, c0 = lo_h + pt - a, lo_w + pl - b
            part = g[:, r0:r0 + h, c0:c0 + wd, a, b]
            out = part if out is None else out + part
    return out


def _phase_kernel(w, k: int, s: int, p: int, axis: int):
    """For the input gradient of a stride-``s`` conv along ``axis``: per input phase r, the
    kernel taps in correlation order over dy offsets ``d_min..d_max`` (zeros where a phase has
    no tap at an offset), and those two offsets."""
    offsets = {r: {(r + p - j) // s: j for j in range(k) if (r + p - j) % s == 0} for r in range(s)}
    d_min = min(min(o) for o in offsets.values() if o)
    d_max = max(max(o) for o in offsets.values() if o)
    zero = jnp.zeros_like(jax.lax.slice_in_dim(w, 0, 1, axis=axis))
    phases = [jnp.concatenate([jax.lax.slice_in_dim(w, offsets[r][d], offsets[r][d] + 1, axis=axis)
                               if d in offsets[r] else zero for d in range(d_min, d_max + 1)], axis)
              for r in range(s)]
    return phases, d_min, d_max


def _input_grad_subpixel(dy, w, x_shape, strides, pads):
    """dL/dx of a strided conv as one stride-1 conv over dy giving every input phase, then
    depth-to-space: XLA:CPU computes it as an lhs-dilated conv, 2.5x slower than the forward."""
    kh, kw, c, o = w.shape
    (sh, sw), ((pt, _), (pl, _)) = strides, pads
    b, ho, wo, _ = dy.shape
    rows, h_min, h_max = _phase_kernel(w, kh, sh, pt, 0)
    kernels = []
    for row in rows:
        cols, w_min, w_max = _phase_kernel(row, kw, sw, pl, 1)
        kernels += cols
    # (T_h, T_w, C, O) per phase -> (T_h, T_w, O, phases * C)
    k = jnp.concatenate([jnp.swapaxes(q, 2, 3) for q in kernels], axis=-1)
    mh, mw = -(-x_shape[1] // sh), -(-x_shape[2] // sw)
    pad_h = (-h_min, h_max + mh - ho)
    pad_w = (-w_min, w_max + mw - wo)
    dyp = jnp.pad(dy, ((0, 0), (max(pad_h[0], 0), max(pad_h[1], 0)),
                       (max(pad_w[0], 0), max(pad_w[1], 0)), (0, 0)))
    dyp = dyp[:, max(-pad_h[0], 0):dyp.shape[1] - max(-pad_h[1], 0),
              max(-pad_w[0], 0):dyp.shape[2] - max(-pad_w[1], 0)]
    g = _lax_conv(dyp, k, (1, 1), ((0, 0), (0, 0)))  # (B, mh, mw, sh*sw*C)
    g = g.reshape(b, mh, mw, sh, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, mh * sh, mw * sw, c)
    return g[:, :x_shape[1], :x_shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_cpu_grads(x, w, strides, pads):
    return _forward(x, w, strides, pads)


def _conv_cpu_grads_fwd(x, w, strides, pads):
    return _forward(x, w, strides, pads), (x, w)


def _conv_cpu_grads_bwd(strides, pads, res, dy):
    x, w = res
    xla_dx = lambda dy: jax.vjp(lambda x: _lax_conv(x, w, strides, pads), x)[1](dy)[0]  # noqa
    xla_dw = lambda x, dy: jax.vjp(lambda w: _lax_conv(x, w, strides, pads), w)[1](dy)[0]  # noqa
    if strides == (1, 1):
        cpu_dx = lambda dy: _input_grad_stride1(dy, w, pads)  # noqa: E731
    else:
        cpu_dx = lambda dy: _input_grad_subpixel(dy, w, x.shape, strides, pads)  # noqa: E731
    dx = jax.lax.platform_dependent(dy, cpu=lambda dy: cpu_dx(dy).astype(x.dtype), default=xla_dx)
    dw = jax.lax.platform_dependent(
        x, dy, cpu=lambda x, dy: _kernel_grad(x, dy, w.shape, strides, pads).astype(w.dtype),
        default=xla_dw)
    return dx, dw


_conv_cpu_grads.defvjp(_conv_cpu_grads_fwd, _conv_cpu_grads_bwd)


def conv2d(x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Any = ((0, 0), (0, 0)), lhs_dilation: Any = None, rhs_dilation: Any = None,
           dimension_numbers: Any = None, feature_group_count: int = 1,
           precision: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` (same signature, so ``nn.Conv`` can take it) for NHWC x
    HWIO convs, with gradients written as canonical forward convs on CPU.

    XLA:CPU turns its own conv gradients into canonical convs (and YNNPACK kernels) only outside
    loops, so inside a ``lax.scan`` they ran 5-73x slower; ours (:func:`_kernel_grad`,
    :func:`_input_grad_stride1`) are that form already. Strided convs get their input gradient
    in sub-pixel form (:func:`_input_grad_subpixel`; XLA:CPU's own, an lhs-dilated conv, is 2.5x
    slower). On small maps with many channels (:func:`_gemm_conv_pays`) the conv and its
    stride-1 input gradient are one GEMM each (:func:`_conv_gemm`, :func:`_input_grad_gemm`):
    YNNPACK's convs use a fraction of the CPU there. Other backends keep XLA's own conv and
    gradients. Dilated, grouped or non-NHWC convs go straight to ``lax.conv_general_dilated``.
    """
    strides = tuple(strides)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, _NHWC)
    plain = (x.ndim == 4 and feature_group_count == 1 and precision is None
             and all(d in (None, 1) or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and (dimension_numbers is None
                  or jax.lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers) == dn))
    if not plain:
        return jax.lax.conv_general_dilated(
            x, w, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            precision=precision)
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_cpu_grads(x, w, strides, pads)


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
        conv_general_dilated=conv2d,
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
    """Einsum/softmax attention with a hand-written backward pass. q,k,v: (B, L, H, D)."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    return _attention_explicit_grad(q, k, v, causal)


def _xla_autodiff_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, upcast: bool, causal: bool = False
) -> jax.Array:
    """The same forward, differentiated by JAX (the reference for the hand-written backward)."""
    if upcast:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
    return _attention_forward(q, k, v, causal)[0]


def _attention_forward(
    q: jax.Array, k: jax.Array, v: jax.Array, causal: bool
) -> tuple[jax.Array, jax.Array]:
    """(output, softmax weights); logits in q's dtype, the softmax in float32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
    if causal:
        keep = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v), weights


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention_explicit_grad(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool) -> jax.Array:
    """Attention whose backward uses rowsum(dO * O) for the softmax's Jacobian.

    Autodiff of the softmax reduces dP * P over the (L, L) weights; the identity
    sum_k dP_qk P_qk = sum_d dO_qd O_qd (FlashAttention's backward) needs only (L, D) arrays,
    which saves a full pass over the weights: 2x1024 tokens, 2 heads of 64 on a 2-core CPU,
    fwd+bwd 27-31 vs 43-51 ms, torch's 25-27 (benchmarks/RESULTS.md). Masked keys have zero
    weight and so zero gradient, as with autodiff.
    """
    return _attention_forward(q, k, v, causal)[0]


def _attention_explicit_grad_fwd(q, k, v, causal):
    out, weights = _attention_forward(q, k, v, causal)
    return out, (q, k, v, out, weights)


def _attention_explicit_grad_bwd(causal, residuals, d_out):
    del causal  # masked positions have zero weight, hence zero gradient
    q, k, v, out, weights = residuals
    scale = q.shape[-1] ** -0.5
    d_v = jnp.einsum("bhqk,bqhd->bkhd", weights, d_out.astype(v.dtype))
    d_weights = jnp.einsum("bqhd,bkhd->bhqk", d_out.astype(v.dtype), v).astype(jnp.float32)
    row = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_logits = (weights.astype(jnp.float32) * (d_weights - row[..., None])).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bkhd->bqhd", d_logits, k) * jnp.asarray(scale, q.dtype)
    d_k = jnp.einsum("bhqk,bqhd->bkhd", d_logits, q) * jnp.asarray(scale, k.dtype)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)


_attention_explicit_grad.defvjp(_attention_explicit_grad_fwd, _attention_explicit_grad_bwd)


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
    "xla_autodiff": _xla_autodiff_attention,
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
