"""Entropy models: likelihood formulas vs an independent scipy reimplementation, tables, modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fasdiff_jax.coding import decode_symbols, encode_symbols
from fasdiff_jax.models import entropy as E


def _eb(channels=4, seed=0):
    m = E.EntropyBottleneck(channels)

    @jax.jit
    def init(k1, k2):
        v = m.init(k1, jnp.zeros((1, 2, 2, channels)), "round")
        # perturb so the density is not the symmetric init
        return jax.tree_util.tree_map(lambda a: a + 0.3 * jax.random.normal(k2, a.shape), v)

    return m, init(jax.random.PRNGKey(seed), jax.random.PRNGKey(seed + 1))


def _ref_density_cdf(p, x, c):
    """Independent scalar implementation of Ballé's cumulative (plain python + math)."""
    v = np.array([[x]], np.float64)
    i = 0
    while f"matrix_{i}" in p:
        mat = np.log1p(np.exp(np.asarray(p[f"matrix_{i}"][c], np.float64)))
        v = mat @ v + np.asarray(p[f"bias_{i}"][c], np.float64)
        if f"factor_{i}" in p:
            v = v + np.tanh(np.asarray(p[f"factor_{i}"][c], np.float64)) * np.tanh(v)
        i += 1
    return 1.0 / (1.0 + math.exp(-float(v[0, 0])))


def test_bottleneck_likelihood_matches_reference():
    m, v = _eb()
    z = jnp.asarray(np.random.default_rng(0).normal(0, 3, (1, 3, 3, 4)), jnp.float32)
    z_hat, lik = jax.jit(lambda v, z: m.apply(v, z, "round"))(v, z)
    p = v["params"]
    zh, lk = np.asarray(z_hat), np.asarray(lik)
    for idx in np.ndindex(zh.shape):
        c = idx[-1]
        ref = _ref_density_cdf(p, zh[idx] + 0.5, c) - _ref_density_cdf(p, zh[idx] - 0.5, c)
        assert lk[idx] == pytest.approx(max(ref, 1e-9), rel=2e-4, abs=1e-7)
    np.testing.assert_array_equal(zh, np.round(np.asarray(z)))


def test_gaussian_likelihood_matches_scipy():
    rng = np.random.default_rng(1)
    y = rng.normal(0, 5, 500)
    mu = rng.normal(0, 2, 500)
    s = np.abs(rng.normal(0, 3, 500))
    y_hat = np.round(y - mu) + mu
    ref = stats.norm.cdf(y_hat + 0.5, mu, np.maximum(s, 0.11)) - stats.norm.cdf(
        y_hat - 0.5, mu, np.maximum(s, 0.11)
    )
    ref = np.maximum(ref, 1e-9)
    ours = E.gaussian_likelihood(y_hat, mu, s, np)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)
    _, jl = E.GaussianConditional().apply({}, jnp.asarray(y), jnp.asarray(mu), jnp.asarray(s), "round")
    np.testing.assert_allclose(np.asarray(jl), ref, rtol=2e-3, atol=1e-7)


def test_quantisation_modes():
    x = jnp.linspace(-3, 3, 101)
    r = E.quantize(x, "round", offset=0.25)
    np.testing.assert_allclose(np.asarray(r - 0.25), np.round(np.asarray(x) - 0.25))
    g = jax.grad(lambda t: E.quantize(t, "ste").sum())(x)
    np.testing.assert_array_equal(np.asarray(g), 1.0)
    n = E.quantize(x, "noise", jax.random.PRNGKey(0))
    d = np.asarray(n - x)
    assert np.all(np.abs(d) <= 0.5) and d.std() > 0.2
    with pytest.raises(ValueError):
        E.quantize(x, "noise")
    with pytest.raises(ValueError):
        E.quantize(x, "bogus")


def test_bottleneck_tables_pure_and_consistent():
    m, v = _eb(3, seed=4)
    p = {k: np.asarray(a) for k, a in v["params"].items()}
    t1 = E.bottleneck_tables(p, m.num_layers)
    t2 = E.bottleneck_tables({k: a.copy() for k, a in p.items()}, m.num_layers)
    assert t1.digest() == t2.digest()
    total = 1 << t1.precision
    for i in range(3):
        row = t1.pmf[i, : t1.length[i] + 1]
        assert row.sum() == total and row.min() >= 1
        # integer pmf approximates the float likelihoods
        k = np.arange(t1.offset[i], t1.offset[i] + t1.length[i])[None, None, :].astype(np.float64)
        pc = {n: a[i : i + 1].astype(np.float64) for n, a in p.items()}
        lik = E._bottleneck_likelihood(pc, k, m.num_layers, np)[0, 0]
        # the support keeps only bins worth >= 1 count; the escape has exactly 2**-14
        assert lik.min() >= 2.0**-24 and row[-1] == total >> E.ESCAPE_BITS
        edges = E._bottleneck_likelihood(pc, k[..., [0, -1]] + [[[-1, 1]]], m.num_layers, np)
        assert edges.max() < 2.0**-24
        # floor + lift-to-1 moves each entry by < 1 count; the remainder lands on the mode
        err = np.abs(row[:-1] - lik / lik.sum() * (total - row[-1]))
        mode = int(np.argmax(row))
        assert np.delete(err, mode).max() <= 1.0
        assert err[mode] <= len(row)
    # changing a parameter changes the tables (and so the fingerprint)
    p["bias_0"] = p["bias_0"] + 1.0
    assert E.bottleneck_tables(p, m.num_layers).digest() != t1.digest()


def test_gaussian_tables_and_scale_levels():
    t = E.scale_thresholds()
    assert np.all(np.diff(t) > 0) and t[0] == round(0.11 * 1024)
    assert t[-1] / 1024 >= 256
    g = E.gaussian_tables(t)
    for i in (0, 50, 127):
        row = g.pmf[i, : g.length[i] + 1]
        assert row.sum() == 1 << g.precision and row.min() >= 1
    idx = E.scale_indexes(np.array([-5, 0, t[3], t[3] + 1, 10**9]), t)
    np.testing.assert_array_equal(idx, [0, 0, 3, 4, len(t) - 1])


def test_coding_roundtrip_with_escapes_and_estimate():
    t = E.scale_thresholds()
    g = E.gaussian_tables(t)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 100, 20000)
    s = np.round(rng.normal(0, t[idx] / 1024.0)).astype(np.int64)
    s[:3] = [32767, -32768, 5000]  # escapes
    data = encode_symbols(s, idx, g)
    np.testing.assert_array_equal(decode_symbols(data, idx, g), s)
    lik = E.gaussian_likelihood(s[3:].astype(float), 0.0, t[idx[3:]] / 1024.0, np)
    est = -np.log2(lik).sum()
    assert abs(8 * len(data) - est) / est < 0.01


def test_training_bits_differentiable():
    m, v = _eb(2)
    z = jnp.asarray(np.random.default_rng(0).normal(0, 2, (1, 4, 4, 2)), jnp.float32)

    def bits(params):
        _, lik = m.apply(params, z, "noise", jax.random.PRNGKey(0))
        return E.bits_from_likelihoods(lik)

    g = jax.jit(jax.grad(bits))(v)
    leaves = jax.tree_util.tree_leaves(g)
    assert all(np.isfinite(np.asarray(a)).all() for a in leaves)
    assert any(np.abs(np.asarray(a)).max() > 0 for a in leaves)
