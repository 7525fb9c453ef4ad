"""Entropy models: a factorized ``EntropyBottleneck`` and a mean-scale ``GaussianConditional``.

Both follow CompressAI's formulas (Ballé et al. 2018 non-parametric density; Minnen et al.
2018 mean-scale Gaussian) so likelihoods match CompressAI given the same parameters
(``benchmarks/compressai_parity.py``), but everything needed for *coding* is a pure function
of the parameters:

* :func:`bottleneck_tables` builds the integer CDF tables of the factorized model straight from
  the params (quantiles by bisection on the monotone cumulative, in numpy float64). There is no
  ``update()`` step to forget and no auxiliary quantile loss: the quantiles are solved for, not
  learned.
* :func:`gaussian_tables` builds one integer table per entry of a fixed-point scale table
  (:func:`scale_thresholds`, pure integer arithmetic, so every machine gets the same levels).

Tables are float64 computations rounded to integers; a one-ulp libm difference could in
principle flip one rounding on another machine. That cannot go unnoticed: the tables' bytes
are hashed into the model fingerprint stored in every file (:func:`tables_digest`), so a
decoder whose tables differ refuses the file instead of decoding garbage.

Training bits come from ``likelihoods`` with quantisation ``mode``: ``"noise"`` (additive
uniform noise), ``"ste"`` (round with straight-through gradient) or ``"round"`` (inference).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special as _sp

LIKELIHOOD_BOUND = 1e-9
SCALE_BOUND = 0.11
TABLE_PRECISION = 24  # integer pmfs sum to 2**24 (constriction range coder precision)
SYMBOL_LIMIT = 2**15  # coded symbols lie in [-2**15, 2**15 - 1]
# Escape probability 2**-14: with the 16-bit raw value an escape costs 30 bits, what the
# LIKELIHOOD_BOUND (-log2 1e-9 = 29.9 bits) charges in training, at 8.8e-5 bits per symbol.
ESCAPE_BITS = 14


# --------------------------------------------------------------------------------------------
# quantisation
# --------------------------------------------------------------------------------------------
def quantize(x: jax.Array, mode: str, rng: jax.Array | None = None, offset=0.0) -> jax.Array:
    """Quantise ``x`` around ``offset`` (the mean): noise / straight-through / hard round."""
    if mode == "noise":
        if rng is None:
            raise ValueError("mode='noise' needs an rng")
        return x + jax.random.uniform(rng, x.shape, x.dtype, -0.5, 0.5)
    if mode == "ste":
        r = jnp.round(x - offset) + offset
        return x + jax.lax.stop_gradient(r - x)
    if mode == "round":
        return jnp.round(x - offset) + offset
    raise ValueError(f"unknown quantisation mode {mode!r}; use 'noise', 'ste' or 'round'")


# --------------------------------------------------------------------------------------------
# factorized (non-parametric) density, Ballé et al. 2018
# --------------------------------------------------------------------------------------------
def _softplus(x, xp):
    return jax.nn.softplus(x) if xp is jnp else np.logaddexp(0.0, x)


def logits_cumulative(p: dict, x, num_layers: int, xp=jnp):
    """CompressAI's ``_logits_cumulative``: x (C, 1, K) -> logits of the CDF, (C, 1, K)."""
    logits = x
    for i in range(num_layers):
        logits = xp.matmul(_softplus(p[f"matrix_{i}"], xp), logits) + p[f"bias_{i}"]
        if f"factor_{i}" in p:
            logits = logits + xp.tanh(p[f"factor_{i}"]) * xp.tanh(logits)
    return logits


def _bottleneck_likelihood(p, values_ck, num_layers, xp=jnp):
    """Likelihood of the integer-width bins centred on values (C, 1, K)."""
    lower = logits_cumulative(p, values_ck - 0.5, num_layers, xp)
    upper = logits_cumulative(p, values_ck + 0.5, num_layers, xp)
    sign = -xp.sign(lower + upper)
    sig = jax.nn.sigmoid if xp is jnp else _sp.expit
    return xp.abs(sig(sign * upper) - sig(sign * lower))


class EntropyBottleneck(nn.Module):
    """Factorized prior for hyper-latents ``z`` (NHWC, C = ``channels``).

    Returns ``(z_hat, likelihoods)``; parameters mirror CompressAI's ``_matrix{i}``,
    ``_bias{i}``, ``_factor{i}`` with the same shapes and initialisation.
    """

    channels: int
    filters: Sequence[int] = (3, 3, 3, 3)
    init_scale: float = 10.0

    @property
    def num_layers(self) -> int:
        return len(self.filters) + 1

    def setup(self):
        f = (1,) + tuple(self.filters) + (1,)
        scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
        params = {}
        for i in range(len(self.filters) + 1):
            init = float(np.log(np.expm1(1.0 / scale / f[i + 1])))
            shape = (self.channels, f[i + 1], f[i])
            params[f"matrix_{i}"] = self.param(
                f"matrix_{i}", lambda k, s, v=init: jnp.full(s, v, jnp.float32), shape
            )
            params[f"bias_{i}"] = self.param(
                f"bias_{i}",
                lambda k, s: jax.random.uniform(k, s, jnp.float32, -0.5, 0.5),
                (self.channels, f[i + 1], 1),
            )
            if i < len(self.filters):
                params[f"factor_{i}"] = self.param(
                    f"factor_{i}", nn.initializers.zeros_init(), (self.channels, f[i + 1], 1)
                )
        self._p = params

    def __call__(self, z: jax.Array, mode: str = "noise", rng: jax.Array | None = None):
        if z.shape[-1] != self.channels:
            raise ValueError(f"EntropyBottleneck expects {self.channels} channels, got {z.shape}")
        z_hat = quantize(z, mode, rng)
        c = z_hat.reshape(-1, self.channels).T[:, None, :]  # (C, 1, K)
        lik = _bottleneck_likelihood(self._p, c, self.num_layers, jnp)
        lik = jnp.maximum(lik, LIKELIHOOD_BOUND)
        return z_hat, lik[:, 0, :].T.reshape(z.shape)


