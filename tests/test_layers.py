"""layers.conv2d: the CPU gradient path (per-tap kernel gradient, sub-pixel input gradient)
equals XLA's own gradient of lax.conv_general_dilated, and flax's nn.Conv accepts it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fasdiff_jax.models import layers


def _lax(x, w, strides, padding):
    return jax.lax.conv_general_dilated(x, w, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (input shape, kernel size, out channels, strides, padding): odd sizes, asymmetric and
# string padding, strides 1/2/3, kernels 1..5.
CASES = [
    ((2, 13, 11, 5), 5, 7, (2, 2), ((2, 2), (2, 2))),
    ((2, 12, 10, 5), 3, 7, (2, 2), ((0, 1), (0, 1))),  # diffusers' VAE downsample
    ((2, 12, 9, 5), 3, 7, (2, 2), ((1, 1), (1, 1))),
    ((1, 10, 11, 3), 4, 2, (3, 2), ((1, 2), (0, 1))),
    ((1, 9, 9, 2), 2, 3, (2, 2), ((0, 0), (0, 0))),
    ((2, 8, 7, 4), 3, 6, (1, 1), ((1, 1), (1, 1))),
    ((2, 8, 7, 4), 1, 6, (1, 1), ((0, 0), (0, 0))),
    ((1, 11, 8, 3), 3, 4, (2, 1), "SAME"),
]


@pytest.mark.parametrize("shape,k,out,strides,padding", CASES)
def test_conv2d_value_and_gradients_match_lax(shape, k, out, strides, padding, monkeypatch):
    monkeypatch.setattr(layers, "_TAP_MIN_ROWS", 0)  # the per-tap path on these small convs
    monkeypatch.setattr(layers, "_TAP_MIN_CHANNELS", 0)
    monkeypatch.setattr(layers, "_TAP_MIN_OUT", 0)
    rng = np.random.default_rng(sum(shape) + k)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, shape[-1], out)), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding)))

    np.testing.assert_allclose(np.asarray(layers.conv2d(x, w, strides, padding)),
                               np.asarray(_lax(x, w, strides, padding)), rtol=1e-6, atol=1e-5)
    ours = jax.jit(jax.grad(loss(layers.conv2d), (0, 1)))(x, w)
    ref = jax.jit(jax.grad(loss(_lax), (0, 1)))(x, w)
    for name, a, b in zip(("dx", "dw"), ours, ref):
        assert a.shape == b.shape, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.abs(b).max()),
                                   err_msg=name)


def test_flax_conv_uses_it_and_other_convs_fall_back():
    conv = layers.Conv(4, 3, 2, name="c")
    x = jnp.ones((1, 8, 8, 3))
    params = conv.init(jax.random.key(0), x)
    ref = nn.Conv(4, (3, 3), (2, 2), padding=((1, 1), (1, 1))).apply(
        {"params": jax.tree.map(nn.unbox, params["params"])}, x)
    np.testing.assert_allclose(np.asarray(conv.apply(params, x)), np.asarray(ref), rtol=1e-6)
    # grouped and dilated convs are passed through to lax unchanged
    w = jnp.ones((3, 3, 1, 4))
    got = layers.conv2d(jnp.ones((1, 8, 8, 4)), w, (1, 1), ((1, 1), (1, 1)),
                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
    want = jax.lax.conv_general_dilated(jnp.ones((1, 8, 8, 4)), w, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=4)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
