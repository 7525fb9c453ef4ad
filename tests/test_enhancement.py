"""HLFE: identity at init, shapes per UNet resolution, and it sees only the low band."""

import jax
import jax.numpy as jnp
import numpy as np

from fasdiff_jax.models import enhancement, wavelets

TARGETS = ((32, 1), (32, 1), (32, 2), (64, 2), (64, 2))


def _module():
    return enhancement.HybridLowFrequencyEnhancement(down_targets=TARGETS, mid_target=(64, 2),
                                                     features=32, num_blocks=1, heads=2, groups=8)


def test_zero_init_is_identity_and_shapes_follow_targets():
    rng = np.random.default_rng(0)
    z, p = rng.normal(size=(2, 16, 16, 4)), rng.normal(size=(2, 16, 16, 8))
    m = _module()
    params = m.init(jax.random.key(0), z, p)
    mod, code = jax.jit(m.apply)(params, z, p)
    assert code.shape == (2, 32)
    for (c, s), (scale, shift) in zip(TARGETS, mod["down"]):
        assert scale.shape == (2, 16 // s, 16 // s, c) == shift.shape
        assert float(jnp.abs(scale).max()) == 0.0 and float(jnp.abs(shift).max()) == 0.0
    f = jnp.asarray(rng.normal(size=(2, 8, 8, 64)), jnp.float32)
    np.testing.assert_array_equal(enhancement.apply_modulation(f, mod["mid"]), f)


def test_output_depends_only_on_low_band_and_gradients_flow():
    rng = np.random.default_rng(1)
    z, p = rng.normal(size=(1, 16, 16, 4)), rng.normal(size=(1, 16, 16, 8))
    m = _module()
    params = m.init(jax.random.key(0), z, p)
    # Make the zero-initialised heads nonzero so the output is informative.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: v + 0.05 if "mod_" in jax.tree_util.keystr(path) else v, params)
    checker = (np.indices((16, 16)).sum(0) % 2 * 2 - 1.0)[None, :, :, None]
    bands = wavelets.haar_dwt2(jnp.asarray(checker * np.ones((1, 1, 1, 4))))
    assert float(jnp.abs(bands.ll).max()) == 0.0  # the checkerboard has no low band
    apply = jax.jit(m.apply)
    a, _ = apply(params, z, p)
    b, _ = apply(params, z + checker, p)
    np.testing.assert_allclose(a["mid"][0], b["mid"][0], atol=1e-5)
    c, _ = apply(params, z + 0.5, p)
    assert float(jnp.abs(a["mid"][0] - c["mid"][0]).max()) > 1e-4

    def loss(prm):
        out, code = m.apply(prm, z, p)
        pairs = out["down"] + [out["mid"]]
        return sum(jnp.sum(s**2) + jnp.sum(t**2) for s, t in pairs) + jnp.sum(code**2)

    grads = jax.tree_util.tree_flatten_with_path(jax.jit(jax.grad(loss))(params))[0]
    # A key bias shifts every logit of a query equally, so softmax makes its gradient zero.
    dead = [jax.tree_util.keystr(k) for k, g in grads if float(jnp.abs(g).max()) == 0]
    assert all("to_k" in d and "bias" in d for d in dead), dead