def bottleneck_likelihood_np(p: dict, z_hat: np.ndarray, num_layers: int) -> np.ndarray:
    """Host float64 version of the bottleneck likelihood (NHWC ``z_hat``)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    c = z_hat.shape[-1]
    v = np.asarray(z_hat, np.float64).reshape(-1, c).T[:, None, :]
    lik = np.maximum(_bottleneck_likelihood(p, v, num_layers, np), LIKELIHOOD_BOUND)
    return lik[:, 0, :].T.reshape(z_hat.shape)


# --------------------------------------------------------------------------------------------
# integer tables
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CdfTables:
    """Integer pmfs for coding. Row ``i`` codes symbols ``offset[i] .. offset[i]+length[i]-1``;
    entry ``length[i]`` of the row is the escape symbol (probability 2**-ESCAPE_BITS, value
    then coded raw in 16 bits).

    ``pmf`` is (T, Lmax+1) int64, every used entry >= 1, each row summing to 2**precision.
    """

    pmf: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    precision: int = TABLE_PRECISION

    def digest(self) -> bytes:
        cached = self.__dict__.get("_digest")
        if cached is not None:
            return cached
        h = hashlib.blake2b(digest_size=16)
        for a in (self.pmf, self.offset, self.length):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        h.update(int(self.precision).to_bytes(2, "little"))
        object.__setattr__(self, "_digest", h.digest())
        return self._digest


def _quantize_pmf(prob: np.ndarray, precision: int) -> np.ndarray:
    """float pmf (L,) -> integer pmf (L+1,) summing to 2**precision, all >= 1; the last entry
    is the escape symbol with exactly 2**(precision - ESCAPE_BITS).

    Deterministic: floor, lift zeros to 1, then put the remainder on the largest entry.
    """
    total = 1 << precision
    esc = 1 << (precision - ESCAPE_BITS)
    p = np.maximum(np.asarray(prob, np.float64), 0.0)
    p = p / p.sum()
    q = np.maximum(np.floor(p * (total - esc)), 1).astype(np.int64)
    diff = total - esc - int(q.sum())
    if diff != 0:
        j = int(np.argmax(q))
        if q[j] + diff < 1:
            raise ValueError("table too long for its precision")
        q[j] += diff
    return np.concatenate([q, [esc]])


def _trim(lik: np.ndarray, precision: int) -> tuple[int, int]:
    """Support [a, b): drop edge bins too unlikely for one count at this precision.

    Such a bin would be lifted to one count (``precision`` bits) although the model, with its
    1e-9 floor, charges it up to 30 bits; as an escape it costs 30 bits, like the estimate.
    """
    keep = np.flatnonzero(lik >= 2.0**-precision)
    if not keep.size:
        j = int(np.argmax(lik))
        return j, j + 1
    return int(keep[0]), int(keep[-1]) + 1


def _stack_tables(rows: list[np.ndarray], offsets: list[int], precision: int) -> CdfTables:
    lmax = max(len(r) for r in rows)
    pmf = np.zeros((len(rows), lmax), np.int64)
    for i, r in enumerate(rows):
        pmf[i, : len(r)] = r
    return CdfTables(
        pmf=pmf,
        offset=np.asarray(offsets, np.int64),
        length=np.asarray([len(r) - 1 for r in rows], np.int64),
        precision=precision,
    )


def bottleneck_tables(
    p: dict,
    num_layers: int,
    tail_mass: float = 1e-9,
    precision: int = TABLE_PRECISION,
    max_length: int = 4096,
) -> CdfTables:
    """Per-channel integer tables of the factorized density: a pure function of the params.

    The support is [floor(q_lo), ceil(q_hi)] with q_lo / q_hi the tail_mass/2 quantiles,
    found by bisection (the cumulative logits are monotone in x by construction).
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    ch = p["matrix_0"].shape[0]
    target = np.log(2.0 / tail_mass - 1.0)
    bounds = []
    for sgn in (-1.0, 1.0):
        lo = np.full((ch, 1, 1), -float(SYMBOL_LIMIT))
        hi = np.full((ch, 1, 1), float(SYMBOL_LIMIT))
        for _ in range(64):
            mid = 0.5 * (lo + hi)
            above = logits_cumulative(p, mid, num_layers, np) > sgn * target
            hi = np.where(above, mid, hi)
            lo = np.where(above, lo, mid)
        bounds.append(0.5 * (lo + hi)[:, 0, 0])
    q_lo = np.clip(np.floor(bounds[0]), -SYMBOL_LIMIT, SYMBOL_LIMIT - 1).astype(np.int64)
    q_hi = np.clip(np.ceil(bounds[1]), -SYMBOL_LIMIT, SYMBOL_LIMIT - 1).astype(np.int64)
    q_hi = np.maximum(q_hi, q_lo)
    q_hi = np.minimum(q_hi, q_lo + max_length - 1)
    rows, offs = [], []
    for c in range(ch):
        k = np.arange(q_lo[c], q_hi[c] + 1, dtype=np.float64)
        pc = {n: v[c : c + 1] for n, v in p.items()}
        lik = _bottleneck_likelihood(pc, k[None, None, :], num_layers, np)[0, 0]
        a, b = _trim(lik, precision)
        rows.append(_quantize_pmf(lik[a:b], precision))
        offs.append(int(q_lo[c]) + a)
    return _stack_tables(rows, offs, precision)


