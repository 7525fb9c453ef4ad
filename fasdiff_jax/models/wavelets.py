"""Orthonormal 2-D Haar wavelet transform (NHWC), used for FaSDiff's frequency split.

The compressor's analysis sees the high bands (LH, HL, HH) at several levels so that fine
facial detail is explicitly represented; the low-frequency enhancement module works on the
low band (LL); the high-frequency loss compares high bands. Band conventions follow
PyWavelets' ``dwt2(x, 'haar')``: ``(cA, (cH, cV, cD))`` == ``(LL, (LH, HL, HH))``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class HaarBands(NamedTuple):
    ll: jax.Array  # approximation (low-pass in both directions)
    lh: jax.Array  # horizontal detail (pywt cH): low-pass along W, high-pass along H
    hl: jax.Array  # vertical detail (pywt cV): high-pass along W, low-pass along H
    hh: jax.Array  # diagonal detail


def haar_dwt2(x: jax.Array) -> HaarBands:
    """One level on (B, H, W, C) with even H, W -> four (B, H/2, W/2, C) bands."""
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"haar_dwt2 needs even height and width, got {x.shape}")
    a = x[:, 0::2, 0::2]
    b = x[:, 0::2, 1::2]
    c = x[:, 1::2, 0::2]
    d = x[:, 1::2, 1::2]
    return HaarBands(
        ll=(a + b + c + d) * 0.5,
        lh=(a + b - c - d) * 0.5,
        hl=(a - b + c - d) * 0.5,
        hh=(a - b - c + d) * 0.5,
    )


def haar_idwt2(bands: HaarBands) -> jax.Array:
    """Exact inverse of :func:`haar_dwt2`."""
    ll, lh, hl, hh = bands
    a = (ll + lh + hl + hh) * 0.5
    b = (ll + lh - hl - hh) * 0.5
    c = (ll - lh + hl - hh) * 0.5
    d = (ll - lh - hl + hh) * 0.5
    bsz, h, w, ch = ll.shape
    top = jnp.stack([a, b], axis=3).reshape(bsz, h, 2 * w, ch)
    bottom = jnp.stack([c, d], axis=3).reshape(bsz, h, 2 * w, ch)
    return jnp.stack([top, bottom], axis=2).reshape(bsz, 2 * h, 2 * w, ch)


def wavedec2(x: jax.Array, levels: int) -> tuple[jax.Array, list[jax.Array]]:
    """Multi-level decomposition: (final LL, [high bands of level 1, 2, ...]).

    Each high-band entry concatenates LH, HL, HH on the channel axis: (B, H/2^l, W/2^l, 3C).
    """
    highs = []
    for _ in range(levels):
        bands = haar_dwt2(x)
        highs.append(jnp.concatenate([bands.lh, bands.hl, bands.hh], axis=-1))
        x = bands.ll
    return x, highs


def low_band(x: jax.Array, levels: int = 1) -> jax.Array:
    """The LL band after ``levels`` levels (an exact, orthonormal low-pass + decimation)."""
    for _ in range(levels):
        x = haar_dwt2(x).ll
    return x


def high_frequency_loss(x: jax.Array, y: jax.Array, levels: int = 2, p: int = 1) -> jax.Array:
    """Mean L1 (p=1) or L2 (p=2) distance between the high bands of x and y, all levels."""
    _, hx = wavedec2(x.astype(jnp.float32), levels)
    _, hy = wavedec2(y.astype(jnp.float32), levels)
    per_level = [jnp.mean(jnp.abs(a - b) ** p) for a, b in zip(hx, hy)]
    return sum(per_level) / len(per_level)
