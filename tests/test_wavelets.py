"""Haar DWT against PyWavelets, exact inverse, and the high-frequency loss's sensitivity."""

import numpy as np
import pytest
import pywt

from fasdiff_jax.models import wavelets


def test_matches_pywavelets_band_for_band():
    x = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    ours = wavelets.haar_dwt2(x)
    for bi in range(2):
        for ci in range(3):
            ca, (ch, cv, cd) = pywt.dwt2(x[bi, :, :, ci].astype(np.float64), "haar")
            np.testing.assert_allclose(ours.ll[bi, :, :, ci], ca, atol=1e-5)
            np.testing.assert_allclose(ours.lh[bi, :, :, ci], ch, atol=1e-5)
            np.testing.assert_allclose(ours.hl[bi, :, :, ci], cv, atol=1e-5)
            np.testing.assert_allclose(ours.hh[bi, :, :, ci], cd, atol=1e-5)


def test_inverse_and_energy():
    x = np.random.default_rng(1).normal(size=(1, 16, 16, 4)).astype(np.float32)
    bands = wavelets.haar_dwt2(x)
    np.testing.assert_allclose(wavelets.haar_idwt2(bands), x, atol=1e-5)
    energy = sum(float(np.sum(np.square(b))) for b in bands)
    assert energy == pytest.approx(float(np.sum(x**2)), rel=1e-5)
    ll, highs = wavelets.wavedec2(x, 3)
    assert ll.shape == (1, 2, 2, 4) and [h.shape[1] for h in highs] == [8, 4, 2]


def test_high_frequency_loss_ignores_low_band_changes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 16, 16, 3)).astype(np.float32)
    # A constant offset changes only LL; a checkerboard only the finest HH.
    assert float(wavelets.high_frequency_loss(x, x + 0.7)) < 1e-6
    checker = np.indices((16, 16)).sum(0) % 2 * 2 - 1.0
    assert float(wavelets.high_frequency_loss(x, x + 0.1 * checker[None, :, :, None])) > 1e-2
    with pytest.raises(ValueError, match="even"):
        wavelets.haar_dwt2(np.zeros((1, 5, 4, 1)))