# --------------------------------------------------------------------------------------------
# mean-scale Gaussian conditional
# --------------------------------------------------------------------------------------------
SCALE_FRAC_BITS = 10  # scales are fixed point with 10 fractional bits


def scale_thresholds(
    num_levels: int = 128, lo: float = SCALE_BOUND, hi: float = 256.0, frac_bits: int = SCALE_FRAC_BITS
) -> np.ndarray:
    """Fixed-point scale levels (int64, units of 2**-frac_bits), geometric from lo to hi.

    Built with Python integer arithmetic only (ratio as a rational p/q), so every platform
    gets exactly the same levels; a scale index is "first level >= scale" as in CompressAI.
    """
    first = int(round(lo * (1 << frac_bits)))
    ratio = (hi / lo) ** (1.0 / (num_levels - 1))
    num, den = int(round(ratio * 1_000_000)), 1_000_000  # a fixed rational, no libm at use
    levels = [first]
    for _ in range(num_levels - 1):
        levels.append(max(levels[-1] + 1, (levels[-1] * num + den // 2) // den))
    return np.asarray(levels, np.int64)


def gaussian_likelihood(y_hat, means, scales, xp=jnp):
    """CompressAI's GaussianConditional._likelihood with the 0.11 scale bound and 1e-9 floor."""
    scales = xp.maximum(scales, SCALE_BOUND)
    values = xp.abs(y_hat - means)
    if xp is jnp:
        cdf = lambda t: 0.5 * jax.scipy.special.erfc(-t / np.sqrt(2.0))  # noqa: E731
    else:
        cdf = lambda t: 0.5 * _sp.erfc(-t / np.sqrt(2.0))  # noqa: E731
    lik = cdf((0.5 - values) / scales) - cdf((-0.5 - values) / scales)
    return xp.maximum(lik, LIKELIHOOD_BOUND)


class GaussianConditional(nn.Module):
    """Mean-scale Gaussian conditional: ``(y_hat, likelihoods)`` given means and scales.

    Parameter-free; it exists as a module so codecs compose it like CompressAI does.
    """

    @nn.compact
    def __call__(self, y, means, scales, mode: str = "noise", rng=None):
        y_hat = quantize(y, mode, rng, offset=means)
        return y_hat, gaussian_likelihood(y_hat, means, scales, jnp)


def scale_indexes(scales_fixed: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the first level >= scale (integers in, integers out; clamps to the last)."""
    idx = np.searchsorted(thresholds, np.asarray(scales_fixed, np.int64), side="left")
    return np.minimum(idx, len(thresholds) - 1).astype(np.int64)


def gaussian_tables(
    thresholds: np.ndarray,
    frac_bits: int = SCALE_FRAC_BITS,
    tail_mass: float = 1e-9,
    precision: int = TABLE_PRECISION,
) -> CdfTables:
    """One integer table per scale level, symbols = round(y - mean) in [-R, R]."""
    z = -_sp.ndtri(tail_mass / 2.0)
    rows, offs = [], []
    for t in np.asarray(thresholds, np.int64):
        s = float(t) / (1 << frac_bits)
        r = int(np.ceil(s * z))
        k = np.arange(-r, r + 1, dtype=np.float64)
        lik = _sp.ndtr((k + 0.5) / s) - _sp.ndtr((k - 0.5) / s)
        a, b = _trim(lik, precision)
        rows.append(_quantize_pmf(lik[a:b], precision))
        offs.append(-r + a)
    return _stack_tables(rows, offs, precision)


def tables_digest(*tables: CdfTables) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for t in tables:
        h.update(t.digest())
    return h.digest()


def bits_from_likelihoods(*liks) -> jax.Array:
    """Total bits (Σ -log2 p) of one or more likelihood maps."""
    return sum(-jnp.sum(jnp.log2(lik)) for lik in liks)
